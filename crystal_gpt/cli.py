"""The ``crystal-gpt`` command line."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from crystal_gpt import __version__
from crystal_gpt.data.cache import cache_dir, encode_dataset
from crystal_gpt.data.codec import DEFAULT_SYMPREC
from crystal_gpt.data.datasets import DATASETS, DatasetError, available_files, protocol
from crystal_gpt.data.statistics import (
    dataset_statistics,
    pressure_statistics,
    print_pressure_statistics,
    print_statistics,
)
from crystal_gpt.data.symmetry import get_tables
from crystal_gpt.utils import prepare_output_folder, rate, use_executor

CPU_BATCH = 500  # crystals drawn together: sample_crystals' default
GPU_BATCH = 10_000  # a GPU's throughput keeps rising to about here (benchmarks/RESULTS.md)
MAX_SAMPLES = 10**9  # per run: ~4 days on one GPU; a larger -n is a typo, not a plan
# what `evaluate` and `evaluate-csp` write (an earlier run's copies are removed up front)
REPORT_FILES = ("report.md", "report.html", "metrics.json", "crystals.csv", "*.png")
CSP_FILES = ("csp.json", "csp.csv", "csp.md")


def cmd_data_info(args: argparse.Namespace) -> int:
    splits = args.split or (["train", "holdout", "test"] if args.dataset in DATASETS else ["file"])
    if args.dataset in DATASETS and not args.json:  # --json prints only the JSON
        files = available_files(args.dataset, args.data_dir)
        proto = protocol(args.dataset, args.data_dir)
        print(f"dataset {args.dataset}: files {', '.join(sorted(files))}; protocol {proto['kind']}")
        if proto["kind"] == "local":
            print(
                f"  train/holdout pooled from {'+'.join(proto['train'])} with a fixed "
                f"{100 * proto['holdout_fraction']:.0f}% hold-out (seed {proto['holdout_seed']}); "
                "test = the published test split"
            )
        if proto["kind"] == "material":
            print(
                "  split by material (splits.csv.gz: 80/10/10%, holdout = val): every pressure "
                "of a material is in one split; files sha256-checked against the published ones"
            )
    report = {}
    for split in splits:
        ds = encode_dataset(
            args.dataset,
            split,
            symprec=args.symprec,
            mode=args.mode,
            workers=args.workers,
            data_dir=args.data_dir,
            progress=not args.quiet,
        )
        report[split] = dataset_statistics(ds)
        if "pressure" in ds.properties:
            report[split]["per_pressure"] = pressure_statistics(ds)
        if args.show_errors:
            for e in ds.errors:
                print(f"  unreadable: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for split, st in report.items():
            title = f"{args.dataset} / {split} (symprec {args.symprec}, {args.mode})"
            print_statistics(title, st)
            if "per_pressure" in st:
                print_pressure_statistics(title, st["per_pressure"])
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    for name in DATASETS:
        files = available_files(name, args.data_dir)
        print(
            f"{name:10s} {protocol(name, args.data_dir)['kind']:8s} files: "
            + ", ".join(f"{k} ({v.stat().st_size / 1e6:.1f} MB)" for k, v in sorted(files.items()))
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    tables = get_tables()
    print(f"crystal-gpt {__version__}")
    print(
        f"Wyckoff tables: 230 space groups, {int(tables.num_letters.sum())} Wyckoff positions, "
        f"up to {tables.max_letters} per group"
    )
    print(f"cache directory: {cache_dir()}  (set CRYSTAL_GPT_CACHE to move it)")
    print(f"datasets: {', '.join(DATASETS)}  (see `crystal-gpt data list`)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crystal_gpt.training import load_config, train

    overrides = list(args.set or [])
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    for key in ("epochs", "seed", "device", "precision", "threads", "limit"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.condition_columns:
        names = [c.strip() for c in args.condition_columns.split(",") if c.strip()]
        overrides.append(f"model.conditions={json.dumps(dict.fromkeys(names, 1))}")
    cfg = load_config(args.preset, args.config, overrides)
    result = train(
        cfg, args.out, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after
    )
    summary = result.summary
    if result.interrupted:
        print(
            f"crystal-gpt: interrupted; checkpoint {args.out}/last.pt goes on from the next step "
            f"with: crystal-gpt train ... --out {args.out} --resume",
            file=sys.stderr,
        )
        return 130
    if summary:
        print(
            f"best hold-out NLL {summary['best_val_nll']:.3f} nats/crystal at epoch "
            f"{summary['best_epoch']}; checkpoints, log.csv and loss.png in {args.out}"
        )
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    import torch

    from crystal_gpt.data.batching import PaddedCrystals
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.training import evaluate_nll, pick_device

    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    ds = encode_dataset(args.dataset, args.split, symprec=args.symprec, progress=not args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = list(model.config.conditions)
    hidden = [] if not args.hide_conditions else known if args.hide_conditions == "all" else [
        c.strip() for c in args.hide_conditions.split(",") if c.strip()
    ]  # fmt: skip
    unknown = [c for c in hidden if c not in known]
    if unknown:
        raise ValueError(
            f"--hide-conditions: the model has no condition {', '.join(map(repr, unknown))} "
            f"(its conditions: {', '.join(known) or 'none'})"
        )
    # a condition left out of the batch is hidden (as a missing value is in training), so a
    # dataset without that column can be scored too
    data = PaddedCrystals(ds, model.config.max_sites, [c for c in known if c not in hidden])
    res = evaluate_nll(model, data, device=device, progress=not args.quiet)
    res.update(dataset=args.dataset, split=args.split, checkpoint=str(args.checkpoint))
    res["hidden_conditions"] = hidden
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        parts = ", ".join(f"{p} {res[f'nll_{p}']:.3f}" for p in ("g", "W", "A", "X", "L"))
        print(
            f"{args.dataset}/{args.split}: {res['crystals']} crystals, NLL "
            f"{res['nll_total']:.3f} nats/crystal, {res['nll_per_atom']:.3f} nats/atom "
            f"({parts})" + (f"; hidden: {', '.join(hidden)}" if hidden else "")
        )
    return 0


def _parse_conditions(items: list[str] | None) -> dict[str, float]:
    """--condition band_gap=3.0 (repeatable) -> {"band_gap": 3.0}."""
    out: dict[str, float] = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not eq or not name.strip() or not np.isfinite(number):
            raise ValueError(f"--condition {item!r}: expected NAME=NUMBER, e.g. band_gap=3.0")
        if name.strip() in out:
            raise ValueError(f"--condition {name.strip()} given twice")
        out[name.strip()] = number
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    from crystal_gpt.data.codec import DEFAULT_SYMPREC
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.sampling.output import prepare_sample_folder
    from crystal_gpt.training import pick_device

    if args.n < 1:
        raise ValueError("-n must be at least 1")
    if args.n > MAX_SAMPLES:
        raise ValueError(f"-n: at most {MAX_SAMPLES:,} crystals per run, got {args.n:,}")
    device = pick_device(args.device)
    model = load_model(args.model, device)
    on_gpu = device.type != "cpu"
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = dict(
        batch_size=args.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH),
        spacegroup=args.spacegroup,
        temperature=args.temperature,
        top_p=args.top_p,
        elements=args.elements,
        exclude_elements=args.exclude_elements,
        composition=args.composition,
        formula_units=args.formula_units,
        num_atoms=args.num_atoms,
        wyckoff_template=args.wyckoff_template,
        chemsys=args.chemsys,
        contains=args.contains,
        allow_unseen=args.allow_unseen,
        symprec=None if args.skip_symmetry_check else DEFAULT_SYMPREC,
        min_distance=_parse_min_distance(args.min_distance),
        charge_balanced=args.charge_balanced,
        num_elements=args.num_elements,
        conditions=_parse_conditions(args.condition),
        guidance=args.guidance,
    )

    from crystal_gpt.sampling.shards import SampleDraw

    steering = _steering(args, _model_dataset(model))
    predictor = steer_spec = None
    if steering is not None:
        predictor, target = steering
        steer_spec = (
            args.predictor or f"{_model_dataset(model)}_{predictor.config.target}",
            target,
        )
    # a model file by its absolute path: worker processes (or Ray tasks) load it themselves
    model_ref = str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model)
    draw = SampleDraw(
        model_ref, str(device), options, steer_spec, args.steer_width, args.oversample
    )
    draw.keep(model, predictor)  # loaded here once; spawned drawing processes load their own

    if args.format == "parquet":
        from crystal_gpt.sampling.shards import write_shards

        settings = {"model": str(args.model), **{k: str(v) for k, v in options.items()}}
        if args.gpu_processes < 1:
            raise ValueError(f"--gpu-processes must be at least 1, got {args.gpu_processes}")
        # several shards at once, one per core, each checking its own symmetry. On a GPU: one
        # drawing process (this one) while worker processes make and write the rows of the
        # shards drawn before, or --gpu-processes processes started fresh (CUDA does not cross
        # a fork), each with the model on the GPU, drawing and writing shards
        parallel = args.n > args.shard_size and (not on_gpu or args.gpu_processes > 1)
        cores = os.cpu_count() or 1
        done = write_shards(
            functools.partial(draw, progress=False, check_workers=0 if parallel else None),
            args.n,
            args.out,
            shard_size=args.shard_size,
            seed=0 if args.seed is None else args.seed,
            settings=settings,
            resume=args.resume,
            workers=(args.gpu_processes if args.gpu_processes > 1 else 0) if on_gpu else None,
            record_workers=max(cores - 1, 1) if on_gpu and args.gpu_processes == 1 else 0,
            start_method="spawn" if on_gpu else None,
        )
        print(
            f"{args.n} crystals in {done['shards']} shards -> {args.out}/part-*.parquet "
            f"({done['written']} drawn in {done['seconds']:.1f} s, "
            f"{rate(done['written'], done['seconds'])}; {done['kept']} kept from before)"
        )
        return 0
    if args.resume:
        raise ValueError("--resume applies to --format parquet")
    prepare_sample_folder(args.out)  # a bad --out fails now, not after the sampling
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    t0 = time.perf_counter()
    from crystal_gpt.sampling.output import SampleFolderWriter
    from crystal_gpt.sampling.shards import draw_in_chunks, render_chunk

    if args.n > args.chunk_size and not on_gpu and steering is None:
        # chunks drawn and rendered at once, one per core, each seeded from --seed (drawn when
        # not given); this process only writes the files, as chunks arrive
        seed = args.seed
        if seed is None:  # said, so that the run can be repeated
            seed = int(np.random.SeedSequence().generate_state(1)[0])
            print(f"no --seed given: drawing with --seed {seed}", file=sys.stderr)
        parts = draw_in_chunks(
            draw, args.n, seed, args.chunk_size, _usable_cores(),
            log=lambda line: print(line, file=sys.stderr, flush=True), finish=render_chunk,
        )  # fmt: skip
    else:
        crystals, loglik = draw(args.n, args.seed)  # the progress bar appears after 2 s
        parts = [(0, render_chunk(crystals, loglik, 0))]
    writer = SampleFolderWriter(args.out)
    for k, rendered in parts:
        writer.add(k, rendered)
    out = writer.close()
    rows = writer.rows_in_order()
    dt = time.perf_counter() - t0
    redrawn = sum(int(r["redraws"]) for r in rows)
    moved = sum(int(r["site_redraws"]) for r in rows)
    counts = Counter(int(r["spacegroup"]) for r in rows)
    top = ", ".join(f"{g}: {k}" for g, k in counts.most_common(5))
    print(
        f"{len(rows)} crystals in {dt:.1f} s ({rate(len(rows), dt)}) -> {out}/cif, "
        f"{out}/samples.extxyz, {out}/summary.csv; most common space groups {top}; "
        f"{redrawn} crystals redrawn (symmetry higher than sampled, impossible cell, no room, "
        f"atoms too close, without a --contains element, or let go for the training data's "
        f"numbers of elements), {moved} site "
        "coordinates redrawn (atoms too close)"
    )
    return 0


def _usable_cores() -> int:
    """The cores this process may run on (affinity, e.g. a container's share), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _model_dataset(model) -> str:
    """The dataset a model was trained on (recorded at export or training), mp_20 if unknown:
    predictors default to <dataset>_<property>, novelty is against its training crystals."""
    return (getattr(model, "meta", None) or {}).get("dataset") or "mp_20"


def _steering(args: argparse.Namespace, dataset: str = "mp_20"):
    """--steer NAME=VALUE --predictor P -> (the predictor, the target), or None; the predictor
    defaults to the bundled <dataset>_<NAME>."""
    if args.steer is None:
        if args.predictor is not None:
            raise ValueError("--predictor is used with --steer NAME=VALUE")
        return None
    from crystal_gpt.model.predictor import load_predictor

    ((name, target),) = _parse_conditions([args.steer]).items()
    predictor = load_predictor(args.predictor or f"{dataset}_{name}")
    if predictor.config.target != name:
        raise ValueError(
            f"--steer {name}: the predictor predicts {predictor.config.target!r}, not {name!r}"
        )
    return predictor, target


def _parse_min_distance(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"--min-distance takes 'auto' or a distance in Angstrom, got {text!r}"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"--min-distance must be a distance >= 0 in Angstrom, got {text!r}")
    return value


def _target_conditions(model, records) -> dict[str, np.ndarray] | None:
    """A conditioned model's conditions for CSP: each target's own values (e.g. its pressure)."""
    names = list(model.config.conditions)
    if not names:
        return None
    out = {}
    for name in names:
        values = np.array([r.properties.get(name, np.nan) for r in records], dtype=float)
        if not np.isfinite(values).all():
            raise ValueError(
                f"the model is conditioned on {name!r}, which not every target crystal of the "
                "dataset has"
            )
        out[name] = values
    return out


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from crystal_gpt.model.predictor import PredictorConfig, train_predictor

    config = PredictorConfig(target=args.target)
    for key in ("d_model", "n_layers", "dropout"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    config.validate()
    summary = train_predictor(
        args.dataset, args.target, args.out, config=config, epochs=args.epochs,
        patience=args.patience, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    print(
        f"{args.target} predictor: test MAE {summary['test_mae']:.4f} on "
        f"{summary['test_crystals']} {args.dataset} test crystals (predicting the training "
        f"median: {summary['test_mae_of_the_training_median']:.4f}); best epoch "
        f"{summary['best_epoch']} -> {args.out}/best.pt"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from crystal_gpt.data.codec import encode
    from crystal_gpt.evaluation.readers import load_structures
    from crystal_gpt.model.predictor import load_predictor

    predictor = load_predictor(args.predictor)
    loaded = load_structures(args.samples, progress=False)
    for name, why in loaded.errors:
        print(f"{name}: unreadable ({why}); skipped", file=sys.stderr)
    crystals, kept = [], []
    for name, s in zip(loaded.names, loaded.structures, strict=True):
        try:
            crystals.append(encode(s))
            kept.append(name)
        except Exception as err:  # an unencodable file is named, not fatal
            print(f"{name}: cannot encode ({err}); skipped", file=sys.stderr)
    values = predictor.predict_crystals(crystals) if crystals else np.zeros(0)
    target = predictor.config.target
    order = np.arange(len(values))
    if args.target is not None:
        order = np.argsort(np.abs(values - args.target), kind="stable")
    rows = [{"name": kept[i], f"predicted_{target}": round(float(values[i]), 4)} for i in order]
    out = Path(args.out)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", f"predicted_{target}"])
        w.writeheader()
        w.writerows(rows)
    ranked = "ranked by distance to " + f"{args.target:g}" if args.target is not None else ""
    print(f"{len(rows)} predictions of {target} {ranked} -> {out}")
    for r in rows[: args.show]:
        print(f"  {r['name']}: {r[f'predicted_{target}']}")
    return 0


def cmd_evaluate_conditions(args: argparse.Namespace) -> int:
    from crystal_gpt.evaluation.conditioning import evaluate_conditioning
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.training import pick_device

    targets = _parse_numbers(args.targets, "--targets")
    scales = _parse_numbers(args.guidance, "--guidance")
    if args.n < 1:
        raise ValueError("-n must be at least 1")
    prepare_output_folder(args.out, ("conditioning.json", "conditioning.md", "*.csv", "*.png"))
    model = load_model(args.model, pick_device(args.device))
    from crystal_gpt.model.predictor import load_predictor

    # the model's own training data: novelty is against it, predictors default to its name
    dataset = args.dataset or _model_dataset(model)
    predictor = steer_with = None
    if args.predictor or args.property not in ("formation_energy_per_atom", "e_above_hull"):
        predictor = load_predictor(args.predictor or f"{dataset}_{args.property}")
    if args.steer:
        steer_with = load_predictor(args.steer_predictor or f"{dataset}_{args.property}")
    result = evaluate_conditioning(
        model,
        args.property,
        targets,
        args.n,
        guidance=scales,
        baseline=not args.no_baseline,
        predictor=predictor,
        relax_steps=args.relax_steps,
        tolerance=args.tolerance,
        seed=args.seed,
        workers=args.workers or 1,
        training_dataset=None if args.no_novelty else dataset,
        description=f"model {args.model}; {args.n} samples per row (seed {args.seed} + row "
        "index); "
        + (
            "novelty not measured"
            if args.no_novelty
            else f"novelty against the {dataset} training crystals"
        ),
        out_dir=args.out,
        min_distance=_parse_min_distance(args.min_distance),
        steer_with=steer_with,
        steer_width=args.steer_width,
        oversample=args.oversample,
    )
    print(result.markdown())
    print(f"{result.seconds:.0f} s -> {args.out}/conditioning.md, target_vs_achieved.png")
    return 0


def cmd_evaluate_pressure(args: argparse.Namespace) -> int:
    from crystal_gpt.evaluation.pressure import evaluate_pressures
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.training import pick_device

    pressures = _parse_numbers(args.pressures, "--pressures")
    if args.n < 1:
        raise ValueError("-n must be at least 1")
    prepare_output_folder(args.out, ("pressure.json", "pressure.md", "pressure.csv", "*.png"))
    model = load_model(args.model, pick_device(args.device))
    result = evaluate_pressures(
        model,
        pressures,
        args.n,
        seed=args.seed,
        out_dir=args.out,
        novelty=not args.no_novelty,
        workers=args.workers or 1,
        description=f"model {args.model}; {args.n} samples per pressure (seed {args.seed} + "
        "index of the pressure); reference: alex_pressure test split at each pressure; novelty "
        "against the training materials at every pressure",
        min_distance=_parse_min_distance(args.min_distance),
        guidance=args.guidance,
        stability=args.stability,
        stability_pressures=None
        if args.stability_pressures is None
        else _parse_numbers(args.stability_pressures, "--stability-pressures"),
        hull_relax_steps=args.hull_relax_steps,
    )
    print(result.markdown())
    print(
        f"{result.seconds:.0f} s -> {args.out}/pressure.md, pressure.json, volume_vs_pressure.png"
    )
    return 0


def _parse_numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected numbers separated by commas") from None
    if not values or not all(np.isfinite(values)):
        raise ValueError(f"{option} {text!r}: expected numbers separated by commas")
    return values


def cmd_evaluate_csp(args: argparse.Namespace) -> int:
    from crystal_gpt.data.datasets import load_dataset
    from crystal_gpt.evaluation.csp import evaluate_csp
    from crystal_gpt.model.checkpoints import load_model
    from crystal_gpt.training import pick_device

    if args.k < 1:
        raise ValueError(f"-k must be at least 1 (samples per composition), got {args.k}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.candidates is not None and args.candidates < args.k:
        raise ValueError(f"--candidates ({args.candidates}) must be at least -k ({args.k})")
    if args.resume and args.chunk_size is None:
        raise ValueError("--resume continues a run in chunks: give its --chunk-size too")
    only = None
    if args.chunks is not None:
        from crystal_gpt.evaluation.csp import parse_chunks

        if args.chunk_size is None:
            raise ValueError("--chunks picks chunks of a run in chunks: give --chunk-size too")
        only = parse_chunks(args.chunks)
        args.resume = True  # a run shared by several processes: the others' chunks stay
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    saved = list((Path(args.out) / "chunks").glob("chunk-*.npz"))
    if saved and args.chunk_size is not None and not args.resume:  # hours of work: never lose it
        raise ValueError(
            f"{Path(args.out) / 'chunks'} holds {len(saved)} finished chunks of an earlier run: "
            "add --resume to continue it, or remove that folder to start over"
        )
    prepare_output_folder(args.out, CSP_FILES)  # a bad --out fails now, not after the run
    model = load_model(args.model, pick_device(args.device))
    pressures = None if args.pressure is None else [args.pressure]
    data = load_dataset(args.dataset, args.split, pressures=pressures)
    records = list(data)
    if args.limit is not None and args.limit < len(records):
        pick = np.random.default_rng(args.subset_seed).choice(len(records), args.limit, False)
        records = [records[i] for i in sorted(pick)]
    subset = (
        f"{len(records)} of {len(data)} crystals (seed {args.subset_seed})"
        if args.limit is not None and args.limit < len(data)
        else f"all {len(records)} crystals"
    )
    options = dict(
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        workers=args.workers,
        description=f"model {args.model}; {args.dataset} {args.split}"
        f"{'' if pressures is None else f' at {args.pressure:g} GPa'}, {subset}",
        min_distance=_parse_min_distance(args.min_distance),
        candidates=args.candidates,
    )
    targets, ids = [r.structure for r in records], [r.id for r in records]
    conditions = _target_conditions(model, records)
    if args.chunk_size is None:
        result = evaluate_csp(model, targets, ids, seed=args.seed, conditions=conditions, **options)
    else:
        from crystal_gpt.evaluation.csp import evaluate_csp_in_chunks

        settings = {
            "model": str(args.model), "dataset": args.dataset, "split": args.split,
            "pressure": args.pressure, "limit": args.limit, "subset_seed": args.subset_seed,
            "device": str(next(model.parameters()).device.type),
            **{key: v for key, v in options.items() if key not in ("workers", "description")},
        }  # fmt: skip
        result = evaluate_csp_in_chunks(
            model, targets, ids, Path(args.out) / "chunks", chunk_size=args.chunk_size,
            settings=settings, seed=args.seed, conditions=conditions,
            log=lambda line: print(line, file=sys.stderr, flush=True), only=only, **options,
        )  # fmt: skip
        if result is None:  # --chunks: other chunks still to come
            return 0
    out = result.write(args.out)  # checked up front (prepare_output_folder)
    summary = result.summary()
    k = args.k
    print(
        f"CSP on {summary['targets']} {args.dataset} {args.split} crystals: match rate @1 "
        f"{100 * summary['match_rate@1']:.2f}% (RMSE {summary['rmse@1']:.4f}), @{k} "
        f"{100 * summary[f'match_rate@{k}']:.2f}% (RMSE {summary[f'rmse@{k}']:.4f}), valid "
        f"predictions only; without that gate @1 "
        f"{100 * summary['ungated']['match_rate@1']:.2f}%, @{k} "
        f"{100 * summary['ungated'][f'match_rate@{k}']:.2f}%; "
        f"{summary['infeasible_compositions']} compositions the model cannot build; "
        f"-> {out}/csp.md, csp.json, csp.csv"
    )
    return 0


def default_report_folder(samples: str | Path) -> Path:
    """Where ``evaluate`` writes without --out: beside the samples it judges, so a report never
    lands in whatever folder the command happened to run from."""
    path = Path(samples)
    if path.is_dir():
        return path / "evaluation"
    return path.with_name(f"{path.stem}_evaluation")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """CDVAE metrics, uniqueness, novelty and symmetry statistics of generated crystals."""
    import warnings

    from crystal_gpt.evaluation.references import build_reference
    from crystal_gpt.evaluation.suite import evaluate

    warnings.filterwarnings("ignore", module="pymatgen")
    warnings.filterwarnings("ignore", module="matminer")
    progress = not args.quiet
    cutoffs = None
    if (args.struct_cutoff is None) != (args.comp_cutoff is None):
        raise ValueError("give both --struct-cutoff and --comp-cutoff, or neither")
    if args.struct_cutoff is not None:
        cutoffs = (args.struct_cutoff, args.comp_cutoff)
    if args.build_reference:
        paths = build_reference(
            args.dataset,
            args.reference_split,
            train_split=None if args.no_novelty else args.train_split,
            limit=args.reference_limit,
            workers=args.workers,
            progress=progress,
        )
        print("reference cache: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
        if args.samples is None:
            return 0
    if args.samples is None:
        raise ValueError("give SAMPLES (a folder, CIF, extxyz or CSV) or --build-reference")
    if args.out is None:
        args.out = str(default_report_folder(args.samples))
    # a bad --out fails now, not after the evaluation; the report files of an earlier run go
    # (the relaxation cache stays: it resumes)
    prepare_output_folder(args.out, REPORT_FILES)
    ev = evaluate(
        args.samples,
        args.dataset,
        reference_split=args.reference_split,
        train_split=None if args.no_novelty else args.train_split,
        reference_limit=args.reference_limit,
        n_property=args.n_property,
        seed=args.seed,
        cutoffs=cutoffs,
        workers=args.workers,
        progress=progress,
        oxidation_table=args.oxidation_table,
        **({} if args.time_limit is None else {"time_limit": args.time_limit}),
    )
    stability = None
    if args.stability:
        try:
            from crystal_gpt.evaluation.stability import evaluate_stability
        except ImportError as err:
            raise ValueError(
                f"--stability needs crystal_gpt.evaluation.stability and chgnet: {err}"
            ) from err
        Path(args.out).mkdir(parents=True, exist_ok=True)
        stability = evaluate_stability(
            ev.structures,
            args.dataset,
            workers=args.workers or os.cpu_count() or 1,
            cache=Path(args.out) / "relaxations.jsonl",  # an interrupted run resumes from here
            novel_mask=ev.novel,
            unique_mask=ev.unique,
            progress=progress,
            **({} if args.time_limit is None else {"time_limit": args.time_limit}),
        )
    out = ev.write_report(args.out, stability=stability)
    m = ev.metrics
    v, c, p = m["validity"], m["coverage"], m["property"]
    print(
        f"{m['crystals']} crystals ({m['unreadable']} unreadable) vs {m['dataset']} "
        f"{m['reference_split']} ({m['reference_crystals']}): struct {v['struct_valid']:.2f}%, "
        f"comp {v['comp_valid']:.2f}%, COV-R {c['cov_recall']:.2f}%, COV-P "
        f"{c['cov_precision']:.2f}%, wdist density {p['wdist_density']:.3f}, #elements "
        f"{p['wdist_num_elements']:.3f}"
    )
    un, sy = m["uniqueness_novelty"], m["symmetry"]
    if un:
        print(f"unique {un['unique']:.2f}%, novel {un['novel']:.2f}%, P1 {sy['p1_share']:.2f}%")
    for name, why in ev.errors[:5]:
        print(f"  unreadable: {name}: {why}", file=sys.stderr)
    print(f"-> {out}/report.md, report.html, metrics.json, crystals.csv, plots")
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    """Relax generated crystals with CHGNet, rank them by E_hull, write relaxed CIFs."""
    from crystal_gpt.evaluation.readers import load_structures

    try:
        from crystal_gpt.evaluation.stability import ReferenceHull
        from crystal_gpt.evaluation.stability.ranking import (
            ranking_summary,
            relax_and_rank,
            write_ranked,
        )
    except ImportError as err:
        print(f"crystal-gpt: error: {err}", file=sys.stderr)
        return 2
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    out = prepare_output_folder(args.out, ("relaxed.csv", "cif/*.cif"))
    # the hull first: a missing one fails now, with how to build it, not after the relaxations
    hull = ReferenceHull.load(args.dataset, path=args.hull, pressure=args.pressure)
    loaded = load_structures(args.samples, progress=not args.quiet)
    for name, why in loaded.errors[:5]:
        print(f"  unreadable: {name}: {why}", file=sys.stderr)
    if not loaded.structures:
        raise ValueError(f"{args.samples}: no readable crystals")
    structures, names = loaded.structures, loaded.names
    if args.limit is not None:
        structures, names = structures[: args.limit], names[: args.limit]
    rows, relaxed = relax_and_rank(
        structures,
        names,
        hull,
        steps=args.steps,
        fmax=args.fmax,
        workers=args.workers or os.cpu_count() or 1,
        cache=out / "relaxations.jsonl",  # an interrupted run resumes from here
        progress=not args.quiet,
        pressure=args.pressure or 0.0,
        **({} if args.time_limit is None else {"time_limit": args.time_limit}),
    )
    target = write_ranked(rows, relaxed, out)
    print(ranking_summary(rows, hull, args.steps, args.fmax))
    print(f"-> {target} (rank order), {out / 'cif'}")
    return 0


def _hull_systems(names: str | None, files: list[str] | None) -> list[frozenset[str]] | None:
    """The chemical systems a restricted hull is built for: named ones plus those of the
    crystals in structure files (a sample folder, CIFs, extxyz, parquet)."""
    from crystal_gpt.evaluation.readers import load_structures
    from crystal_gpt.evaluation.stability import chemical_system, parse_systems

    if names is None and not files:
        return None
    found: list[str | frozenset[str]] = [x for x in (names or "").split(",") if x.strip()]
    for f in files or []:
        loaded = load_structures(f, progress=False)
        if not loaded.structures:
            raise ValueError(f"--systems-from {f}: no readable crystals")
        found.extend(chemical_system(s) for s in loaded.structures)
    return parse_systems(found)


def cmd_hull(args: argparse.Namespace) -> int:
    """Build or describe the CHGNet reference hull that stability and S.U.N. numbers need."""
    import warnings

    try:
        from crystal_gpt.evaluation.stability import ReferenceHull, hull_path
    except ImportError as err:
        print(f"crystal-gpt: error: {err}", file=sys.stderr)
        return 2
    try:
        relaxed = args.relaxed if args.hull_command == "info" else args.relax_steps > 0
        where = args.out or hull_path(args.dataset, args.pressure, relaxed)
        if args.hull_command == "build":
            systems = _hull_systems(args.systems, args.systems_from)
            hull = ReferenceHull.build(
                args.dataset,
                splits=[s for s in args.splits.split(",") if s],
                workers=args.workers,
                limit=args.limit,
                relax_steps=args.relax_steps,
                path=args.out,
                progress=not args.quiet,
                pressure=args.pressure,
                systems=systems,
            )
            print(hull.summary())
            print(f"-> {where}")
            return 0
        hull = ReferenceHull.load(
            args.dataset, path=args.out, pressure=args.pressure, relaxed=relaxed
        )
    except ImportError as err:  # chgnet missing
        print(f"crystal-gpt: error: {err}", file=sys.stderr)
        return 2
    print(hull.summary())
    print(f"file: {where}")
    if args.check:
        # E_hull of reference crystals themselves: how many known crystals this hull calls
        # stable (a ceiling for generated ones; all mp_20 crystals are within 0.08 eV/atom in DFT)
        rng = np.random.default_rng(0)
        data = [i for i, src in enumerate(hull.sources) if src != "ase-bulk"]
        pick = rng.choice(data, size=min(args.check, len(data)), replace=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = hull.e_above_hull([(hull.formulas[i], hull.energy_per_atom[i]) for i in pick])
        missing = ", ".join(sorted(hull.last_missing)) or "-"
        e = e[np.isfinite(e)]
        print(
            f"check on {len(e)} of {len(pick)} reference crystals (no elemental reference: "
            f"{missing}): E_hull median {np.median(e):.3f} eV/atom, "
            f"<= 0.1: {np.mean(e <= 0.1):.1%}, <= 0.08: {np.mean(e <= 0.08):.1%}, "
            f"on hull (<= 1 meV): {np.mean(e <= 1e-3):.1%}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from crystal_gpt.model.checkpoints import list_models

    for name, meta in list_models().items():
        print(
            f"{name:10s} {meta['parameters'] / 1e6:.2f}M parameters, {meta['size_mb']:.1f} MB; "
            f"trained on {meta['dataset']} {meta['train_split']} ({meta['train_crystals']} "
            f"crystals, {meta.get('protocol', '')}); test NLL "
            f"{meta.get('test_nll', float('nan')):.3f} nats/crystal, "
            f"{meta.get('test_nll_per_atom', float('nan')):.3f} nats/atom"
            + (f" ({meta['note']})" if meta.get("note") else "")
            + (f"; conditions: {', '.join(meta['conditions'])}" if meta.get("conditions") else "")
        )
    from crystal_gpt.model.predictor import list_predictors

    predictors = list_predictors()
    if predictors:
        print("\nproperty predictors (--predictor NAME; evaluate-conditions, predict, --steer):")
    for name, meta in predictors.items():
        print(
            f"{name} predicts {meta['target']} of {meta['dataset']} crystals: test MAE "
            f"{meta['test_mae']:.3g} on {meta['test_crystals']} (the training median's: "
            f"{meta['test_mae_of_the_training_median']:.3g})"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from crystal_gpt.model.checkpoints import convert_checkpoint

    if not args.trust:
        raise ValueError(
            f"converting {args.old} unpickles it, which can run code: pass --trust if you know "
            "where the file comes from"
        )
    print(f"{convert_checkpoint(args.old, args.new)}: loads weights-only")
    return 0


def _executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=("process", "ray"),
        default="process",
        help="where the heavy jobs run (relaxations, fingerprints, matching, parquet sample "
        "shards): process (default, "
        "this machine's worker processes) or ray (a local Ray started on demand, or a cluster "
        "with --ray-address; crystal-gpt must be installed on its nodes)",
    )
    parser.add_argument(
        "--ray-address", help="an existing Ray cluster, e.g. ray://head:10001 or auto"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="crystal-gpt",
        description="Symmetry-aware autoregressive generation of inorganic crystals.",
    )
    ap.add_argument("--version", action="version", version=f"crystal-gpt {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="version, symmetry tables and cache location")
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="benchmark datasets: list them, encode them, statistics")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=None,
        help="folder with <dataset>/<split>.csv[.gz] (default: bundled files)",
    )
    lst = data_sub.add_parser("list", parents=[common], help="datasets, their files and protocol")
    lst.set_defaults(func=cmd_data_list)
    di = data_sub.add_parser(
        "info",
        parents=[common],
        help="encode a dataset (cached) and print counts, space-group and site statistics",
    )
    di.add_argument("dataset", help=f"one of {', '.join(DATASETS)}, or a CDVAE-format CSV path")
    di.add_argument(
        "--split",
        action="append",
        help="split to describe (repeatable; default: train, holdout, test)",
    )
    di.add_argument(
        "--symprec",
        type=float,
        default=DEFAULT_SYMPREC,
        help=f"symmetry tolerance in Angstrom (default {DEFAULT_SYMPREC})",
    )
    di.add_argument(
        "--mode",
        choices=["wyckoff", "p1"],
        default="wyckoff",
        help="Wyckoff encoding, or every atom as a P1 general position",
    )
    di.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    di.add_argument("--json", action="store_true", help="print the statistics as JSON")
    di.add_argument("--show-errors", action="store_true", help="list unreadable rows")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.set_defaults(func=cmd_data_info)

    tr = sub.add_parser("train", help="train a model by maximum likelihood (torchrun for DDP)")
    tr.add_argument("--preset", default="small", help="tiny | small (CPU default) | large (GPU)")
    tr.add_argument("--config", help="TOML or JSON file on top of the preset")
    tr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set lr=3e-4 --set model.n_layers=6",
    )
    tr.add_argument("--dataset", help="dataset name or CDVAE-format CSV (default: mp_20)")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, loss.png")
    tr.add_argument("--epochs", type=int, help="epochs of the schedule (preset's by default)")
    tr.add_argument("--seed", type=int, help="for a reproducible run (default 0)")
    tr.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    tr.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: the transformer blocks in bfloat16 (autocast; heads, densities and the "
        "lattice flow stay float32): faster on a GPU, slower on most CPUs (default fp32)",
    )
    tr.add_argument("--threads", type=int, help="CPU threads for torch")
    tr.add_argument("--limit", type=int, help="use only the first N training crystals")
    tr.add_argument(
        "--condition-columns",
        help="train a conditioned model on these numeric columns of the dataset, e.g. "
        "band_gap,formation_energy_per_atom (missing values allowed; sample with --condition)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    tr.add_argument("--stop-after", type=int, help="stop this invocation after N epochs")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="generate crystals (CIF per crystal, extxyz, summary)")
    sa.add_argument("-n", type=int, default=100, help="number of crystals (default 100)")
    sa.add_argument("--model", default="mp_20", help="bundled model name or checkpoint path")
    sa.add_argument("--spacegroup", help="e.g. 225, Fm-3m, 'cubic', or a list: 194,225")
    sa.add_argument("--elements", help="only these elements, e.g. Li,Fe,P,O")
    sa.add_argument("--exclude-elements", help="never these elements, e.g. Pb,Cd,Hg")
    sa.add_argument("--chemsys", help="exactly these elements, each present, e.g. Li-Fe-P-O")
    sa.add_argument(
        "--contains", help="elements every crystal contains, the others free, e.g. O (oxides)"
    )
    sa.add_argument(
        "--allow-unseen",
        action="store_true",
        help="also elements and atom counts outside the model's training data (default: "
        "inside; explicit requests outside it are kept with a warning)",
    )
    sa.add_argument(
        "--skip-symmetry-check",
        action="store_true",
        help="keep samples whose spglib symmetry is higher than the sampled group instead of "
        "redrawing them (sampling ~7x faster; impossible cells are still redrawn)",
    )
    sa.add_argument(
        "--charge-balanced",
        action="store_true",
        help="only charge-neutral compositions (SMACT's oxidation states; one element or only "
        "metals also count), with look-ahead: no dead ends to redraw in the common case",
    )
    sa.add_argument(
        "--min-distance",
        default="auto",
        help="closest approach of two atoms in Angstrom; 'auto' (default): 0.8 of the "
        "shortest distance of that element pair in the model's training data; 0: no rule. "
        "A model that draws the lattice before the coordinates (the bundled mp_20) redraws a "
        "clashing site, a lattice-last one the crystal",
    )
    sa.add_argument(
        "--composition",
        help="exact primitive-cell content (structure prediction), e.g. Li4Fe4P4O16, or a "
        "formula with --formula-units",
    )
    sa.add_argument(
        "--formula-units", type=int, help="formula units per primitive cell for --composition"
    )
    sa.add_argument("--num-atoms", help="atoms per primitive cell: N or LOW-HIGH, e.g. 4-12")
    sa.add_argument(
        "--num-elements", default="auto", help="distinct elements per crystal: N or LOW-HIGH "
        "(e.g. 3, 2-4); 'prior': the training data's distribution of the number; 'model': the "
        "model's own choice; 'auto' (default): 'prior' when nothing else constrains the "
        "crystal, else 'model'",
    )  # fmt: skip
    sa.add_argument(
        "--wyckoff-template",
        help="occupied Wyckoff positions, e.g. '4a 4b' (one --spacegroup; elements free)",
    )
    sa.add_argument(
        "--condition",
        action="append",
        metavar="NAME=VALUE",
        help="target property of a conditioned model, e.g. --condition band_gap=3.0 "
        "--condition pressure=40 (repeatable; `crystal-gpt models` lists each model's)",
    )
    sa.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale toward --condition (default 1: the conditional "
        "model; >1 pushes the group, letter and element choices further toward it)",
    )
    sa.add_argument(
        "--steer",
        metavar="NAME=VALUE",
        help="steer toward a property by a predictor (importance resampling), e.g. "
        "--steer band_gap=3.0; for properties the model was not trained on",
    )
    sa.add_argument(
        "--predictor",
        help="predictor name or file for --steer (default: <the model's dataset>_<NAME>, "
        "e.g. mp_20_band_gap)",
    )
    sa.add_argument(
        "--steer-width", type=float, default=0.5, help="Gaussian width of --steer (default 0.5)"
    )
    sa.add_argument(
        "--oversample", type=int, default=8, help="crystals drawn per kept one (default 8)"
    )
    sa.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="softens (>1) or sharpens (<1) the group, letter and element draws",
    )
    sa.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling of the discrete choices (default 1: off)",
    )
    sa.add_argument(
        "--seed",
        type=int,
        help="for reproducible samples: the same seed, -n, --batch-size and --chunk-size (or "
        "--shard-size) give the same crystals; another -n above one chunk is another draw",
    )
    sa.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    sa.add_argument(
        "--gpu-processes",
        type=int,
        default=1,
        help="parquet on a GPU: processes drawing shards at once, each with the model on the "
        "GPU (default 1: this process draws, the other cores write the rows); the sampler's "
        "host work, not the GPU, bounds one process",
    )
    sa.add_argument(
        "--batch-size",
        type=int,
        help=f"crystals drawn together (default {CPU_BATCH} on a CPU, {GPU_BATCH} on a GPU); "
        "part of a seeded run's identity",
    )
    sa.add_argument(
        "--chunk-size",
        type=int,
        default=1000,
        help="CPU, more than this many crystals: chunks of this size drawn at once, one per "
        "core, each seeded from --seed (default 1000); part of a seeded run's identity, which "
        "does not depend on the number of cores",
    )
    sa.add_argument("--out", default="samples", help="output folder (default ./samples)")
    sa.add_argument(
        "--format",
        choices=("cif", "parquet"),
        default="cif",
        help="cif (default): a CIF per crystal, samples.extxyz and summary.csv; parquet: "
        "part-00000.parquet ... shards (one row per crystal: formula, group, Wyckoff sites, "
        "lattice, atoms, CIF text, log-likelihood parts), one seed per shard (from --seed, 0 "
        "if not given), for large runs",
    )
    sa.add_argument(
        "--shard-size", type=int, default=10000, help="crystals per parquet shard (default 10000)"
    )
    sa.add_argument(
        "--resume",
        action="store_true",
        help="parquet: keep the shards an interrupted run with the same settings wrote",
    )
    _executor_options(sa)
    sa.set_defaults(func=cmd_sample)

    tp = sub.add_parser(
        "train-predictor",
        help="train a property predictor on the Wyckoff representation (ranking, --steer)",
    )
    tp.add_argument("--dataset", default="mp_20", help="dataset name or CSV (default mp_20)")
    tp.add_argument("--target", required=True, help="numeric column, e.g. band_gap")
    tp.add_argument("--out", required=True, help="run folder (best.pt, summary.json)")
    tp.add_argument("--epochs", type=int, default=60, help="at most this many (default 60)")
    tp.add_argument("--patience", type=int, default=10, help="early stopping (default 10)")
    tp.add_argument("--d-model", type=int, help="width (default 128)")
    tp.add_argument("--n-layers", type=int, help="transformer layers (default 3)")
    tp.add_argument("--dropout", type=float, help="dropout (default 0.1)")
    tp.add_argument("--seed", type=int, default=0, help="for a reproducible run (default 0)")
    tp.add_argument("--quiet", action="store_true", help="no progress output")
    tp.set_defaults(func=cmd_train_predictor)

    pr = sub.add_parser("predict", help="predict a property for generated crystals, ranked")
    pr.add_argument("samples", help="sample folder, CIF/extxyz file, or parquet shards")
    pr.add_argument("--predictor", default="mp_20_band_gap", help="bundled name or file")
    pr.add_argument("--target", type=float, help="rank by distance to this value")
    pr.add_argument("--out", default="predictions.csv", help="CSV (default predictions.csv)")
    pr.add_argument("--show", type=int, default=10, help="print the first N (default 10)")
    pr.set_defaults(func=cmd_predict)

    ec = sub.add_parser(
        "evaluate-conditions",
        help="sample a conditioned model at a grid of targets and measure what the samples "
        "achieve (CHGNet or a predictor) against the targets and unconditional samples",
    )
    ec.add_argument("--model", default="mp_20", help="bundled name or checkpoint path")
    ec.add_argument(
        "--property", required=True, help="a condition of the model, e.g. band_gap, "
        "formation_energy_per_atom (CHGNet), e_above_hull (CHGNet, relaxed)",
    )  # fmt: skip
    ec.add_argument(
        "--targets",
        required=True,
        help="comma-separated, e.g. 0,1.5,3,5 (negative ones after =: --targets=-3,-2,-1)",
    )
    ec.add_argument("-n", type=int, default=500, help="samples per target (default 500)")
    ec.add_argument(
        "--guidance", default="1", help="guidance scale(s), comma-separated (default 1)"
    )
    ec.add_argument(
        "--dataset",
        help="the model's training data (default: recorded in the model; mp_20): novelty is "
        "measured against it, and predictors default to <dataset>_<property>",
    )
    ec.add_argument(
        "--predictor", help="predictor file or bundled name (default <dataset>_<property>)"
    )
    ec.add_argument(
        "--relax-steps", type=int, default=0, help="CHGNet relaxation steps before the "
        "energy (default 0: the generated geometry; e_above_hull needs > 0)",
    )  # fmt: skip
    ec.add_argument("--tolerance", type=float, help="hit = within this of the target")
    ec.add_argument(
        "--steer", action="store_true", help="steer an unconditional model with a predictor "
        "(importance resampling) instead of conditioning; its rows are reported as 'steered'",
    )  # fmt: skip
    ec.add_argument(
        "--steer-predictor", help="predictor to steer with (default <dataset>_<property>)"
    )
    ec.add_argument("--steer-width", type=float, default=0.5, help="Gaussian width (0.5)")
    ec.add_argument("--oversample", type=int, default=8, help="drawn per kept crystal (8)")
    ec.add_argument("--no-baseline", action="store_true", help="skip the unconditional row")
    ec.add_argument(
        "--no-novelty",
        action="store_true",
        help="skip matching against the training crystals (slow for one-element datasets)",
    )
    ec.add_argument("--min-distance", default="auto", help="the sampler's distance rule")
    ec.add_argument("--seed", type=int, default=0, help="seed of the first row (default 0)")
    ec.add_argument("--workers", type=int, help="processes for CHGNet and matching")
    ec.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    ec.add_argument("--out", default="conditioning_eval", help="output folder")
    ec.set_defaults(func=cmd_evaluate_conditions)

    ep = sub.add_parser(
        "evaluate-pressure",
        help="a pressure-conditioned model's samples at several pressures vs alex_pressure's "
        "test split: volume per atom, density, groups, validity, uniqueness, novelty, plot",
    )
    ep.add_argument("--model", default="alex_pressure", help="bundled name or checkpoint path")
    ep.add_argument(
        "--pressures", default="0,25,40,50,75,100,125,150", help="GPa, comma-separated; any "
        "value in the training range (default 0,25,40,50,75,100,125,150)",
    )  # fmt: skip
    ep.add_argument("-n", type=int, default=500, help="samples per pressure (default 500)")
    ep.add_argument("--seed", type=int, default=0, help="seed of the first pressure (default 0)")
    ep.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    ep.add_argument("--min-distance", default="auto", help="the sampler's distance rule")
    ep.add_argument("--no-novelty", action="store_true", help="skip matching against training")
    ep.add_argument(
        "--stability", type=int, default=0, metavar="K", help="relax K samples per pressure "
        "with CHGNet under that pressure; enthalpy above the CHGNet hull of the training "
        "materials in the samples' chemical systems, relaxed under the pressure too",
    )  # fmt: skip
    ep.add_argument("--stability-pressures", help="only at these pressures (default: all)")
    ep.add_argument(
        "--hull-relax-steps", type=int, default=500, metavar="N", help="relaxation steps of "
        "the hull's training materials (default 500, as the samples'; cached across runs); 0: "
        "the prebuilt single-point hull (`crystal-gpt hull build --dataset alex_pressure "
        "--pressure P --splits train`), inconsistent at high pressure",
    )  # fmt: skip
    ep.add_argument("--workers", type=int, help="processes for matching (default 1)")
    ep.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    ep.add_argument("--out", default="pressure_eval", help="output folder")
    ep.set_defaults(func=cmd_evaluate_pressure)

    cs = sub.add_parser(
        "evaluate-csp",
        help="structure prediction: sample k crystals per test composition, match rate @1/@k",
    )
    cs.add_argument("--model", default="mp_20", help="bundled model name or checkpoint path")
    cs.add_argument("--dataset", default="mp_20", help="targets' dataset (default mp_20)")
    cs.add_argument("--split", default="test", help="targets' split (default test)")
    cs.add_argument(
        "--pressure",
        type=float,
        help="alex_pressure: the targets at this pressure (GPa: 0, 25, ..., 150); a "
        "pressure-conditioned model is given it with each composition",
    )
    cs.add_argument("-k", type=int, default=20, help="predictions per composition (default 20)")
    cs.add_argument(
        "--candidates", type=int, metavar="M", help="draw M >= k samples per composition and "
        "predict the k most probable distinct structures among them (how often drawn, then "
        "the discrete draws' log-probability); default: the k samples as drawn",
    )  # fmt: skip
    cs.add_argument("--limit", type=int, help="a random subset of this many test crystals")
    cs.add_argument("--subset-seed", type=int, default=0, help="seed of --limit's subset")
    cs.add_argument("--temperature", type=float, default=1.0, help="as for sample (default 1)")
    cs.add_argument("--top-p", type=float, default=1.0, help="as for sample (default 1: off)")
    cs.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    cs.add_argument(
        "--min-distance", default="auto", help="the sampler's distance rule (as for sample)"
    )
    cs.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    cs.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    cs.add_argument("--out", default="csp_eval", help="output folder (default ./csp_eval)")
    cs.add_argument(
        "--chunk-size", type=int, metavar="N", help="work through the targets N at a time, "
        "each finished chunk saved under OUT/chunks/ (chunk c seeded from --seed and c), so "
        "that a long run can be stopped and continued with --resume",
    )  # fmt: skip
    cs.add_argument(
        "--resume", action="store_true", help="with --chunk-size: keep the chunks already in "
        "OUT/chunks/ (same settings required) and draw only the missing ones",
    )  # fmt: skip
    cs.add_argument(
        "--chunks", metavar="LIST", help="with --chunk-size: draw only these chunks (numbered "
        "from 1 as the log counts them, e.g. 1-10 or 11-19,23), so that several processes or "
        "machines share one --out; the report comes from the run that finds every chunk done",
    )  # fmt: skip
    _executor_options(cs)
    cs.set_defaults(func=cmd_evaluate_csp)

    ev = sub.add_parser(
        "evaluate",
        help="CDVAE metrics, uniqueness, novelty, symmetry statistics and a report",
        description="Evaluate generated crystals like CDVAE/DiffCSP/FlowMM: validity, coverage "
        "(COV-R/P), Wasserstein distances of density and #elements, uniqueness, novelty against "
        "the training crystals, space-group statistics; writes report.md/html, metrics.json, "
        "crystals.csv and plots. The reference fingerprints of a split are computed once and "
        "cached; mp_20's test split ships with the package (building it takes ~41 min of "
        "CrystalNN on 2 cores); fill the cache for another dataset ahead with "
        "`crystal-gpt evaluate --build-reference --dataset perov_5`.",
    )
    ev.add_argument(
        "samples",
        nargs="?",
        help="a `crystal-gpt sample` folder, a folder of CIFs, a .cif, an .extxyz, a "
        "summary.csv or a CDVAE-format CSV",
    )
    ev.add_argument("--dataset", default="mp_20", help="reference dataset (default mp_20)")
    ev.add_argument(
        "--out", help="report folder (default: SAMPLES/evaluation for a folder, else "
        "<file stem>_evaluation beside the file)",
    )  # fmt: skip
    ev.add_argument(
        "--build-reference",
        action="store_true",
        help="compute and cache the reference fingerprints (and training formulas), then "
        "evaluate SAMPLES if given",
    )
    ev.add_argument("--reference-split", default="test", help="coverage reference (default test)")
    ev.add_argument("--train-split", default="train", help="novelty reference (default train)")
    ev.add_argument("--no-novelty", action="store_true", help="skip uniqueness and novelty")
    ev.add_argument(
        "--reference-limit",
        type=int,
        help="only the first N crystals of the reference and training splits (quick checks; "
        "numbers not comparable)",
    )
    ev.add_argument(
        "--n-property",
        type=int,
        default=1000,
        help="valid crystals drawn for the Wasserstein distances (protocol: 1000)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of that draw (default 0)")
    ev.add_argument("--struct-cutoff", type=float, help="COV structure cutoff (default: dataset's)")
    ev.add_argument("--comp-cutoff", type=float, help="COV composition cutoff")
    ev.add_argument(
        "--oxidation-table",
        choices=("smact14", "icsd24"),
        default="smact14",
        help="SMACT rule's oxidation states: smact14 (default; SMACT 2.2.1 as CDVAE ran it, "
        "the published tables' rule) or icsd24 (SMACT's ICSD-2024 table; not comparable)",
    )
    ev.add_argument(
        "--stability",
        action="store_true",
        help="also relax with CHGNet and compute energies above hull (slow; evaluation.stability)",
    )
    ev.add_argument("--workers", type=int, help="processes (default: all cores)")
    ev.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="per crystal and stage; a crystal past it, or whose worker dies, counts as failed "
        "(default: 300 s for features, 600 s for a relaxation)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    rx = sub.add_parser(
        "relax",
        help="relax crystals with CHGNet and rank them by energy above the hull (relaxed CIFs, "
        "relaxed.csv)",
    )
    rx.add_argument("samples", help="a sample folder, CIF files, extxyz, parquet or CSV")
    rx.add_argument("--out", required=True, help="output folder (resumes a killed run)")
    rx.add_argument(
        "--dataset", default="mp_20", help="whose CHGNet hull gives E_hull and the elemental "
        "references of the formation energy (default mp_20, shipped)",
    )  # fmt: skip
    rx.add_argument("--hull", help="a hull file instead (crystal-gpt hull build --out)")
    rx.add_argument(
        "--pressure", type=float, help="relax under this pressure (GPa) and rank by enthalpy "
        "above that pressure's hull (alex_pressure)",
    )  # fmt: skip
    rx.add_argument("--steps", type=int, default=500, help="FIRE steps at most (default 500)")
    rx.add_argument("--fmax", type=float, default=0.1, help="force threshold, eV/A (0.1)")
    rx.add_argument("--limit", type=int, help="only the first N crystals")
    rx.add_argument("--workers", type=int, help="processes (default: all cores)")
    rx.add_argument(
        "--time-limit", type=float, metavar="SECONDS", help="per crystal; past it the crystal "
        "counts as failed (default 600)",
    )  # fmt: skip
    rx.add_argument("--quiet", action="store_true", help="no progress bars")
    rx.set_defaults(func=cmd_relax)

    hu = sub.add_parser(
        "hull", help="CHGNet reference hull for stability / S.U.N. (build once, then info)"
    )
    hu_sub = hu.add_subparsers(dest="hull_command", required=True, metavar="ACTION")
    hub = hu_sub.add_parser(
        "build",
        help="CHGNet energies of a dataset's crystals + relaxed elemental references (~10 min "
        "for mp_20 on one core)",
    )
    hui = hu_sub.add_parser(
        "info", help="what a built hull holds; --check N: E_hull of N of its crystals"
    )
    for p in (hub, hui):
        p.add_argument("--dataset", default="mp_20", help="dataset name (default mp_20)")
        p.add_argument("--out", help="hull file (default: <cache>/hull/<dataset>_chgnet.json)")
        p.add_argument(
            "--pressure",
            type=float,
            help="alex_pressure: a hull of enthalpies E + PV at this pressure (GPa) from the "
            "crystals at that pressure, elemental references relaxed under it",
        )
    hub.add_argument(
        "--splits",
        default="train,holdout,test",
        help="comma-separated splits whose crystals form the reference (default: all)",
    )
    hub.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    hub.add_argument("--limit", type=int, help="at most N crystals per split (quick trials)")
    hub.add_argument(
        "--relax-steps",
        type=int,
        default=0,
        help="relax the dataset crystals too (default 0: single points at DFT geometries; "
        "resumable, written to <cache>/hull/<dataset>[_<P>GPa]_relaxed_chgnet.json)",
    )
    hub.add_argument(
        "--systems", metavar="A-B,C-D-E", help="only the crystals inside these chemical "
        "systems (exact E_hull there at a fraction of the cost; other systems are refused)",
    )  # fmt: skip
    hub.add_argument(
        "--systems-from", nargs="+", metavar="PATH", help="only the chemical systems of the "
        "crystals in these files or sample folders (e.g. the samples to be judged)",
    )  # fmt: skip
    hui.add_argument("--relaxed", action="store_true", help="the hull built with --relax-steps")
    hub.add_argument("--quiet", action="store_true", help="no progress bars")
    hui.add_argument("--check", type=int, default=0, metavar="N", help="E_hull of N references")
    hu.set_defaults(func=cmd_hull)

    mo = sub.add_parser("models", help="list the bundled models")
    mo.set_defaults(func=cmd_models)

    co = sub.add_parser(
        "convert",
        help="rewrite an old checkpoint (from before weights-only loading) so that it loads",
    )
    co.add_argument("old", help="the old .pt file (it is unpickled: trusted files only)")
    co.add_argument("new", help="the new .pt file (must not exist)")
    co.add_argument(
        "--trust", action="store_true", help="confirm that you trust OLD (reading it runs code)"
    )
    co.set_defaults(func=cmd_convert)

    nl = sub.add_parser("nll", help="exact negative log-likelihood of a split under a model")
    nl.add_argument("checkpoint", help="a run's best.pt / last.pt, or a bundled model name")
    nl.add_argument("--dataset", default="mp_20", help="dataset name or CSV (default mp_20)")
    nl.add_argument("--split", default="test", help="split to score (default test)")
    nl.add_argument(
        "--symprec", type=float, default=DEFAULT_SYMPREC, help="encoding tolerance in Angstrom"
    )
    nl.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    nl.add_argument("--threads", type=int, help="CPU threads for torch")
    nl.add_argument("--json", action="store_true", help="print the figures as JSON")
    nl.add_argument(
        "--hide-conditions",
        help="score a conditioned model with these conditions hidden (comma-separated, or "
        "'all': the unconditional NLL); by default every condition is given its data value",
    )
    nl.add_argument("--quiet", action="store_true", help="no progress bars")
    nl.set_defaults(func=cmd_nll)
    return ap


def main(argv: list[str] | None = None) -> int:
    import warnings

    # pymatgen's note on noble gases without a Pauling electronegativity (SMACT and the
    # featurisers read it) says nothing to a user of the command line
    warnings.filterwarnings("ignore", message="No Pauling electronegativity")
    args = build_parser().parse_args(argv)
    try:
        with use_executor(getattr(args, "executor", "process"), getattr(args, "ray_address", None)):
            return int(args.func(args) or 0)
    except (DatasetError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"crystal-gpt: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("crystal-gpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
