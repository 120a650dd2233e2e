"""Benchmarks: each module measures ratios in one warmed-up process and prints them (``python -m bench``).

Every way in (``python -m bench``, ``python -m bench.<module>``) imports this package first, so the process gets
the CPU allocator setting every ``netvlad`` command uses and the figures are those of the stages.
"""

from netvlad_core.device import configure_cpu_allocator

configure_cpu_allocator()
