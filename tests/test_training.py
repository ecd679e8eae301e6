import csv
import itertools
import json
import os
import re
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp

from crystal_gpt import encode_dataset
from crystal_gpt.cli import main as cli_main
from crystal_gpt.training import TrainConfig, load_config, load_model, lr_at, train


@pytest.fixture(scope="module")
def small_data():
    ds = encode_dataset("carbon_24", "holdout", workers=2, progress=False)
    return ds.select(np.arange(80)), ds.select(np.arange(80, 102))


def tiny(**over) -> TrainConfig:
    return load_config("tiny", overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


def test_presets_and_overrides(tmp_path):
    for name in ("tiny", "small", "large"):
        assert load_config(name).model.d_model > 0
    cfg = load_config("small", overrides=["lr=3e-4", "model.n_layers=6", "dataset=perov_5"])
    assert cfg.lr == 3e-4 and cfg.model.n_layers == 6 and cfg.dataset == "perov_5"
    user = tmp_path / "my.toml"
    user.write_text("batch_size = 7\n[model]\nd_model = 48\n")
    cfg = load_config("tiny", user)
    assert cfg.batch_size == 7 and cfg.model.d_model == 48 and cfg.model.n_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ValueError, match="unknown training settings"):
        load_config("tiny", overrides=["learning_rate=1"])
    with pytest.raises(ValueError, match="unknown model settings"):
        load_config("tiny", overrides=["model.depth=1"])


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_train_writes_logs_checkpoints_and_resumes_exactly(tmp_path, small_data):
    train_ds, val_ds = small_data
    cfg = tiny(epochs=4, seed=3)
    full = train(cfg, tmp_path / "a", train_data=train_ds, val_data=val_ds, progress=False)
    assert full.summary["epochs"] == 4
    for name in ("last.pt", "best.pt", "log.csv", "loss.png", "summary.json", "config.json"):
        assert (tmp_path / "a" / name).exists(), name
    with open(tmp_path / "a" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[-1]["train_nll"]) < float(rows[0]["train_nll"])
    # interrupted after 2 epochs, then resumed: the same parameters as the uninterrupted run
    train(cfg, tmp_path / "b", train_data=train_ds, val_data=val_ds, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, tmp_path / "b", train_data=train_ds, val_data=val_ds, progress=False)
    resumed = train(
        cfg, tmp_path / "b", train_data=train_ds, val_data=val_ds, progress=False, resume=True
    )
    for (k, p), q in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), k
    model = load_model(tmp_path / "a" / "best.pt")
    assert model.config.d_model == cfg.model.d_model
    # nothing to resume: a finished run, a folder without a checkpoint
    with pytest.raises(ValueError, match="is finished"):
        train(cfg, tmp_path / "a", train_data=train_ds, val_data=val_ds, resume=True)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(cfg, tmp_path / "c", train_data=train_ds, val_data=val_ds, resume=True)


def test_weight_average_follows_its_recursion_and_swaps_back():
    from crystal_gpt.training import WeightAverage

    net = torch.nn.Linear(3, 2)
    ema = WeightAverage(net, decay=0.9)
    expect = {n: p.detach().clone() for n, p in net.named_parameters()}
    for t in range(1, 40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        for n, p in net.named_parameters():
            expect[n] = d * expect[n] + (1 - d) * p.detach()
    own = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped(net):
        for n, p in net.named_parameters():
            assert torch.allclose(p, expect[n], atol=1e-6), n
            assert not torch.allclose(p, own[n]), n
    for n, p in net.named_parameters():  # the training weights are back
        assert torch.equal(p, own[n]), n


def test_weight_average_is_validated_saved_and_resumed(tmp_path, small_data):
    from crystal_gpt.data.batching import PaddedCrystals
    from crystal_gpt.model.checkpoints import read_checkpoint
    from crystal_gpt.training import evaluate_nll

    train_ds, val_ds = small_data
    cfg = tiny(epochs=3, seed=4, ema_decay=0.9)
    full = train(cfg, tmp_path / "a", train_data=train_ds, val_data=val_ds, progress=False)
    last = read_checkpoint(tmp_path / "a" / "last.pt")
    # inference weights (the average) differ from the optimiser's, and are what was validated
    val_set = PaddedCrystals(val_ds, cfg.model.max_sites)
    model = load_model(tmp_path / "a" / "last.pt")
    nll = evaluate_nll(model, val_set)["nll_total"]
    with open(tmp_path / "a" / "log.csv") as f:
        logged = float(list(csv.DictReader(f))[-1]["val_nll_total"])
    assert nll == pytest.approx(logged, abs=1e-3)
    model.load_weights(last["train_weights"])
    assert abs(evaluate_nll(model, val_set)["nll_total"] - logged) > 1e-2
    for k, v in full.model.state_dict().items():  # the returned model is the saved average
        assert torch.allclose(v, last["model"][k], atol=1e-6), k
    # interrupted and resumed: the same average and training weights as without the stop
    train(cfg, tmp_path / "b", train_data=train_ds, val_data=val_ds, progress=False, stop_after=1)
    train(cfg, tmp_path / "b", train_data=train_ds, val_data=val_ds, progress=False, resume=True)
    again = read_checkpoint(tmp_path / "b" / "last.pt")
    for key in ("model", "train_weights"):
        for k, v in last[key].items():
            assert torch.allclose(v, again[key][k], atol=1e-6), (key, k)


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(
    tmp_path, small_data, monkeypatch
):
    from crystal_gpt.data.batching import PaddedCrystals
    from crystal_gpt.model.checkpoints import read_checkpoint

    train_ds, val_ds = small_data
    cfg = tiny(epochs=3, seed=3)
    kw = dict(train_data=train_ds, val_data=val_ds, progress=False)
    full = train(cfg, tmp_path / "full", **kw)
    calls = itertools.count(1)
    batch = PaddedCrystals.batch

    def batch_then_ctrl_c(self, idx, device):
        if next(calls) == 5:  # in epoch 2 (3 training batches and 1 hold-out batch per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, idx, device)

    monkeypatch.setattr(PaddedCrystals, "batch", batch_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under `nohup ... &`
    stopped = train(cfg, tmp_path / "run", **kw)
    monkeypatch.undo()
    assert stopped.interrupted
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    state = read_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert state["epoch"] == 1 and 0 < state["batch"] < 3  # mid-epoch
    resumed = train(cfg, tmp_path / "run", resume=True, **kw)
    assert not resumed.interrupted and resumed.summary["epochs"] == 3
    for (k, p), q in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), k


def test_early_stopping(tmp_path, small_data):
    train_ds, val_ds = small_data
    cfg = tiny(epochs=50, patience=2, lr=0.5, warmup_steps=1)  # diverges: stops after 2 bad
    res = train(cfg, tmp_path / "es", train_data=train_ds, val_data=val_ds, progress=False)
    assert res.summary["epochs"] < 50


def _ddp_worker(rank: int, world: int, port: int, out: str, train_ds, val_ds, q) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    res = train(tiny(epochs=2, seed=1), out, train_data=train_ds, val_data=val_ds, progress=False)
    q.put((rank, [p.detach().numpy().copy() for p in res.model.parameters()]))  # by value


def test_ddp_two_cpu_processes(tmp_path, small_data):
    """torchrun-style DDP on two CPU processes (gloo): ranks stay in sync, rank 0 writes."""
    train_ds, val_ds = small_data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = tmp.start_processes(
        _ddp_worker,
        args=(2, port, str(tmp_path / "ddp"), train_ds, val_ds, q),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    got = dict(q.get() for _ in range(2))  # read before joining: a full pipe blocks the writer
    while not procs.join():
        pass
    for p0, p1 in zip(got[0], got[1], strict=True):
        assert np.array_equal(p0, p1)
    with open(tmp_path / "ddp" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and (tmp_path / "ddp" / "best.pt").exists()


def test_cli_train_and_nll(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        cli_main(
            [
                "train",
                "--preset",
                "tiny",
                "--dataset",
                "carbon_24",
                "--limit",
                "64",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert "best hold-out NLL" in capsys.readouterr().out
    from crystal_gpt.model.checkpoints import load_model

    # a training checkpoint knows its dataset (novelty sets and default predictors follow it)
    assert load_model(out / "best.pt").meta["dataset"] == "carbon_24"
    assert (
        cli_main(
            [
                "nll",
                str(out / "best.pt"),
                "--dataset",
                "carbon_24",
                "--split",
                "holdout",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["crystals"] == 102 and np.isfinite(res["nll_total"])
    assert cli_main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", "batch_size=0 must be a whole number >= 1"),
        ("lr=abc", "lr='abc' must be a number"),
        ("model.d_model=33", "must be a multiple of model.n_heads"),
        ("epochs=0", "epochs=0 must be a whole number >= 1"),
        ("epochs=-1", "epochs=-1"),
        ("limit=0", "limit=0"),
        ("model.dropout=1.5", "must be below 1"),
        ('precision="fp16"', "precision='fp16': one of fp32, bf16"),
        ("ema_decay=1", "ema_decay=1 must be below 1"),
        ("ema_decay=-0.5", "ema_decay=-0.5"),
    ],
)
def test_bad_settings_are_named_before_any_work(override, message, tmp_path):
    from crystal_gpt.cli import main as cli_main
    from crystal_gpt.training import load_config

    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", None, [override])
    assert cli_main(["train", "--preset", "tiny", "--out", str(tmp_path), "--set", override]) == 2
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_device_this_machine_lacks_is_a_clear_error():
    from crystal_gpt.training import pick_device

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("gpu0")


def test_bf16_runs_the_blocks_only_and_trains(tmp_path, small_data):
    """--precision bf16: the transformer blocks under autocast, everything after them in
    float32; the log-likelihood stays close to float32's, and a run trains and records it."""
    train_ds, val_ds = small_data
    res = train(
        tiny(epochs=2, seed=2, precision="bf16"),
        tmp_path / "bf16",
        train_data=train_ds,
        val_data=val_ds,
        progress=False,
    )
    model = res.model.eval()
    assert model.autocast_dtype == torch.bfloat16
    from crystal_gpt.data.batching import PaddedCrystals

    batch = PaddedCrystals(val_ds).batch(np.arange(len(val_ds)))
    with torch.no_grad():
        half = model(batch)
        h = model.backbone(model.embed_sites(batch["g"], batch["w"], batch["a"], batch["x"]))
        model.autocast_dtype = None
        full = model(batch)
    assert h.dtype == torch.float32 and torch.isfinite(half["total"]).all()
    gap = (half["total"] - full["total"]).abs() / full["total"].abs().clamp(min=1)
    assert 0 < float(gap.max()) < 0.05  # bf16 was used, and it changes little
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    assert load_model(tmp_path / "bf16").autocast_dtype is None  # a run-time choice, not saved
