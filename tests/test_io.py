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
