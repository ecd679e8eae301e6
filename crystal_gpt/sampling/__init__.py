"""Sampling: the sampler (``sampler``), the look-ahead constraints planner (``constraints``) and
the sample files it writes (``output``)."""

from crystal_gpt.sampling.sampler import sample_crystals

__all__ = ["sample_crystals"]
