"""How the library's config dataclasses describe their fields, so that a default is written once.

Every stage option is a field of a config dataclass (``FeatureConfig``, ``TrainConfig``, ``ModelConfig`` …) declared
with :func:`option`: its default and its one-line help live there, and the command line (``stages/_options.py``)
and ``params.yaml`` follow it. :func:`parse_unset` is the one reading of an "unset" value (``None``, ``""``,
``none``, ``null``, ``default``, ``auto``) wherever a field may be left to its default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

UNSET_WORDS = ("", "none", "null", "default", "auto")


def option(default: Any, help: str, *, name: str | None = None, cli: bool = True) -> Any:
    """A config field with its command-line help; ``name`` is the option's (and params.yaml key's) name when it is
    not the field name with ``-`` for ``_``; ``cli=False`` keeps it off the command line."""
    metadata = {"help": help, "option": name, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_name(field: dataclasses.Field) -> str:
    """The option name (and params.yaml key) of a config field: ``num_clusters`` → ``num-clusters``."""
    return field.metadata.get("option") or field.name.replace("_", "-")


def parse_unset(value: Any) -> Any:
    """``None`` for an unset value (``None``, ``""``, ``none``, ``null``, ``default``, ``auto``, any case); else
    ``value``.

    DVC writes a params.yaml ``null`` into a command as the text ``None`` and an empty string as ``''``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS):
        return None
    return value


#: Seconds a process waits for the others in a collective under torchrun before failing (a dead or stuck peer).
DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass
class RunConfig:
    """Where and how a command runs (device, progress bars, torchrun timeout); no part of any result, so the
    commands take it but params.yaml does not hold it."""

    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun, auto gives process k the GPU cuda:k).")
    progress: bool = option(True, "Show progress bars.")
    dist_timeout: float = option(DEFAULT_TIMEOUT_S, "Under torchrun: seconds a process waits for the others in a "
                                 "collective before failing with an error (a dead or stuck peer).")
