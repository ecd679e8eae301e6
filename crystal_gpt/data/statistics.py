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


AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660


def cell_volumes(lattice: np.ndarray) -> np.ndarray:
    """Volumes (A^3) of cells given as (N, 6) a, b, c, alpha, beta, gamma (degrees)."""
    lat = np.asarray(lattice, dtype=float).reshape(-1, 6)
    ca, cb, cg = np.cos(np.radians(lat[:, 3:])).T
    root = np.sqrt(np.clip(1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg, 0, None))
    return lat[:, 0] * lat[:, 1] * lat[:, 2] * root


def atomic_masses() -> np.ndarray:
    """(119,) atomic mass by atomic number (0 for padding)."""
    from pymatgen.core.periodic_table import Element

    masses = np.zeros(119)
    for z in range(1, 119):
        masses[z] = float(Element.from_Z(z).atomic_mass)
    return masses


def crystal_masses(ds: EncodedDataset) -> np.ndarray:
    """Mass (u) of each crystal's conventional cell."""
    mult = get_tables().multiplicity[np.repeat(ds.spacegroup, ds.num_sites), ds.wyckoff]
    site_mass = mult * atomic_masses()[ds.species]
    return np.add.reduceat(site_mass, ds.site_start[:-1]) if len(ds) else site_mass


def pressure_statistics(ds: EncodedDataset) -> dict:
    """Per pressure (the ``pressure`` column, GPa): crystals, volume per atom and density
    (median, 10th and 90th percentile), space groups, and how many materials have another
    space group than at the lowest pressure (by this project's encoding, symprec as encoded)."""
    if "pressure" not in ds.properties:
        raise ValueError("the dataset has no pressure column")
    tables = get_tables()
    pressure = ds.properties["pressure"]
    vpa = cell_volumes(ds.lattice) / ds.num_atoms
    density = crystal_masses(ds) / cell_volumes(ds.lattice) * AMU_PER_A3_TO_G_PER_CM3
    levels = sorted(set(pressure.tolist()))
    base = {i: g for i, g, p in zip(ds.ids, ds.spacegroup, pressure, strict=True) if p == levels[0]}
    out = {}
    for p in levels:
        sel = pressure == p
        sg = Counter(ds.spacegroup[sel].tolist())
        pairs = [
            (base[i], g) for i, g in zip(ds.ids[sel], ds.spacegroup[sel], strict=True) if i in base
        ]
        out[f"{p:g}"] = {
            "crystals": int(sel.sum()),
            "volume_per_atom": _quantiles(vpa[sel]),
            "density": _quantiles(density[sel]),
            "distinct_spacegroups": len(sg),
            "p1_share": round(sg.get(1, 0) / max(int(sel.sum()), 1), 4),
            "top_spacegroups": [
                {"number": g, "symbol": str(tables.symbol[g]), "count": c}
                for g, c in sg.most_common(5)
            ],
            "changed_group_vs_lowest": sum(int(a != b) for a, b in pairs),
            "compared_materials": len(pairs),
        }
    return out


def _quantiles(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    q10, q50, q90 = np.percentile(x, [10, 50, 90])
    return {
        "median": round(float(q50), 3),
        "p10": round(float(q10), 3),
        "p90": round(float(q90), 3),
    }


def print_pressure_statistics(title: str, st: dict) -> None:
    print(f"\n== {title}: per pressure ==")
    print(
        f"{'GPa':>5} {'crystals':>8} {'V/atom A^3 (p10-p90)':>24} {'density g/cm3':>20} "
        f"{'groups':>6} {'changed vs lowest':>18}  most common"
    )
    for p, s in st.items():
        v, d = s["volume_per_atom"], s["density"]
        top = ", ".join(f"{t['symbol']} {t['count']}" for t in s["top_spacegroups"][:3])
        print(
            f"{p:>5} {s['crystals']:>8} {v['median']:>9.2f} ({v['p10']:.2f}-{v['p90']:.2f})"
            f"{'':>1} {d['median']:>8.2f} ({d['p10']:.2f}-{d['p90']:.2f}) "
            f"{s['distinct_spacegroups']:>6} {s['changed_group_vs_lowest']:>8} of "
            f"{s['compared_materials']:<6}  {top}"
        )
