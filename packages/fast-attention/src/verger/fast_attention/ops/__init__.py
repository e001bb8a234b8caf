"""Kernels: each op is a folder with ``reference.py`` (the spec), torch/Triton paths, dispatch."""
