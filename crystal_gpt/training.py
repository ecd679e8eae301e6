"""Maximum-likelihood training: configs and presets, the loop, checkpoints, logs, DDP.

One function, ``train``, runs on one process or under ``torchrun`` (DistributedDataParallel;
gloo on CPU, nccl on GPU): each rank takes every world_size-th batch, gradients are averaged,
rank 0 validates, logs and writes checkpoints. Resuming restores model, optimiser, schedule,
step, early-stopping state and RNG, so an interrupted run continues as if never stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from crystal_gpt.data.batching import PaddedCrystals, bucketed_batches
from crystal_gpt.data.cache import EncodedDataset, encode_dataset
from crystal_gpt.data.geometry import training_element_volumes, training_pair_distances
from crystal_gpt.model.checkpoints import load_model as load_model  # the one loader
from crystal_gpt.model.checkpoints import read_checkpoint
from crystal_gpt.model.config import ModelConfig, check_number
from crystal_gpt.model.distributions import (
    element_count_histogram,
    lattice_statistics,
    spacegroup_prior,
)
from crystal_gpt.model.transformer import PARTS, CrystalGPT
from crystal_gpt.utils import atomic_path, fmt

PRESETS = ("tiny", "small", "large")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    dataset: str = "mp_20"
    train_split: str = "train"
    val_split: str = "holdout"
    symprec: float = 0.01
    epochs: int = 200
    batch_size: int = 128
    max_tokens: int | None = None
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    patience: int = 20  # epochs without hold-out improvement before stopping
    # exponential moving average of the weights (0: off): validated, saved and sampled in place
    # of the last step's weights; a cheap ensemble that generalises better on small datasets
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # or "bf16": the transformer blocks under autocast (GPU training)
    threads: int | None = None
    limit: int | None = None  # first N training crystals (tests, quick looks)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        model = d.pop("model", {}) or {}
        mknown = {f.name for f in dataclasses.fields(ModelConfig)}
        if set(model) - mknown:
            raise ValueError(f"unknown model settings: {sorted(set(model) - mknown)}")
        cfg = cls(**d, model=ModelConfig(**model))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every setting of the right type and in range, named in the error (before any work:
        ``batch_size=0`` would otherwise loop forever, ``lr='abc'`` fail deep in the optimiser)."""
        ints = {"epochs": 1, "batch_size": 1, "warmup_steps": 0, "patience": 1, "seed": 0}
        optional_ints = {"max_tokens": 1, "threads": 1, "limit": 1}
        floats = {
            "lr": 0.0,
            "min_lr_ratio": 0.0,
            "weight_decay": 0.0,
            "grad_clip": 0.0,
            "ema_decay": 0.0,
        }
        for name, low in ints.items():
            check_number(name, getattr(self, name), low, int)
        for name, low in optional_ints.items():
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low, int)
        for name, low in floats.items():
            check_number(name, getattr(self, name), low, float)
        if not self.lr > 0:
            raise ValueError(f"setting lr={self.lr!r} must be positive")
        check_number("symprec", self.symprec, 0.0, float)
        if not self.symprec > 0:
            raise ValueError(f"setting symprec={self.symprec!r} must be positive")
        if not self.ema_decay < 1:
            raise ValueError(f"setting ema_decay={self.ema_decay!r} must be below 1 (0: off)")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"setting precision={self.precision!r}: one of {', '.join(PRECISIONS)}"
            )
        for name in ("dataset", "train_split", "val_split", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"setting {name}={getattr(self, name)!r} must be a name (text)")
        self.model.validate()


def preset_path(name: str) -> Path:
    return Path(str(resources.files("crystal_gpt") / "configs" / f"{name}.toml"))


def load_config(
    preset: str | None = None, path: str | os.PathLike | None = None, overrides: list[str] = ()
) -> TrainConfig:
    """A preset, then a user TOML/JSON file on top, then ``key=value`` overrides
    (``model.d_model=128``)."""
    data: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        data = _merge(data, tomllib.loads(preset_path(preset).read_text()))
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no such config file: {p}")
        text = p.read_text()
        try:
            data = _merge(data, json.loads(text) if p.suffix == ".json" else tomllib.loads(text))
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot parse config {p}: {err}") from err
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return TrainConfig.from_dict(data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- helpers
def pick_device(name: str) -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:1', 'mps'; a device this machine
    lacks is a one-line error, not a failure deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA GPU (try cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


@torch.no_grad()
def evaluate_nll(
    model: CrystalGPT,
    data: PaddedCrystals,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Mean negative log-likelihood in nats: per crystal (total and per part) and per atom."""
    was_training = model.training
    model.eval()
    sums = {p: 0.0 for p in (*PARTS, "total")}
    atoms = 0.0
    batches = bucketed_batches(data.n, batch_size)
    for idx in tqdm(batches, desc="nll", disable=not progress, file=sys.stderr, leave=False):
        out = model(data.batch(idx, device))
        for p in sums:
            sums[p] -= float(out[p].sum())
        atoms += float(data.num_atoms[idx].sum())
    model.train(was_training)
    n = len(data)
    result = {f"nll_{p}": v / n for p, v in sums.items()}
    result["nll_per_atom"] = sums["total"] / atoms
    result["crystals"] = n
    return result


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    # a rank that fails must not leave the others waiting for the default half hour
    timeout = datetime.timedelta(seconds=int(os.environ.get("CRYSTAL_GPT_DDP_TIMEOUT", "600")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return True


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # a crash mid-write never corrupts the previous checkpoint
        torch.save(state, tmp)


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current step, write a checkpoint
    (mid-epoch too), then stop; a second signal interrupts at once. Handlers are installed only
    in the main thread (where Python delivers signals) and restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step, with a checkpoint (again: at once)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, distributed: bool, device: torch.device) -> bool:
        """Whether to stop now; under DDP every rank stops at the same step (any rank asked)."""
        if not distributed:
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    summary: dict  # epochs run, best epoch and hold-out NLL, the last log row (rank 0 only)
    model: CrystalGPT  # the model as it is at the end (not necessarily the best checkpoint)
    interrupted: bool = False  # stopped by a signal: last.pt resumes at the step it stopped


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    train_data: EncodedDataset | None = None,
    val_data: EncodedDataset | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a model; returns it with the summary (also written to ``out/summary.json``).

    ``stop_after`` ends this invocation after that many epochs (resume later with
    ``resume=True``); the schedule still spans ``cfg.epochs``. Ctrl-C or SIGTERM end it after
    the current step with a checkpoint from which ``resume=True`` goes on at the next step
    (the result says ``interrupted``).
    """
    out = Path(out)
    device = pick_device(cfg.device)
    distributed = _init_distributed(device)
    rank, world = _dist_info()
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    is_main = rank == 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and last_path.exists():
            raise ValueError(f"{out} already holds a run; pass --resume or choose another --out")
        if resume and not last_path.exists():
            raise ValueError(f"--resume: {out} holds no checkpoint (last.pt) to resume from")
    # read once, before any dataset work: a finished run has nothing to resume
    ck = read_checkpoint(last_path, map_location=device) if resume and last_path.exists() else None
    if ck is not None:
        done = ck["state"]
        if done["epoch"] >= cfg.epochs or done["bad_epochs"] >= cfg.patience:
            raise ValueError(
                f"--resume: the run in {out} is finished (epoch {done['epoch']} of {cfg.epochs}"
                f"{', stopped early' if done['bad_epochs'] >= cfg.patience else ''}): nothing to "
                "resume (raise --epochs or patience to go on, or start a new --out)"
            )
    if is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    torch.manual_seed(cfg.seed)
    if train_data is None:
        train_data = encode_dataset(
            cfg.dataset, cfg.train_split, symprec=cfg.symprec, progress=progress and is_main
        )
    if val_data is None:
        val_data = encode_dataset(
            cfg.dataset, cfg.val_split, symprec=cfg.symprec, progress=progress and is_main
        )
    for label, data in (("training", train_data), ("hold-out", val_data)):
        if data.errors and is_main:  # said, not silently dropped
            print(
                f"{len(data.errors)} {label} row(s) could not be encoded and are left out; "
                f"first: {data.errors[0]}",
                file=sys.stderr,
            )
    if cfg.limit:
        train_data = train_data.select(np.arange(min(cfg.limit, len(train_data))))
    conditions = list(cfg.model.conditions)
    train_set = PaddedCrystals(train_data, cfg.model.max_sites, conditions)
    val_set = PaddedCrystals(val_data, cfg.model.max_sites, conditions)

    model = CrystalGPT(cfg.model).to(device)
    model.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    mean, std = lattice_statistics(train_set, per_atom=not cfg.model.lattice_first)
    model.lattice.mean.copy_(mean)
    model.lattice.std.copy_(std)
    model.set_training_range(train_data.species, train_set.g, train_set.num_atoms)
    model.set_condition_stats(train_set.conditions)
    model.pair_min_distance.copy_(torch.as_tensor(training_pair_distances(train_set)))
    model.element_counts.copy_(element_count_histogram(train_set.a, len(model.element_counts)))
    if cfg.model.volume_features:
        model.element_volume.copy_(torch.as_tensor(training_element_volumes(train_set)))
    with torch.no_grad():
        model.g_prior.copy_(spacegroup_prior(train_set.g))
    # the histogram is P(g | nothing given) exactly: not for the optimiser to move
    model.g_prior.requires_grad_(not cfg.model.g_marginal_histogram)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    n_batches = len(bucketed_batches(train_set.n, cfg.batch_size, None, cfg.max_tokens))
    # every rank takes the same number of steps (DDP all-reduces each one); the remainder waits
    steps_per_epoch = n_batches // world if world > 1 else n_batches
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} crystals make fewer batches than the {world} ranks")
    total_steps = steps_per_epoch * cfg.epochs
    state = {"epoch": 0, "step": 0, "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0}
    # with the average on, a checkpoint's "model" holds the averaged weights (what inference
    # loads) and "train_weights" the optimiser's own
    if ck is not None:
        model.load_weights(ck["model"])
    ema = None
    if cfg.ema_decay:
        ema = WeightAverage(model, cfg.ema_decay, ck["state"]["step"] if ck is not None else 0)
    if ck is not None:
        model.load_weights(ck.get("train_weights", ck["model"]))
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ck:  # dropout draws on the GPU resume too
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
    ddp_model = (
        # a batch uses only the lattice flows of its crystal systems: the others get no gradient
        torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
        if distributed
        else model
    )
    log_path = out / "log.csv"
    fields = [
        "epoch",
        "step",
        "lr",
        "train_nll",
        "crystals_per_s",
        "tokens_per_s",
        "seconds",
        *[f"val_nll_{p}" for p in (*PARTS, "total")],
        "val_nll_per_atom",
    ]
    if is_main and not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    writer = _tensorboard(out) if is_main else None

    summary: dict = {}
    model.train()
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, state["epoch"] + stop_after)

    def checkpoint() -> dict:
        weights = model.state_dict()
        if ema is not None:  # a copy: swapping back restores the training weights in place
            with ema.swapped(model):
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {
            "model": weights,
            **({"train_weights": model.state_dict()} if ema is not None else {}),
            "optimizer": opt.state_dict(),
            "state": state,
            "config": cfg.to_dict(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "train_crystals": len(train_set),
        }

    state.setdefault("batch", 0)  # steps done in the current epoch (a mid-epoch checkpoint)
    interrupted = False
    with _StopRequest() as stop:
        while state["epoch"] < last_epoch and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]
            rng = np.random.default_rng([cfg.seed, epoch])
            batches = bucketed_batches(train_set.n, cfg.batch_size, rng, cfg.max_tokens)
            mine = batches[rank::world][:steps_per_epoch]
            t0 = time.perf_counter()
            total_loss, seen, tokens = 0.0, 0, 0
            halt = False
            bar = tqdm(
                mine[state["batch"] :],  # a mid-epoch checkpoint goes on at its next step
                initial=state["batch"],
                total=len(mine),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not (progress and is_main),
                file=sys.stderr,
                leave=False,
            )
            for idx in bar:
                lr = lr_at(state["step"], cfg, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = train_set.batch(idx, device)
                nll = -ddp_model(batch)["total"]
                loss = nll.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if ema is not None:
                    ema.update(model)
                state["step"] += 1
                state["batch"] += 1
                total_loss += float(nll.detach().sum())
                seen += len(idx)
                tokens += int(train_set.n[idx].sum() + len(idx))
                bar.set_postfix(nll=f"{total_loss / seen:.2f}")
                halt = stop.agreed(distributed, device)
                if halt:
                    break
            if halt and state["batch"] < len(mine):  # stopped mid-epoch
                if is_main:
                    save_checkpoint(last_path, checkpoint())
                interrupted = True
                break
            seconds = time.perf_counter() - t0
            state["epoch"] += 1
            state["batch"] = 0
            if is_main:
                # the weights saved for inference are the ones validated
                with ema.swapped(model) if ema is not None else nullcontext():
                    val = evaluate_nll(model, val_set, device=device)
                improved = val["nll_total"] < state["best_val"] - 1e-4
                if improved:
                    state.update(best_val=val["nll_total"], best_epoch=state["epoch"], bad_epochs=0)
                else:
                    state["bad_epochs"] += 1
            if distributed:  # every rank follows rank 0's early-stopping decision
                # on the process group's device: NCCL only moves CUDA tensors
                flag = torch.tensor([state["bad_epochs"]], dtype=torch.long, device=device)
                dist.broadcast(flag, 0)
                state["bad_epochs"] = int(flag)
            if not is_main:
                if halt:
                    interrupted = True
                    break
                continue
            row = {
                "epoch": state["epoch"],
                "step": state["step"],
                "lr": lr,
                "train_nll": total_loss / max(seen, 1),
                "crystals_per_s": seen * world / seconds,
                "tokens_per_s": tokens * world / seconds,
                "seconds": seconds,
                **{f"val_nll_{p}": val[f"nll_{p}"] for p in (*PARTS, "total")},
                "val_nll_per_atom": val["nll_per_atom"],
            }
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([fmt(row[k], ".6g", missing="nan") for k in fields])
            if writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "step"):
                        writer.add_scalar(k, v, state["step"])
            ck = checkpoint()
            save_checkpoint(last_path, ck)
            if improved:
                save_checkpoint(best_path, {**ck, "val": val})
            if progress:
                print(
                    f"epoch {state['epoch']}: train nll {row['train_nll']:.3f}, hold-out nll "
                    f"{val['nll_total']:.3f} ({val['nll_per_atom']:.3f}/atom), "
                    f"{row['crystals_per_s']:.0f} crystals/s",
                    file=sys.stderr,
                )
            summary = {
                "epochs": state["epoch"],
                "best_epoch": state["best_epoch"],
                "best_val_nll": state["best_val"],
                "last": row,
            }
            if halt:
                interrupted = True
                break
    if distributed:
        dist.barrier()
    if is_main:
        if writer is not None:
            writer.close()
        plot_losses(log_path, out / "loss.png")
        if summary:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if distributed:
        dist.destroy_process_group()
    if ema is not None:  # the returned model is the one saved: the average
        ema.copy_to(model)
    return TrainResult(summary, model, interrupted)


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) over the updates t, so the first
    steps' random weights do not linger. ``swapped`` puts the average into the model for a
    block (validation, saving) and the training weights back afterwards.
    """

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0) -> None:
        self.decay = decay
        self.updates = updates
        self.shadow = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module, weights: dict | None = None) -> None:
        """Put ``weights`` (default: the average) into the model's parameters."""
        params = dict(model.named_parameters())
        for n, v in (self.shadow if weights is None else weights).items():
            params[n].copy_(v)

    @contextmanager
    def swapped(self, model: torch.nn.Module):
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            self.copy_to(model, saved)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: the CSV log always exists
        return None
    return SummaryWriter(str(out / "tb"))


def plot_losses(log_path: Path, png: Path) -> None:
    """Train and hold-out NLL per epoch from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [float(r["train_nll"]) for r in rows], label="train")
    ax.plot(ep, [float(r["val_nll_total"]) for r in rows], label="hold-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats per crystal)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
