"""A property predictor on the generator's representation (space group, Wyckoff sites, lattice).

It reads a crystal as the generator writes it, so it scores samples without any conversion:
ranking them, and steering a model toward a target for a property it was not trained on
(``sampling.steering``). A bidirectional transformer over [group + lattice] + sites
regresses one standardised property from the mean over tokens and token 0 (which also carries
the cell's atom and site counts: attention averages, it does not count); trained with the L1
loss (its test MAE is the figure quoted), early-stopped on the hold-out split.

Files: ``{"model": state, "config": {...}, "meta": {...}}`` read weights-only; bundled ones
live in ``crystal_gpt/predictors`` and load by name (``mp_20_band_gap``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
from crystal_gpt.data.cache import EncodedDataset, encode_dataset
from crystal_gpt.model.checkpoints import read_checkpoint
from crystal_gpt.model.config import check_number
from crystal_gpt.model.distributions import LATTICE_EMBED_DIM, lattice_embedding_features
from crystal_gpt.model.layers import SymmetryTensors, fourier, mlp


@dataclass
class PredictorConfig:
    target: str = "band_gap"
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    fourier_freqs: int = 6

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "fourier_freqs"):
            check_number(f"predictor.{name}", getattr(self, name), 1, int)
        check_number("predictor.dropout", self.dropout, 0.0, float)
        if self.d_model % self.n_heads:
            raise ValueError("predictor d_model must be a multiple of n_heads")


class PropertyPredictor(nn.Module):
    def __init__(self, config: PredictorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PredictorConfig()
        c.validate()
        d = c.d_model
        self.sym = SymmetryTensors()
        L1 = self.sym.max_letters + 1
        self.emb_g = nn.Embedding(231, d)
        self.emb_lattice = mlp(LATTICE_EMBED_DIM, d, d)
        self.emb_gw = nn.Embedding(231 * L1, d)
        self.emb_wfeat = nn.Linear(5, d)
        self.emb_elem = nn.Embedding(119, d)
        self.emb_coord = nn.Linear(3 * 2 * c.fourier_freqs, d)
        self.emb_size = nn.Linear(2, d)  # log atoms and log sites: attention averages, not counts
        layer = nn.TransformerEncoderLayer(
            d, c.n_heads, c.d_ff, c.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = mlp(2 * d, d, 1)  # the mean over tokens and token 0
        self.register_buffer("target_stats", torch.tensor([0.0, 1.0]))  # mean, std

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Predicted property (B,) in its own units."""
        g, w, a, x, n = batch["g"], batch["w"], batch["a"], batch["x"], batch["n"]
        gb = g.unsqueeze(-1).expand_as(w)
        L1 = self.sym.max_letters + 1
        sites = (
            self.emb_gw(gb * L1 + w)
            + self.emb_wfeat(self.sym.site_features(gb, w))
            + self.emb_elem(a)
            + self.emb_coord(fourier(x, self.config.fourier_freqs))
        )
        size = torch.stack([batch["num_atoms"].float().log(), n.float().log()], -1)
        head = (
            self.emb_g(g)
            + self.emb_lattice(lattice_embedding_features(batch["lattice"]))
            + self.emb_size(size)
        )
        h = torch.cat([head.unsqueeze(1), sites], dim=1)
        steps = torch.arange(w.shape[1] + 1, device=g.device)
        pad = steps.unsqueeze(0) > n.unsqueeze(1)  # token 0 and the n sites are real
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).float().unsqueeze(-1)
        pooled = torch.cat([(h * keep).sum(1) / keep.sum(1), h[:, 0]], -1)
        mean, std = self.target_stats
        return self.head(pooled).squeeze(-1) * std + mean

    @torch.no_grad()
    def predict_crystals(self, crystals: list, batch_size: int = 512) -> np.ndarray:
        """Predictions for WyckoffCrystals (e.g. samples), in their order."""
        data = PaddedCrystals(EncodedDataset.from_crystals(crystals))
        return self.predict(data, batch_size)

    @torch.no_grad()
    def predict(self, data: PaddedCrystals, batch_size: int = 512) -> np.ndarray:
        was = self.training
        self.eval()
        device = self.target_stats.device
        out = np.zeros(len(data), dtype=np.float64)
        for idx in bucketed_batches(data.n, batch_size):
            out[idx] = self(data.batch(idx, device)).double().cpu().numpy()
        self.train(was)
        return out


def _predictors_dir() -> Path:
    return Path(str(resources.files("crystal_gpt") / "predictors"))


def list_predictors() -> dict[str, dict]:
    out = {}
    for path in sorted(_predictors_dir().glob("*.pt")):
        state = read_checkpoint(path)
        out[path.stem] = {**state.get("meta", {}), "file": str(path)}
    return out


def load_predictor(name_or_path: str | os.PathLike, device: str = "cpu") -> PropertyPredictor:
    """A predictor file or run folder (its best.pt), or a bundled one by name; weights only."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        path = _predictors_dir() / f"{name_or_path}.pt"
    if not path.is_file():
        names = ", ".join(list_predictors()) or "none"
        raise FileNotFoundError(
            f"no predictor {str(name_or_path)!r}: not a file, nor a bundled one (bundled: {names})"
        )
    try:
        state = read_checkpoint(path)  # weights only: a file that would run code is refused
        config = PredictorConfig(**state["config"])
        model = PropertyPredictor(config)
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # wrong keys, shapes
        raise ValueError(f"{path}: not a readable crystal-gpt predictor ({err})") from None
    model.meta = state.get("meta", {})
    return model.to(device).eval()


def _labelled(ds: EncodedDataset, target: str) -> PaddedCrystals:
    data = PaddedCrystals(ds, conditions=[target])
    keep = np.isfinite(data.conditions[target])
    if not keep.all():
        data = PaddedCrystals(ds.select(np.nonzero(keep)[0]), conditions=[target])
    return data


def mean_absolute_error(model: PropertyPredictor, data: PaddedCrystals, target: str) -> float:
    pred = model.predict(data)
    return float(np.mean(np.abs(pred - data.conditions[target])))


def train_predictor(
    dataset: str,
    target: str,
    out: str | os.PathLike,
    *,
    config: PredictorConfig | None = None,
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    patience: int = 10,
    seed: int = 0,
    train_data: EncodedDataset | None = None,
    val_data: EncodedDataset | None = None,
    test_data: EncodedDataset | None = None,
    progress: bool = True,
) -> dict:
    """Train a predictor of column ``target`` of a dataset (protocol splits train / holdout,
    test MAE at the end); writes ``out/best.pt`` and ``out/summary.json``; returns the summary."""
    config = config or PredictorConfig(target=target)
    config.target = target
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, given in (("train", train_data), ("holdout", val_data), ("test", test_data)):
        ds = given if given is not None else encode_dataset(dataset, name, progress=progress)
        splits[name] = _labelled(ds, target)
    train_set = splits["train"]
    y = train_set.conditions[target]
    model = PropertyPredictor(config)
    model.target_stats.copy_(torch.tensor([float(y.mean()), float(y.std()) or 1.0]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = len(bucketed_batches(train_set.n, batch_size))
    total = epochs * n_batches
    best, best_epoch, bad, step = math.inf, -1, 0, 0
    log = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        batches = bucketed_batches(train_set.n, batch_size, rng)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
            for group in opt.param_groups:  # cosine decay to 5%
                group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))
            batch = train_set.batch(idx)
            std = model.target_stats[1]
            loss = (model(batch) - batch[f"cond:{target}"]).abs().mean() / std
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
        val_mae = mean_absolute_error(model, splits["holdout"], target)
        log.append(
            {
                "epoch": epoch + 1,
                "train_l1_std": loss_sum / len(train_set),
                "holdout_mae": val_mae,
                "seconds": time.perf_counter() - t0,
            }
        )
        if progress:
            print(f"epoch {epoch + 1}: hold-out MAE {val_mae:.4f}", file=sys.stderr)
        if val_mae < best:
            best, best_epoch, bad = val_mae, epoch + 1, 0
            _save(model, out / "best.pt", {"dataset": dataset, "target": target})
        else:
            bad += 1
            if bad >= patience:
                break
    model = load_predictor(out / "best.pt")
    test_mae = mean_absolute_error(model, splits["test"], target)
    baseline = float(np.mean(np.abs(splits["test"].conditions[target] - np.median(y))))
    summary = {
        "dataset": dataset,
        "target": target,
        "train_crystals": len(train_set),
        "best_epoch": best_epoch,
        "holdout_mae": best,
        "test_mae": test_mae,
        "test_crystals": len(splits["test"]),
        "test_mae_of_the_training_median": baseline,
        "log": log,
    }
    _save(model, out / "best.pt", {k: v for k, v in summary.items() if k != "log"})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _save(model: PropertyPredictor, path: Path, meta: dict) -> None:
    from crystal_gpt.utils import atomic_path

    with atomic_path(path, ".pt") as tmp:
        torch.save({"model": model.state_dict(), "config": asdict(model.config), "meta": meta}, tmp)


def export_predictor(run_dir: str | os.PathLike, name: str) -> Path:
    """Bundle a predictor run's best.pt (float16 weights) as crystal_gpt/predictors/NAME.pt."""
    state = read_checkpoint(Path(run_dir) / "best.pt")
    keep32 = {"target_stats"}
    state["model"] = {
        k: v.half() if v.is_floating_point() and k not in keep32 else v
        for k, v in state["model"].items()
    }
    path = _predictors_dir() / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
