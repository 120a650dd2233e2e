"""NetVLAD place recognition: the library behind the `netvlad` stages.

Everything here takes explicit inputs and outputs (paths, arrays, typed configs);
nothing reads params.yaml or parses command lines.
"""

__version__ = "0.1.0"
