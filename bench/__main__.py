"""Run every benchmark module: ``python -m bench`` (all) or ``python -m bench netvlad_layer …`` (some).

Each module in ``MODULES`` has a ``main()`` that prints its figures; add new modules to the list. Options after the
names go to each named module whose ``main`` takes an ``argv`` list: ``python -m bench search --scale 0.1``.
"""

from __future__ import annotations

import importlib
import inspect
import sys

MODULES = [
    "netvlad_layer",
    "features",
    "training",
    "trunk_cache",
    "vit_trunk_cache",
    "places",
    "distributed",
    "search",
    "released",
]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    first_option = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:first_option] or MODULES, args[first_option:]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        sys.exit(f"error: unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(MODULES)}")
    if options and not args[:first_option]:
        sys.exit(f"error: options {' '.join(options)} need the benchmark names before them")
    for name in names:
        print(f"== bench.{name}", flush=True)
        module_main = importlib.import_module(f"bench.{name}").main
        if options and "argv" not in inspect.signature(module_main).parameters:
            sys.exit(f"error: bench.{name} takes no options ({' '.join(options)})")
        module_main(options) if options else module_main()


if __name__ == "__main__":
    main()
