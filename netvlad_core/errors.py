"""The one exception type for user mistakes (bad input, bad params, missing files), and the library's warning."""


class NetVLADError(Exception):
    """A user-facing error: its message is one line that names the file or value and the problem.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


class NetVLADWarning(UserWarning):
    """Something the user should know but that does not stop the work (e.g. a PCA dimension that was lowered).

    The CLI prints it as one line ``warning: <message>``; as a :class:`UserWarning` it behaves as usual elsewhere.
    """
