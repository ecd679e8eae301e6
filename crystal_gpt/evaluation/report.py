"""The evaluation report: report.md (+ report.html), metrics.json, crystals.csv and PNG plots.

Every number is printed with the protocol that produced it, and for the benchmark datasets the
published numbers (REFERENCE.md section 3) sit beside ours. Stability results (CHGNet relaxation,
energy above hull) are optional: pass the dict of ``evaluate_stability`` and its
E_hull histogram, summary numbers and S.U.N. rates are added.
"""

from __future__ import annotations

import csv
import html as html_lib
import itertools
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crystal_gpt.data.symmetry import CRYSTAL_SYSTEMS
from crystal_gpt.evaluation.features import SYMPREC
from crystal_gpt.evaluation.metrics import (
    PUBLISHED_MP20,
    PUBLISHED_OTHER,
    spacegroup_histogram,
    sun_rates,
)
from crystal_gpt.utils import fmt

if TYPE_CHECKING:
    from crystal_gpt.evaluation.suite import Evaluation

LATTICE_LABELS = ("a (A)", "b (A)", "c (A)", "alpha (deg)", "beta (deg)", "gamma (deg)")


# ---------------------------------------------------------------------------------------------
# plots


def _plots(ev: Evaluation, out: Path, stability: dict | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, r, idx = ev.samples, ev.reference, ev.property_index
    ref_label = f"{ev.metrics['dataset']} {ev.metrics['reference_split']}"
    files: dict[str, str] = {}

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files[name] = title

    gen_rho = s.density[idx] if len(idx) else s.density[np.isfinite(s.density)]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    hi = np.nanpercentile(np.concatenate([gen_rho, r.density]), 99.5) if len(gen_rho) else 10
    bins = np.linspace(0, hi, 50)
    ax.hist(r.density, bins, density=True, alpha=0.5, label=ref_label)
    ax.hist(gen_rho, bins, density=True, histtype="step", lw=1.8, label="generated (valid)")
    ax.set(xlabel="density (g/cm$^3$)", ylabel="probability density")
    ax.legend()
    save(fig, "density.png", "Density")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    gen_nel = s.n_elements[idx] if len(idx) else s.n_elements
    top = int(max(gen_nel.max(initial=1), r.n_elements.max(initial=1)))
    k = np.arange(1, top + 1)
    pg = np.array([(gen_nel == v).mean() if len(gen_nel) else 0 for v in k])
    pr = np.array([(r.n_elements == v).mean() for v in k])
    ax.bar(k - 0.2, pr, 0.4, label=ref_label)
    ax.bar(k + 0.2, pg, 0.4, label="generated (valid)")
    ax.set(xlabel="number of distinct elements", ylabel="share", xticks=k)
    ax.legend()
    save(fig, "num_elements.png", "Number of elements")

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for j, ax in enumerate(axes.ravel()):
        a, b = s.lattice[:, j], r.lattice[:, j]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        both = np.concatenate([a, b])
        if len(both) == 0:
            continue
        lo, hi = np.percentile(both, [0.5, 99.5])
        bins = np.linspace(lo, hi + 1e-9, 40)
        ax.hist(b, bins, density=True, alpha=0.5, label=ref_label)
        ax.hist(a, bins, density=True, histtype="step", lw=1.6, label="generated")
        ax.set_xlabel(LATTICE_LABELS[j])
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"conventional standard cell (spglib, symprec {SYMPREC})", fontsize=10)
    save(fig, "lattice.png", "Lattice parameters")

    hg, hr = spacegroup_histogram(s.spacegroup), spacegroup_histogram(r.spacegroup)
    pg, pr = hg / max(hg.sum(), 1), hr / max(hr.sum(), 1)
    order = np.argsort(-(pg + pr)[1:])[:30] + 1
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5))
    x = np.arange(len(order))
    axes[0].bar(x - 0.2, pr[order], 0.4, label=ref_label)
    axes[0].bar(x + 0.2, pg[order], 0.4, label="generated")
    axes[0].set(xticks=x, ylabel="share", title="30 most common space groups")
    axes[0].set_xticklabels([str(g) for g in order], fontsize=7)
    axes[0].legend()
    bounds = [1, 3, 16, 75, 143, 168, 195, 231]  # first group of each crystal system
    sys_g = [pg[a:b].sum() for a, b in itertools.pairwise(bounds)]
    sys_r = [pr[a:b].sum() for a, b in itertools.pairwise(bounds)]
    x = np.arange(7)
    axes[1].bar(x - 0.2, sys_r, 0.4, label=ref_label)
    axes[1].bar(x + 0.2, sys_g, 0.4, label="generated")
    axes[1].set(xticks=x, ylabel="share", title="crystal systems")
    axes[1].set_xticklabels(CRYSTAL_SYSTEMS)
    axes[1].legend()
    save(fig, "spacegroups.png", "Space groups")

    if stability is not None and stability.get("e_above_hull") is not None:
        e = np.asarray(stability["e_above_hull"], dtype=float)
        e = e[np.isfinite(e)]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        if len(e):
            ax.hist(np.clip(e, None, 1.0), bins=50)
        for t, c in ((0.0, "k"), (0.1, "r")):
            ax.axvline(t, color=c, ls="--", lw=1)
        ax.set(xlabel="energy above hull (eV/atom, clipped at 1)", ylabel="crystals")
        save(fig, "e_above_hull.png", "Energy above hull")
    return files


# ---------------------------------------------------------------------------------------------
# tables


def _metric_rows(m: dict) -> tuple[list[str], list[list[str]]]:
    """The CDVAE table: ours, the protocol, and published numbers where they exist."""
    v, c, p = m["validity"], m["coverage"], m["property"]
    rows = [
        ("struct", "Structural validity %", v["struct_valid"], m["protocol"]["struct"]),
        ("comp", "Compositional validity %", v["comp_valid"], m["protocol"]["comp"]),
        (
            "cov_r",
            "COV-R %",
            c["cov_recall"],
            f"CDVAE; cutoffs struct {c['struct_cutoff']} / comp {c['comp_cutoff']} "
            f"({c['cutoffs']})",
        ),
        ("cov_p", "COV-P %", c["cov_precision"], "CDVAE, / all generated"),
        (
            "wd_rho",
            "wdist density",
            p["wdist_density"],
            f"{p['n_used']} valid (seed {p['seed']}) vs {m['reference_crystals']} reference",
        ),
        ("wd_nel", "wdist #elements", p["wdist_num_elements"], "same crystals"),
    ]
    if m["dataset"] == "mp_20":
        published = PUBLISHED_MP20
    elif m["dataset"] in PUBLISHED_OTHER:
        published = {"CDVAE": PUBLISHED_OTHER[m["dataset"]]}
    else:
        published = {}
    header = ["metric", "ours", "protocol", *[f"{k} (published)" for k in published]]
    table = []
    for key, label, ours, proto in rows:
        digits = 3 if key.startswith("wd") else 2
        table.append(
            [
                label,
                fmt(ours, digits),
                proto,
                *[fmt(pub.get(key), digits) for pub in published.values()],
            ]
        )
    return header, table


_SHARE_KEYS = ("stable", "metastable", "sun", "converged")


def _stability_rows(stability: dict, ev: Evaluation) -> list[list[str]]:
    """Scalar entries of the stability dict (shares of all crystals shown as %)."""
    rows = []
    for k, val in stability.items():
        if isinstance(val, float) and k.startswith(_SHARE_KEYS):
            rows.append([f"{k} %", fmt(100 * val, 2)])
        elif isinstance(val, bool | int | float | str) or val is None:
            rows.append([k, fmt(val, 4)])
        elif isinstance(val, dict) and val and k != "protocol":
            rows.append([k, ", ".join(f"{a}: {b}" for a, b in val.items())])
    e = stability.get("e_above_hull")
    if e is not None and ev.unique is not None and len(e) == len(ev.unique):
        for k, val in sun_rates(e, ev.unique, ev.novel).items():
            rows.append(
                [f"S.U.N. % (E_hull <= {k[4:]} eV/atom, unique, novel; / all)", fmt(100 * val, 2)]
            )
    return rows


# ---------------------------------------------------------------------------------------------
# rendering: one list of blocks, two formats


def _blocks(ev: Evaluation, plots: dict[str, str], stability: dict | None) -> list[tuple]:
    m = ev.metrics
    b: list[tuple] = [("h1", f"crystal-gpt evaluation: {m['crystals']} crystals vs {m['dataset']}")]
    lines = [
        f"Source: `{m['source']}`; {m['crystals']} crystals read"
        + (f", **{m['unreadable']} unreadable (skipped, listed below)**" if m["unreadable"] else "")
        + ".",
        f"Reference: {m['dataset']} / {m['reference_split']} ({m['reference_crystals']} "
        "crystals, fingerprints cached).",
    ]
    if m["departures"]:
        lines.append(
            "**Not comparable with the published tables**: "
            + "; ".join(m["departures"])
            + ". The protocol: 10,000 generated, 1,000 valid crystals for the property "
            "statistics, the whole test split as reference, the dataset's coverage cutoffs, "
            "SMACT 2.2.1's oxidation states."
        )
    else:
        lines.append("Every condition of the CDVAE protocol holds: comparable with the tables.")
    b.append(("p", " ".join(lines)))
    b.append(("h2", "CDVAE metrics"))
    header, rows = _metric_rows(m)
    b.append(("table", header, rows))
    v = m["validity"]
    extra = (
        f"Constructed {fmt(v['constructed'])}%, valid (struct and comp and fingerprint) "
        f"{fmt(v['valid'])}%, fingerprint failures {v['fingerprint_failures']}. "
        f"The reference split itself: struct {fmt(m['reference_self']['struct_valid'])}%, "
        f"comp {fmt(m['reference_self']['comp_valid'])}% (the ceiling for comp)."
    )
    if "struct_valid_readable_only" in v:
        extra += (
            f" The {m['unreadable']} unreadable files count as invalid crystals above (CDVAE's "
            "'not constructed'); over the readable ones only: struct "
            f"{fmt(v['struct_valid_readable_only'])}%, comp {fmt(v['comp_valid_readable_only'])}%."
        )
    c = m["coverage"]
    extra += (
        f" Mean nearest distances: AMSD-R {fmt(c['amsd_recall'], 3)}, AMSD-P "
        f"{fmt(c['amsd_precision'], 3)}, AMCD-R {fmt(c['amcd_recall'], 3)}, AMCD-P "
        f"{fmt(c['amcd_precision'], 3)}."
    )
    b.append(("p", extra))
    un = m.get("uniqueness_novelty")
    if un:
        b.append(("h2", "Uniqueness and novelty"))
        b.append(
            (
                "table",
                ["metric", "ours", "protocol"],
                [
                    ["Unique %", fmt(un["unique"]), m["protocol"]["uniqueness"]],
                    [
                        "Novel %",
                        fmt(un["novel"]),
                        f"vs {m['dataset']} {un['train_split']} ({un['train_crystals']} crystals)",
                    ],
                    ["Unique and novel %", fmt(un["unique_and_novel"]), "/ all crystals"],
                    ["Valid, unique and novel %", fmt(un["valid_unique_novel"]), "/ all crystals"],
                    ["P1 share of novel %", fmt(un["novel_p1_share"]), "WyFormer's 'P1 %'"],
                ],
            )
        )
    sy = m["symmetry"]
    b.append(("h2", "Symmetry"))
    b.append(
        (
            "table",
            ["metric", "generated", m["reference_split"], "protocol"],
            [
                [
                    "P1 share %",
                    fmt(sy["p1_share"]),
                    fmt(sy["p1_share_reference"]),
                    m["protocol"]["symmetry"],
                ],
                [
                    "distinct space groups",
                    str(sy["distinct_spacegroups"]),
                    str(sy["distinct_spacegroups_reference"]),
                    "",
                ],
                [
                    "space-group total variation distance %",
                    fmt(sy["spacegroup_tvd"]),
                    "",
                    "half the L1 distance of the two distributions over the 230 groups",
                ],
                ["symmetry analysis failures", str(sy["symmetry_failures"]), "", ""],
            ],
        )
    )
    if stability is not None:
        b.append(("h2", "Stability"))
        b.append(("table", ["metric", "value"], _stability_rows(stability, ev)))
    b.append(("h2", "Plots"))
    for name, title in plots.items():
        b.append(("img", name, title))
    b.append(("h2", "Timings"))
    b.append(("p", ", ".join(f"{k} {val:.1f} s" for k, val in m["timings_s"].items())))
    if ev.errors:
        b.append(("h2", f"Unreadable inputs ({len(ev.errors)})"))
        shown = [f"`{f}`: {why}" for f, why in ev.errors[:50]]
        if len(ev.errors) > 50:
            shown.append(f"... and {len(ev.errors) - 50} more (metrics.json lists all)")
        b.append(("list", shown))
    return b


def _to_md(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}\n")
        elif kind == "h2":
            out.append(f"## {blk[1]}\n")
        elif kind == "p":
            out.append(blk[1] + "\n")
        elif kind == "table":
            header, rows = blk[1], blk[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n")
        elif kind == "list":
            out += [f"- {x}" for x in blk[1]]
            out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    parts = html_lib.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _to_html(blocks: list[tuple], title: str) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html_lib.escape(title)}</title><style>body{{font-family:sans-serif;"
        "max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid "
        "#ccc;padding:3px 8px;font-size:14px}img{max-width:100%}</style></head><body>",
    ]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline_html(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in blk[1]))
            for r in blk[2]:
                out.append("<tr>" + "".join(f"<td>{_inline_html(x)}</td>" for x in r) + "</tr>")
            out.append("</table>")
        elif kind == "img":
            out.append(
                f"<p><img src='{html_lib.escape(blk[1])}' alt='{html_lib.escape(blk[2])}'></p>"
            )
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in blk[1]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    if isinstance(x, float | np.floating):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def write_report(
    ev: Evaluation,
    out_dir: str | os.PathLike,
    stability: dict | None = None,
    html: bool = True,
) -> Path:
    """Write report.md, report.html, metrics.json, crystals.csv and PNG plots into ``out_dir``.

    ``stability``: optional dict from ``evaluate_stability`` (keys such as
    ``e_above_hull`` (per crystal, NaN where it failed), ``stable_0.1``, ``stable_0.0``,
    ``metastable``, ``rmsd_mean``): plotted, tabulated and combined with uniqueness and novelty
    into S.U.N. rates.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(ev.metrics)
    if stability is not None:
        n = len(ev.samples)
        metrics["stability"] = {  # per-crystal lists go to crystals.csv instead
            k: v for k, v in stability.items() if not (isinstance(v, list) and len(v) == n)
        }
        e = stability.get("e_above_hull")
        if e is not None and ev.unique is not None and len(e) == len(ev.unique):
            metrics["stability"].update(
                {k: round(100 * val, 4) for k, val in sun_rates(e, ev.unique, ev.novel).items()}
            )
    metrics["unreadable_files"] = [{"file": f, "reason": why} for f, why in ev.errors]
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1) + "\n")

    rows = ev.crystal_table()
    e = None if stability is None else stability.get("e_above_hull")
    if e is not None and len(e) == len(rows):
        for row, val in zip(rows, e, strict=True):
            row["e_above_hull"] = "" if val is None or not math.isfinite(val) else round(val, 4)
    if rows:
        with open(out / "crystals.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    plots = _plots(ev, out, stability)
    blocks = _blocks(ev, plots, stability)
    (out / "report.md").write_text(_to_md(blocks))
    if html:
        (out / "report.html").write_text(_to_html(blocks, blocks[0][1]))
    return out
