"""Kernels of the package: one folder per op (``reference.py`` + ``triton.py`` + dispatcher)."""

from verger.expert_soups.ops.weighted_sum import weighted_sum, weighted_sum_reference

__all__ = ["weighted_sum", "weighted_sum_reference"]
