"""Encoded crystals -> padded tensors, and length-bucketed batches (no padding to 21 sites)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from crystal_gpt.data.cache import EncodedDataset


class PaddedCrystals:
    """A whole encoded dataset as padded arrays, built once; a batch is a slice of rows."""

    def __init__(
        self,
        ds: EncodedDataset,
        max_sites: int | None = None,
        conditions: list[str] | tuple[str, ...] = (),
    ) -> None:
        n = ds.num_sites.astype(np.int64)
        if len(n) == 0:
            raise ValueError("the dataset is empty")
        if max_sites is not None and n.max() > max_sites:
            raise ValueError(
                f"a crystal has {int(n.max())} Wyckoff sites; the model takes at most {max_sites}"
            )
        N, T = len(n), int(n.max())
        self.n = n
        self.g = ds.spacegroup.astype(np.int64)
        self.w = np.zeros((N, T), dtype=np.int64)
        self.a = np.zeros((N, T), dtype=np.int64)
        self.x = np.zeros((N, T, 3), dtype=np.float32)
        pos = np.arange(T)[None, :] < n[:, None]
        self.w[pos] = ds.wyckoff
        self.a[pos] = ds.species
        self.x[pos] = ds.coords
        self.lattice = ds.lattice.astype(np.float32)
        self.num_atoms = ds.num_atoms.astype(np.int64)
        # condition columns (NaN: missing), in batches as "cond:<name>"
        self.conditions = {name: condition_column(ds, name) for name in conditions}

    def __len__(self) -> int:
        return len(self.n)

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        T = int(self.n[idx].max())
        arrays = {
            "g": self.g[idx],
            "w": self.w[idx, :T],
            "a": self.a[idx, :T],
            "x": self.x[idx, :T],
            "n": self.n[idx],
            "lattice": self.lattice[idx],
            "num_atoms": self.num_atoms[idx],
        }
        for name, values in self.conditions.items():
            arrays[f"cond:{name}"] = values[idx]
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def condition_column(ds: EncodedDataset, name: str) -> np.ndarray:
    """A numeric property column of the dataset as float32 (NaN where missing), or an error
    naming the numeric columns there are."""
    numeric = sorted(k for k, v in ds.properties.items() if v.dtype.kind in "fiub")
    if name not in ds.properties or name not in numeric:
        what = "not a numeric column" if name in ds.properties else "no such column"
        raise ValueError(
            f"condition {name!r}: {what} in the dataset; numeric columns: "
            f"{', '.join(numeric) or 'none'}"
        )
    values = ds.properties[name].astype(np.float32)
    if not np.isfinite(values).any():
        raise ValueError(f"condition {name!r}: no crystal of the dataset has a value")
    return values


def bucketed_batches(
    num_sites: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
    max_tokens: int | None = None,
) -> list[np.ndarray]:
    """Batches of crystals of similar length, in random order when rng is given.

    Sorting by length (with random tie order) keeps padding small; ``max_tokens`` caps
    batch_size * longest sequence, so long crystals come in smaller batches.
    """
    n = np.asarray(num_sites)
    jitter = rng.random(len(n)) if rng is not None else np.arange(len(n)) / max(len(n), 1)
    order = np.lexsort((jitter, n))
    batches, start = [], 0
    while start < len(order):
        stop = min(start + batch_size, len(order))
        if max_tokens is not None:
            while stop - start > 1 and (stop - start) * (n[order[stop - 1]] + 1) > max_tokens:
                stop -= 1
        batches.append(order[start:stop])
        start = stop
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
