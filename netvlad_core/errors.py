"""The one exception type for user mistakes (bad input, bad params, missing files)."""


class NetVLADError(Exception):
    """A user-facing error: its message is one line that names the file or value and the problem.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
