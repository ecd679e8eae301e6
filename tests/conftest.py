import warnings

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's cache from tests."""
    monkeypatch.setenv("CRYSTAL_GPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _quiet_pymatgen():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pymatgen")
        yield
