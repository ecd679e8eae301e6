"""The model: the transformer and its heads (``transformer``), the coordinate and lattice
distributions (``distributions``) and checkpoint loading (``checkpoints``)."""

from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.transformer import CrystalGPT

__all__ = ["CrystalGPT", "ModelConfig"]
