"""Writing generated crystals: one CIF each (with its symmetry), one extxyz, a CSV summary."""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Composition
from pymatgen.core.operations import SymmOp

from crystal_gpt.data.codec import WyckoffCrystal, expand
from crystal_gpt.data.symmetry import get_tables
from crystal_gpt.utils import prepare_output_folder

SUMMARY_FIELDS = (
    "index",
    "formula",
    "spacegroup",
    "symbol",
    "wyckoff",
    "num_atoms",
    "redraws",
    "site_redraws",
    "num_sites",
    "volume",
    "density",
    "cif",
)


@functools.cache
def _symmetry_ops_xyz(spacegroup: int) -> tuple[str, ...]:
    """The group's operations (its general position, centring included) as CIF xyz strings."""
    tables = get_tables()
    general = int(tables.num_letters[spacegroup]) - 1
    rot, trans = tables.orbit_ops(spacegroup, general)
    return tuple(
        SymmOp.from_rotation_and_translation(r.astype(float), t).as_xyz_str()
        for r, t in zip(rot, trans, strict=True)
    )


def wyckoff_cif(crystal: WyckoffCrystal, name: str = "crystal") -> str:
    """A CIF that states the space group, its operations and one line per Wyckoff site.

    Written straight from the representation: no symmetry search, and special positions keep
    their exact values.
    """
    tables = get_tables()
    g = crystal.spacegroup
    a, b, c, al, be, ga = crystal.lattice_parameters
    lines = [
        f"data_{name}",
        f"_symmetry_space_group_name_H-M   '{tables.symbol[g]}'",
        f"_symmetry_Int_Tables_number   {g}",
        f"_cell_length_a   {a:.8f}",
        f"_cell_length_b   {b:.8f}",
        f"_cell_length_c   {c:.8f}",
        f"_cell_angle_alpha   {al:.8f}",
        f"_cell_angle_beta   {be:.8f}",
        f"_cell_angle_gamma   {ga:.8f}",
        "loop_",
        " _symmetry_equiv_pos_site_id",
        " _symmetry_equiv_pos_as_xyz",
    ]
    lines += [f"  {i + 1}  '{op}'" for i, op in enumerate(_symmetry_ops_xyz(g))]
    lines += [
        "loop_",
        " _atom_site_type_symbol",
        " _atom_site_label",
        " _atom_site_symmetry_multiplicity",
        " _atom_site_Wyckoff_symbol",
        " _atom_site_fract_x",
        " _atom_site_fract_y",
        " _atom_site_fract_z",
        " _atom_site_occupancy",
    ]
    for k, ((letter, el, _), mult, xyz) in enumerate(
        zip(crystal.sites, crystal.multiplicities, crystal.coords, strict=True)
    ):
        x, y, z = (f"{v:.8f}" for v in xyz)
        lines.append(f"  {el}  {el}{k}  {mult}  {letter}  {x}  {y}  {z}  1")
    return "\n".join(lines) + "\n"


def prepare_sample_folder(out_dir: str | Path) -> Path:
    """Check, before any sampling, that ``out_dir`` can take a sample folder, and clear the
    files a previous run left there (so no stale CIF sits beside a new summary)."""
    out = prepare_output_folder(out_dir, ("cif/crystal_*.cif", "samples.extxyz", "summary.csv"))
    (out / "cif").mkdir(exist_ok=True)
    return out


AMU_PER_A3_IN_G_PER_CM3 = 1.66053906660  # 1 amu / A^3 in g / cm^3


@functools.cache
def _element(z: int) -> tuple[str, float]:
    from pymatgen.core import Element

    el = Element.from_Z(z)
    return el.symbol, float(el.atomic_mass)


@dataclass(frozen=True)
class Cell:
    """A crystal's conventional cell as arrays (``codec.expand``): what the summary, the extxyz
    frames and the parquet rows are made of, without a pymatgen Structure per crystal (with
    them, rendering 1,000 samples took 1.24 s; without, 0.60 s)."""

    matrix: np.ndarray  # (3, 3) lattice vectors as rows, Angstrom
    frac: np.ndarray  # (N, 3) fractional coordinates
    numbers: np.ndarray  # (N,) atomic numbers

    @classmethod
    def of(cls, crystal: WyckoffCrystal) -> Cell:
        return cls(*expand(crystal))

    @property
    def symbols(self) -> list[str]:
        return [_element(int(z))[0] for z in self.numbers]

    @property
    def volume(self) -> float:
        return abs(float(np.linalg.det(self.matrix)))

    @property
    def density(self) -> float:
        """g/cm^3, as ``Structure.density`` (without pymatgen's unit objects)."""
        mass = sum(_element(int(z))[1] for z in self.numbers)
        return mass / self.volume * AMU_PER_A3_IN_G_PER_CM3

    @property
    def reduced_formula(self) -> str:
        """pymatgen's reduced formula (its element order and special names, e.g. LiFePO4)."""
        symbols, counts = np.unique(self.numbers, return_counts=True)
        return Composition(
            {_element(int(z))[0]: int(n) for z, n in zip(symbols, counts, strict=True)}
        ).reduced_formula


def summary_row(
    i: int, wc: WyckoffCrystal, cell: Cell, loglik: dict[str, float] | None = None
) -> dict:
    """The summary's columns for crystal ``i`` (its expanded ``cell``), log-likelihood parts as
    ``loglik_<part>``: one definition for summary.csv and the parquet shards."""
    tables = get_tables()
    row = {
        "index": i,
        "formula": cell.reduced_formula,
        "spacegroup": wc.spacegroup,
        "symbol": str(tables.symbol[wc.spacegroup]),
        "wyckoff": " ".join(
            f"{m}{site[0]}:{site[1]}" for site, m in zip(wc.sites, wc.multiplicities, strict=True)
        ),
        "num_atoms": len(cell.numbers),
        "redraws": int(wc.meta.get("redraws", 0)),
        "site_redraws": int(wc.meta.get("site_redraws", 0)),
        "num_sites": wc.num_sites,
        "volume": round(cell.volume, 4),
        "density": round(cell.density, 4),
        "cif": f"cif/crystal_{i:05d}.cif",
    }
    for key, value in wc.meta.get("conditions", {}).items():  # the target asked for
        row[f"condition_{key}"] = value
    for key, value in wc.meta.get("predicted", {}).items():  # a predictor's value (steering)
        row[f"predicted_{key}"] = round(float(value), 4)
    for key, value in (loglik or {}).items():
        row[f"loglik_{key}"] = round(float(value), 4)
    return row


@dataclass
class RenderedSamples:
    """Crystals made into the text of a sample folder (summary rows, CIFs, extxyz frames), so
    that worker processes can render chunks and one process only writes files."""

    rows: list[dict]
    cifs: list[str]
    extxyz: str


def render_samples(
    crystals: list[WyckoffCrystal],
    loglik: dict[str, list[float]] | None = None,
    start: int = 0,
) -> RenderedSamples:
    """The summary rows, CIF texts and extxyz frames of crystals numbered from ``start``."""
    from ase import Atoms
    from ase.io import write as ase_write

    rows, cifs, atoms = [], [], []
    for k, wc in enumerate(crystals):
        i = start + k
        cell = Cell.of(wc)
        row = summary_row(i, wc, cell, {key: v[k] for key, v in (loglik or {}).items()})
        cifs.append(wyckoff_cif(wc, f"{i:05d}_{row['formula']}"))
        rows.append(row)
        at = Atoms(
            numbers=cell.numbers, positions=cell.frac @ cell.matrix, cell=cell.matrix, pbc=True
        )
        at.info.update(spacegroup=wc.spacegroup, formula=row["formula"])
        atoms.append(at)
    frames = io.StringIO()
    if atoms:
        ase_write(frames, atoms, format="extxyz")
    return RenderedSamples(rows, cifs, frames.getvalue())


class SampleFolderWriter:
    """Writes a sample folder from rendered chunks as they arrive, in any order: each chunk's
    CIFs at once, the extxyz frames in chunk order (a chunk that comes early waits), summary.csv
    on ``close``; so a large run holds only the summary rows and the chunks not yet written."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        (self.out / "cif").mkdir(parents=True, exist_ok=True)
        self.rows: dict[int, list[dict]] = {}
        self.waiting: dict[int, str] = {}
        self.next = 0
        self.frames = open(self.out / "samples.extxyz", "w")  # noqa: SIM115 (closed in close)

    def add(self, k: int, part: RenderedSamples) -> None:
        """Chunk number ``k`` (0, 1, ...)."""
        for row, text in zip(part.rows, part.cifs, strict=True):
            (self.out / row["cif"]).write_text(text)
        self.rows[k] = part.rows
        self.waiting[k] = part.extxyz
        while self.next in self.waiting:
            self.frames.write(self.waiting.pop(self.next))
            self.next += 1

    def rows_in_order(self) -> list[dict]:
        return [row for k in sorted(self.rows) for row in self.rows[k]]

    def close(self) -> Path:
        if self.waiting:
            raise ValueError(f"chunks missing before chunk {min(self.waiting)}")
        self.frames.close()
        rows = self.rows_in_order()
        asked = sorted(
            {k for row in rows for k in row if k.startswith(("condition_", "predicted_"))}
        )
        loglik = [k for k in (rows[0] if rows else {}) if k.startswith("loglik_")]
        with open(self.out / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*SUMMARY_FIELDS, *asked, *loglik])
            w.writeheader()
            w.writerows(rows)
        return self.out


def write_rendered(parts: list[RenderedSamples], out_dir: str | Path) -> Path:
    """Write ``cif/crystal_00000.cif`` ..., ``samples.extxyz`` and ``summary.csv`` from rendered
    chunks, in order; returns the folder."""
    writer = SampleFolderWriter(out_dir)
    for k, part in enumerate(parts):
        writer.add(k, part)
    return writer.close()


def write_samples(
    crystals: list[WyckoffCrystal],
    out_dir: str | Path,
    loglik: dict[str, list[float]] | None = None,
) -> Path:
    """Write ``crystal_00000.cif`` ... (CIFs carry the space group and symmetry-distinct sites),
    ``samples.extxyz`` and ``summary.csv``; returns the folder."""
    return write_rendered([render_samples(crystals, loglik)], out_dir)
