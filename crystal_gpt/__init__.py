"""crystal-gpt: symmetry-aware autoregressive generation of inorganic crystals."""

from crystal_gpt.data.cache import EncodedDataset, encode_dataset
from crystal_gpt.data.codec import (
    DEFAULT_SYMPREC,
    EncodingError,
    WyckoffCrystal,
    decode,
    encode,
)
from crystal_gpt.data.datasets import (
    CrystalDataset,
    CrystalRecord,
    DatasetError,
    RowError,
    load_dataset,
)
from crystal_gpt.data.symmetry import WyckoffTables, get_tables

__version__ = "0.1.0"


def __getattr__(name: str):
    # the model pulls in torch: import it only when asked for
    if name == "CrystalGPT":
        from crystal_gpt.model.transformer import CrystalGPT

        return CrystalGPT
    if name == "evaluate":  # the evaluation suite pulls in matminer and smact
        from crystal_gpt.evaluation.suite import evaluate

        return evaluate
    raise AttributeError(f"module 'crystal_gpt' has no attribute {name!r}")


__all__ = [  # noqa: RUF022
    "CrystalGPT",
    "DEFAULT_SYMPREC",
    "CrystalDataset",
    "CrystalRecord",
    "DatasetError",
    "EncodedDataset",
    "EncodingError",
    "RowError",
    "WyckoffCrystal",
    "WyckoffTables",
    "__version__",
    "decode",
    "encode",
    "encode_dataset",
    "evaluate",
    "get_tables",
    "load_dataset",
]
