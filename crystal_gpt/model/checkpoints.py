"""Bundled models: small weights shipped in the package, loaded by name or from any checkpoint.

A bundled model file is a float16 state dict with its config and a record of how it was made
(training data and protocol, epochs, test NLL); ``python -m crystal_gpt.model.checkpoints export RUN
NAME`` writes one from a training run's ``best.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path

import torch

from crystal_gpt.data.batching import PaddedCrystals
from crystal_gpt.data.cache import encode_dataset
from crystal_gpt.data.geometry import training_pair_distances
from crystal_gpt.model.config import ModelConfig
from crystal_gpt.model.distributions import element_count_histogram, spacegroup_prior
from crystal_gpt.model.transformer import CrystalGPT
from crystal_gpt.utils import atomic_path

DEFAULT_MODEL = "mp_20"
# kept in float32 in bundled files: a condition mean of -154 would lose 0.1 in float16, and
# counts of training crystals pass float16's 65,504, and the fitted element volumes set the
# fill the heads read (float16 would round Cs's 53.3 A^3 by 0.03)
FULL_PRECISION = ("condition_stats", "element_counts", "element_volume")


def _models_dir() -> Path:
    return Path(str(resources.files("crystal_gpt") / "models"))


def _first_line(err: BaseException) -> str:
    """An exception as one short line for an error message."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint's contents without running code: torch's weights-only unpickler accepts
    tensors, numbers, strings and containers only, so a file crafted to execute something on
    load is refused (with this message) instead of run."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (truncated zip), EOFError ...
        raise ValueError(
            f"{path}: not a readable crystal-gpt checkpoint (only weights-only files load: "
            f"{_first_line(err)})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a crystal-gpt checkpoint (no model weights in it)")
    return state


def _plain(obj, where: str):
    """``obj`` with NumPy values, paths and dataclasses turned into what the weights-only
    loader accepts (tensors, numbers, strings, containers); anything else is refused."""
    import dataclasses

    import numpy as np

    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor | torch.Size):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise ValueError(f"{where}: a {type(obj).__name__} cannot be stored weights-only")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rewrite a checkpoint that only a full unpickler reads (from before weights-only loading)
    as one that :func:`read_checkpoint` accepts. Reading ``src`` runs its pickle, so this is
    for files whose origin you trust; the result is checked by loading it weights-only."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint")
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new file name")
    try:
        state = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{src}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{src}: not a crystal-gpt checkpoint (no model weights in it)")
    torch.save(_plain(state, src.name), dst)
    read_checkpoint(dst)
    return dst


def list_models() -> dict[str, dict]:
    """Bundled models: name -> metadata (training data, parameters, test NLL, file size)."""
    out = {}
    for path in sorted(_models_dir().glob("*.pt")):
        meta = read_checkpoint(path).get("meta", {})
        out[path.stem] = {**meta, "file": str(path), "size_mb": path.stat().st_size / 1e6}
    return out


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu"
) -> CrystalGPT:
    """The one checkpoint loader: a training run's folder (its ``best.pt``, else ``last.pt``), a
    training checkpoint, a bundled model file, or a bundled model by name (``crystal-gpt
    models``)."""
    path = Path(name_or_path)
    if path.is_dir():
        found = [path / n for n in ("best.pt", "last.pt") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: a folder without best.pt or last.pt (not a run)")
        path = found[0]
    if not path.is_file():
        path = _models_dir() / f"{name_or_path}.pt"
    if not path.is_file():
        names = ", ".join(list_models()) or "none"
        raise FileNotFoundError(
            f"no model {str(name_or_path)!r}: not a file, nor a bundled model (bundled: {names})"
        )
    state = read_checkpoint(path)
    try:
        cfg = state["config"]["model"] if "config" in state else state["model_config"]
        config = ModelConfig(**cfg)
        config.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: the checkpoint's model settings are unusable ({err})") from None
    model = CrystalGPT(config)
    try:
        # bundled weights are float16: back to float32 (a no-op for a training checkpoint)
        weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
        bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
        if not bad:
            model.load_weights(weights)
    except (AttributeError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{path}: the weights do not fit their model settings ({_first_line(err)})"
        ) from None
    if bad:  # a damaged file: every draw would fail, or be NaN
        raise ValueError(f"{path}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]})")
    model.meta = state.get("meta", {"file": str(path)})
    if "dataset" not in model.meta and isinstance(state.get("config"), dict):
        # a training checkpoint: its run's dataset (novelty sets, default predictors follow it)
        model.meta["dataset"] = state["config"].get("dataset")
    return model.to(device).eval()


def export(run_dir: str | Path, name: str, extra: dict | None = None) -> Path:
    """Bundle a run's best checkpoint as float16 weights under crystal_gpt/models/NAME.pt."""
    run = Path(run_dir)
    ck = read_checkpoint(run / "best.pt")
    cfg = ck["config"]
    # P(g) has parameters of its own: its maximum-likelihood value is the smoothed training
    # histogram, whatever the optimiser reached (runs before that initialisation reached little)
    # (not for a conditioned model, whose P(g | condition) adds a learned term to g_prior)
    state = dict(ck["model"])
    conditioned = cfg["model"].get("conditions") or cfg["model"].get("condition_on_composition")
    train = encode_dataset(
        cfg["dataset"], cfg["train_split"], symprec=cfg["symprec"], progress=False
    )
    if not conditioned:
        state["g_prior"] = spacegroup_prior(train.spacegroup)
    if "pair_min_distance" not in state:  # a run from before the distance rule
        pairs = training_pair_distances(PaddedCrystals(train))
        state["pair_min_distance"] = torch.as_tensor(pairs, dtype=torch.float32)
    if "element_counts" not in state or not state["element_counts"].any():  # an older run
        state["element_counts"] = _element_counts(train, cfg["model"])
    weights = {
        k: v.half() if v.is_floating_point() and k not in FULL_PRECISION else v
        for k, v in state.items()
    }
    model = CrystalGPT(ModelConfig(**cfg["model"]))
    meta = {
        "dataset": cfg["dataset"],
        "train_split": cfg["train_split"],
        "val_split": cfg["val_split"],
        "train_crystals": ck.get("train_crystals"),
        "epochs": ck["state"]["epoch"],
        "best_epoch": ck["state"]["best_epoch"],
        "holdout_nll": ck["val"]["nll_total"],
        "parameters": model.num_parameters(),
        "conditions": list(cfg["model"].get("conditions") or {}),
        **(extra or {}),
    }
    out = _models_dir() / f"{name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "model_config": cfg["model"], "meta": meta}, out)
    return out


def _element_counts(train, model_cfg: dict):
    """The training crystals' element-count histogram, sized for the model's buffer."""
    size = model_cfg.get("max_sites", ModelConfig().max_sites) + 1
    return element_count_histogram(PaddedCrystals(train).a, size)


def record_element_counts(name: str) -> Path:
    """Add the training crystals' element-count histogram to a bundled model written before it
    existed (the weights are untouched): re-encodes the training split its metadata names."""
    path = _models_dir() / f"{name}.pt"
    state = read_checkpoint(path)
    meta, cfg = state.get("meta", {}), state["model_config"]
    if not meta.get("dataset") or not meta.get("train_split"):
        raise ValueError(f"{path}: no training data recorded in its metadata")
    train = encode_dataset(meta["dataset"], meta["train_split"], progress=False)
    state["model"]["element_counts"] = _element_counts(train, cfg)
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    tmp.replace(path)  # a bundled model is never left half written
    return path


def histogram_group_prior(src: str | Path, dst: str | Path | None = None) -> Path:
    """Rewrite a conditioned model so that P(g | nothing given) is its training histogram
    (``ModelConfig.g_marginal_histogram``): ``g_prior`` becomes the smoothed histogram of the
    training split its metadata names and the conditions' term is measured from the
    all-absent vector. The other weights are untouched; P(g | conditions) is reweighted by
    histogram / the old P(g | nothing). A bundled name or a file; ``dst`` defaults to it."""
    path = _models_dir() / f"{src}.pt" if not str(src).endswith(".pt") else Path(src)
    state = read_checkpoint(path)
    meta, cfg = state.get("meta", {}), state["model_config"]
    if cfg.get("condition_on_composition"):
        raise ValueError(
            f"{path}: a structure-prediction model always has a composition: its P(g) is never "
            "the unconditional one"
        )
    if not cfg.get("conditions"):
        raise ValueError(f"{path}: not a conditioned model (its P(g) is the histogram already)")
    if cfg.get("g_marginal_histogram"):
        raise ValueError(f"{path}: P(g | nothing given) is the histogram already")
    if not meta.get("dataset") or not meta.get("train_split"):
        raise ValueError(f"{path}: no training data recorded in its metadata")
    train = encode_dataset(meta["dataset"], meta["train_split"], progress=False)
    prior = spacegroup_prior(train.spacegroup)
    state["model"]["g_prior"] = prior.to(state["model"]["g_prior"].dtype)
    state["model_config"] = {**cfg, "g_marginal_histogram": True}
    out = Path(dst) if dst is not None else path
    with atomic_path(out, ".pt") as tmp:  # never left half written
        torch.save(state, tmp)
    return out


USAGE = """usage: python -m crystal_gpt.model.checkpoints export RUN_DIR NAME ['{json extra}']
       python -m crystal_gpt.model.checkpoints element-counts NAME [NAME ...]
       python -m crystal_gpt.model.checkpoints g-histogram NAME|FILE [OUT]"""

if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "export":
        extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
        print(export(sys.argv[2], sys.argv[3], extra))
    elif len(sys.argv) >= 3 and sys.argv[1] == "element-counts":
        for model_name in sys.argv[2:]:
            print(record_element_counts(model_name))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "g-histogram":
        print(histogram_group_prior(*sys.argv[2:]))
    else:
        sys.exit(USAGE)
