"""Statistics of an encoded dataset split: counts, space groups, crystal systems, sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np

from crystal_gpt.data.cache import EncodedDataset
from crystal_gpt.data.symmetry import CRYSTAL_SYSTEMS, get_tables


def dataset_statistics(ds: EncodedDataset) -> dict:
    """Counts, space-group and site-count statistics of an encoded split (for `data info`)."""
    tables = get_tables()
    n = len(ds)
    sg = Counter(ds.spacegroup.tolist())
    systems = Counter(CRYSTAL_SYSTEMS[int(tables.crystal_system[g])] for g in ds.spacegroup)

    def spread(x: np.ndarray) -> dict:
        if len(x) == 0:
            return {}
        return {"min": int(x.min()), "mean": round(float(x.mean()), 2), "max": int(x.max())}

    return {
        "crystals": n,
        "unreadable_rows": len(ds.errors),
        "symmetry_fallbacks": int(ds.fallback.sum()),
        "atoms_per_cell": spread(ds.num_atoms),
        "sites_per_crystal": spread(ds.num_sites),
        "distinct_elements": len(set(ds.species.tolist())),
        "distinct_spacegroups": len(sg),
        "p1_share": round(sg.get(1, 0) / max(n, 1), 4),
        "crystal_systems": {s: systems.get(s, 0) for s in CRYSTAL_SYSTEMS},
        "top_spacegroups": [
            {"number": g, "symbol": str(tables.symbol[g]), "count": c}
            for g, c in sg.most_common(10)
        ],
    }


def print_statistics(title: str, st: dict) -> None:
    print(f"\n== {title} ==")
    print(
        f"crystals            {st['crystals']}  (unreadable rows: {st['unreadable_rows']}, "
        f"symmetry fallbacks: {st['symmetry_fallbacks']})"
    )
    for key in ("atoms_per_cell", "sites_per_crystal"):
        s = st[key]
        if s:
            print(f"{key.replace('_', ' '):20s}min {s['min']}, mean {s['mean']}, max {s['max']}")
    print(f"distinct elements   {st['distinct_elements']}")
    print(
        f"space groups        {st['distinct_spacegroups']} distinct, P1 share "
        f"{100 * st['p1_share']:.2f}%"
    )
    print("crystal systems     " + ", ".join(f"{k} {v}" for k, v in st["crystal_systems"].items()))
    top = ", ".join(f"{t['symbol']} ({t['number']}) {t['count']}" for t in st["top_spacegroups"])
    print(f"most common groups  {top}")
