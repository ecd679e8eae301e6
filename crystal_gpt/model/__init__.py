"""The model: the transformer and its heads (``transformer``), the coordinate and lattice
distributions (``distributions``) and checkpoint loading (``checkpoints``)."""

from crystal_gpt.model.transformer import CrystalGPT, ModelConfig

__all__ = ["CrystalGPT", "ModelConfig"]
