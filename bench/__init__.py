"""Benchmarks: each module measures ratios in one warmed-up process and prints them (``python -m bench``)."""
