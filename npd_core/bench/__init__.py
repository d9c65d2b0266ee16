"""Benchmarks (packing, generation) and the bench's curves and plots."""
