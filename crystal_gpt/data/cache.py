"""Whole datasets in the Wyckoff representation: parallel encoding and an on-disk cache.

Encoded datasets are flat arrays (sites of all crystals concatenated, with offsets), which is
what the model's batching wants and what loads in milliseconds. Each source file is encoded once
per setting and cached under ``$CRYSTAL_GPT_CACHE`` (default ``~/.cache/crystal_gpt``), keyed by
the file's sha256, the settings and the encoder version; a protocol split is a row selection.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal_gpt.data.codec import (
    DEFAULT_SYMPREC,
    EncodingError,
    WyckoffCrystal,
    encode,
    reduce_lattice_parameters,
)
from crystal_gpt.data.datasets import (
    DATASETS,
    DatasetError,
    RawRow,
    RowError,
    file_digest,
    file_split_rows,
    keep_rows,
    parse_row,
    read_rows,
    split_sources,
)
from crystal_gpt.data.symmetry import CRYSTAL_SYSTEMS, get_tables
from crystal_gpt.utils import atomic_path, parallel_map

# 2: canonical origin, symmetrised coordinates; 3: translation-free spglib input;
# 4: polar origin on the symmetrised anchor atom; 5: the most symmetric spglib answer that
# fits, orbits judged after symmetrising, the smallest of equally symmetric encodings
ENCODER_VERSION = 5


def cache_dir() -> Path:
    return Path(os.environ.get("CRYSTAL_GPT_CACHE", Path.home() / ".cache" / "crystal_gpt"))


@dataclass
class EncodedDataset:
    """Encoded crystals as flat arrays; ``ds[i]`` gives a WyckoffCrystal."""

    ids: np.ndarray  # (N,) str
    rows: np.ndarray  # (N,) int: row in its source file
    spacegroup: np.ndarray  # (N,) int16
    site_start: np.ndarray  # (N + 1,) int64: sites of crystal i are site_start[i]:site_start[i+1]
    wyckoff: np.ndarray  # (S,) int16 letter index
    species: np.ndarray  # (S,) int16 atomic number
    coords: np.ndarray  # (S, 3) representative fractional coordinates
    lattice: np.ndarray  # (N, 6) a, b, c, alpha, beta, gamma of the conventional cell
    symprec: np.ndarray  # (N,) tolerance used (nan: P1)
    fallback: np.ndarray  # (N,) bool: analysis fell back to a smaller tolerance or P1
    properties: dict[str, np.ndarray]
    errors: list[RowError]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> WyckoffCrystal:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        a, b = self.site_start[i], self.site_start[i + 1]
        g = int(self.spacegroup[i])
        system = CRYSTAL_SYSTEMS[int(get_tables().crystal_system[g])]
        sp = float(self.symprec[i])
        return WyckoffCrystal(
            spacegroup=g,
            wyckoff=self.wyckoff[a:b],
            species=self.species[a:b],
            coords=self.coords[a:b],
            lattice=reduce_lattice_parameters(system, self.lattice[i]),
            symprec=None if np.isnan(sp) else sp,
        )

    def __iter__(self) -> Iterator[WyckoffCrystal]:
        return (self[i] for i in range(len(self)))

    @property
    def num_sites(self) -> np.ndarray:
        return np.diff(self.site_start)

    @property
    def num_atoms(self) -> np.ndarray:
        mult = get_tables().multiplicity[np.repeat(self.spacegroup, self.num_sites), self.wyckoff]
        return np.add.reduceat(mult.astype(np.int64), self.site_start[:-1]) if len(self) else mult

    def select(self, index: np.ndarray) -> EncodedDataset:
        index = np.asarray(index, dtype=np.int64)
        starts, stops = self.site_start[index], self.site_start[index + 1]
        site_idx = (
            np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
            if len(index)
            else np.zeros(0, dtype=np.int64)
        )
        return EncodedDataset(
            ids=self.ids[index],
            rows=self.rows[index],
            spacegroup=self.spacegroup[index],
            site_start=np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64),
            wyckoff=self.wyckoff[site_idx],
            species=self.species[site_idx],
            coords=self.coords[site_idx],
            lattice=self.lattice[index],
            symprec=self.symprec[index],
            fallback=self.fallback[index],
            properties={k: v[index] for k, v in self.properties.items()},
            errors=[],  # the caller knows which failed rows belong to a selection
        )

    @staticmethod
    def concatenate(parts: list[EncodedDataset]) -> EncodedDataset:
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p.site_start[-1] for p in parts[:-1]])
        keys = set.intersection(*(set(p.properties) for p in parts)) if parts else set()
        return EncodedDataset(
            ids=np.concatenate([p.ids for p in parts]),
            rows=np.concatenate([p.rows for p in parts]),
            spacegroup=np.concatenate([p.spacegroup for p in parts]),
            site_start=np.concatenate(
                [[0]] + [p.site_start[1:] + o for p, o in zip(parts, offsets, strict=True)]
            ).astype(np.int64),
            wyckoff=np.concatenate([p.wyckoff for p in parts]),
            species=np.concatenate([p.species for p in parts]),
            coords=np.concatenate([p.coords for p in parts]),
            lattice=np.concatenate([p.lattice for p in parts]),
            symprec=np.concatenate([p.symprec for p in parts]),
            fallback=np.concatenate([p.fallback for p in parts]),
            properties={k: np.concatenate([p.properties[k] for p in parts]) for k in keys},
            errors=[e for p in parts for e in p.errors],
        )

    @classmethod
    def from_crystals(
        cls,
        crystals: Sequence[WyckoffCrystal],
        ids: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
        properties: dict[str, np.ndarray] | None = None,
        errors: list[RowError] | None = None,
    ) -> EncodedDataset:
        """In-memory WyckoffCrystals as flat arrays (ids and rows default to 0, 1, ...)."""
        n_sites = np.array([wc.num_sites for wc in crystals], dtype=np.int64)
        cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
        return cls(
            ids=np.array([str(i) for i in range(len(crystals))] if ids is None else ids, dtype=str),
            rows=np.array(range(len(crystals)) if rows is None else rows, dtype=np.int64),
            spacegroup=np.array([wc.spacegroup for wc in crystals], dtype=np.int16),
            site_start=np.concatenate([[0], np.cumsum(n_sites)]).astype(np.int64),
            wyckoff=cat([wc.wyckoff for wc in crystals], (0,)).astype(np.int16),
            species=cat([wc.species for wc in crystals], (0,)).astype(np.int16),
            coords=cat([wc.coords for wc in crystals], (0, 3)).astype(float),
            lattice=np.array([wc.lattice_parameters for wc in crystals], dtype=float).reshape(
                -1, 6
            ),
            symprec=np.array([np.nan if wc.symprec is None else wc.symprec for wc in crystals]),
            fallback=np.array(["fallback" in wc.meta for wc in crystals], dtype=bool),
            properties={} if properties is None else properties,
            errors=[] if errors is None else errors,
        )

    def save(self, path: Path) -> None:
        props = {f"prop:{k}": v for k, v in self.properties.items()}
        with atomic_path(path, ".npz") as tmp:  # a killed run never leaves a half-written cache
            np.savez(
                tmp,
                ids=self.ids,
                rows=self.rows,
                spacegroup=self.spacegroup,
                site_start=self.site_start,
                wyckoff=self.wyckoff,
                species=self.species,
                coords=self.coords,
                lattice=self.lattice,
                symprec=self.symprec,
                fallback=self.fallback,
                errors=np.array(json.dumps([e.__dict__ for e in self.errors])),
                **props,
            )

    @classmethod
    def load(cls, path: Path) -> EncodedDataset:
        with np.load(path, allow_pickle=False) as z:
            props = {k[5:]: z[k] for k in z.files if k.startswith("prop:")}
            fields = {k: z[k] for k in z.files if not k.startswith("prop:") and k != "errors"}
            errors = [RowError(**e) for e in json.loads(str(z["errors"]))]
        return cls(**fields, properties=props, errors=errors)


def _encode_row(args: tuple[RawRow, float, str]):
    row, symprec, mode = args
    parsed = parse_row(row)
    if isinstance(parsed, RowError):
        return parsed
    try:
        wc = encode(parsed.structure, symprec, mode=mode)
    except (EncodingError, ValueError) as err:
        return RowError(row.source, row.row, row.id, f"cannot encode: {err}")
    return row, wc


def _properties_to_arrays(props: list[dict]) -> dict[str, np.ndarray]:
    keys = sorted({k for p in props for k in p})
    out = {}
    for k in keys:
        values = [p.get(k) for p in props]
        if all(isinstance(v, int | float | bool) or v is None for v in values):
            out[k] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            out[k] = np.array(["" if v is None else str(v) for v in values])
    return out


def encode_rows(
    rows: Iterable[RawRow],
    *,
    symprec: float = DEFAULT_SYMPREC,
    mode: str = "wyckoff",
    workers: int | None = None,
    total: int | None = None,
    desc: str = "encoding",
    progress: bool = True,
) -> EncodedDataset:
    """Parse and encode rows in parallel processes, with a progress bar."""
    jobs = ((r, symprec, mode) for r in rows)
    return _assemble(parallel_map(_encode_row, jobs, workers, total, desc, progress))


def _assemble(results: list) -> EncodedDataset:
    good = [r for r in results if not isinstance(r, RowError)]
    return EncodedDataset.from_crystals(
        [wc for _, wc in good],
        ids=[row.id for row, _ in good],
        rows=[row.row for row, _ in good],
        properties=_properties_to_arrays([row.properties for row, _ in good]),
        errors=[r for r in results if isinstance(r, RowError)],
    )


def cache_key(path: Path, symprec: float, mode: str) -> str:
    settings = json.dumps(
        {"file": file_digest(path), "symprec": symprec, "mode": mode, "version": ENCODER_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(settings.encode()).hexdigest()[:20]


def encode_file(
    path: Path,
    *,
    symprec: float = DEFAULT_SYMPREC,
    mode: str = "wyckoff",
    workers: int | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> EncodedDataset:
    """Encode one CSV file, or load it from the cache when it was encoded with these settings."""
    path = Path(path)
    stem = path.name.split(".")[0]
    target = cache_dir() / f"{path.parent.name}-{stem}-{mode}-{cache_key(path, symprec, mode)}.npz"
    if use_cache and target.exists():
        try:
            return EncodedDataset.load(target)
        except (OSError, ValueError, KeyError):
            target.unlink(missing_ok=True)  # a corrupt cache is rebuilt, not trusted
    rows = list(read_rows(path))
    ds = encode_rows(
        rows,
        symprec=symprec,
        mode=mode,
        workers=workers,
        total=len(rows),
        desc=f"encoding {path.parent.name}/{stem}",
        progress=progress,
    )
    if use_cache:
        ds.save(target)
    return ds


def encode_dataset(
    name: str,
    split: str | None = None,
    *,
    symprec: float = DEFAULT_SYMPREC,
    mode: str = "wyckoff",
    workers: int | None = None,
    data_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    pressures: Iterable[float] | None = None,
) -> EncodedDataset:
    """A dataset split (or a CSV path) in the Wyckoff representation, cached on disk (splits
    as ``load_dataset``'s: a path is the whole file unless ``train`` / ``holdout`` is asked)."""
    split = split or ("train" if name in DATASETS else "file")
    kwargs = dict(
        symprec=symprec, mode=mode, workers=workers, use_cache=use_cache, progress=progress
    )
    if name not in DATASETS:
        path = Path(name)
        if not path.is_file():
            known = ", ".join(DATASETS)
            raise DatasetError(f"unknown dataset {name!r}: not one of {known}, nor a CSV file")
        sources = [(path, file_split_rows(path, split))]
    else:
        sources = split_sources(name, split, data_dir, pressures)
    parts = []
    for path, rows in sources:
        ds = encode_file(path, **kwargs)  # type: ignore[arg-type]
        if rows is not None:  # the split's rows, and the split's failed rows
            errors = ds.errors
            kept = keep_rows([e.row for e in errors], [e.id for e in errors], rows)
            ds = ds.select(np.nonzero(keep_rows(ds.rows, ds.ids, rows))[0])
            ds.errors = [e for e, k in zip(errors, kept, strict=True) if k]
        parts.append(ds)
    return EncodedDataset.concatenate(parts)
