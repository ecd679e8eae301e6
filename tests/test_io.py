import spglib
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_gpt import decode, encode
from crystal_gpt.sampling.output import wyckoff_cif
from crystal_gpt.testing import random_crystal


def test_wyckoff_cif_reads_back_in_every_space_group():
    """The CIF written from the representation gives back the crystal and its group."""
    matcher = StructureMatcher()
    bad = []
    for g in range(1, 231):
        wc = encode(random_crystal(g, seed=1000 + g))
        s = Structure.from_str(wyckoff_cif(wc), fmt="cif")
        ds = spglib.get_symmetry_dataset((s.lattice.matrix, s.frac_coords, s.atomic_numbers), 1e-3)
        if len(s) != wc.num_atoms or ds.number != wc.spacegroup or not matcher.fit(s, decode(wc)):
            bad.append(g)
    assert not bad
    text = wyckoff_cif(encode(random_crystal(194, seed=1)))
    assert "_symmetry_Int_Tables_number   194" in text and "_atom_site_Wyckoff_symbol" in text


def test_chunks_rendered_apart_write_the_same_folder_as_one_run(tmp_path):
    """The chunked sample path renders chunks in workers and writes them together: the folder
    must be byte for byte the one a single render of all the crystals writes."""
    from crystal_gpt.sampling.output import render_samples, write_rendered, write_samples

    crystals = [encode(random_crystal(g, seed=g)) for g in (225, 194, 62, 2, 166)]
    for k, c in enumerate(crystals):
        c.meta["redraws"] = k
    loglik = {"total": [-1.5, -2.25, 3.0, 0.5, -7.125], "g": [0.1, 0.2, 0.3, 0.4, 0.5]}
    whole = write_samples(crystals, tmp_path / "whole", loglik)
    parts = [
        render_samples(crystals[:2], {k: v[:2] for k, v in loglik.items()}, 0),
        render_samples(crystals[2:], {k: v[2:] for k, v in loglik.items()}, 2),
    ]
    apart = write_rendered(parts, tmp_path / "apart")
    names = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert len(names) == 7  # 5 CIFs, samples.extxyz, summary.csv
    assert names == sorted(p.relative_to(apart) for p in apart.rglob("*") if p.is_file())
    for name in names:
        assert (whole / name).read_bytes() == (apart / name).read_bytes(), name
    # chunks arriving out of order (workers finish when they finish): the same folder
    from crystal_gpt.sampling.output import SampleFolderWriter

    writer = SampleFolderWriter(tmp_path / "late")
    writer.add(1, parts[1])
    writer.add(0, parts[0])
    late = writer.close()
    for name in names:
        assert (whole / name).read_bytes() == (late / name).read_bytes(), name
