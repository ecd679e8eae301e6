import warnings

import pytest
import torch

from crystal_gpt import encode_dataset
from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.model.distributions import lattice_statistics
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.training import load_config


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's cache from tests."""
    monkeypatch.setenv("CRYSTAL_GPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _quiet_pymatgen():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pymatgen")
        yield


@pytest.fixture(scope="module")
def model() -> CrystalGPT:
    """An untrained tiny model with carbon_24 lattice statistics: fast, and every sampler path
    (masks, caches, lattices) is exercised as with a trained one."""
    torch.manual_seed(0)
    m = CrystalGPT(load_config("tiny").model)
    data = PaddedCrystals(encode_dataset("carbon_24", "holdout", workers=1, progress=False))
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(data)
    return m.eval()


@pytest.fixture(scope="module")
def encoded():
    """The first 1,000 mp_20 training crystals, encoded."""
    return encode_dataset("mp_20", "train_first1000", workers=2, progress=False)


@pytest.fixture(scope="module")
def data(encoded) -> PaddedCrystals:
    return PaddedCrystals(encoded)


def tiny_lattice_first(data: PaddedCrystals, seed: int, **options: bool) -> CrystalGPT:
    """An untrained tiny lattice-first model with these ``model.*`` options, its lattice flow
    scaled to ``data`` (in eval mode: callers sharpen heads under no_grad as they need);
    ``lattice_first=False`` among the options gives another order."""
    torch.manual_seed(seed)
    cfg = load_config("tiny").model
    cfg.lattice_first = True
    for name, value in options.items():
        setattr(cfg, name, value)
    m = CrystalGPT(cfg)
    m.lattice.mean[:], m.lattice.std[:] = lattice_statistics(data, per_atom=not cfg.lattice_first)
    return m.eval()
