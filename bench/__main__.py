"""Run every benchmark module: ``python -m bench`` (all) or ``python -m bench netvlad_layer …`` (some).

Each module in ``MODULES`` has a ``main()`` that prints its figures; add new modules to the list.
"""

from __future__ import annotations

import importlib
import sys

MODULES = [
    "netvlad_layer",
    "features",
    "training",
    "trunk_cache",
    "distributed",
]


def main(argv: list[str] | None = None) -> None:
    names = (sys.argv[1:] if argv is None else argv) or MODULES
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        sys.exit(f"error: unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(MODULES)}")
    for name in names:
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
