"""Steering an unconditional model toward a property target with a predictor: importance
resampling, for properties the generator was not trained on (guidance needs training with the
condition; this needs only a predictor).

Draw ``oversample * n`` crystals from the model, weight each by a Gaussian of its predicted
value around the target, ``w = exp(-(y - target)^2 / (2 width^2))``, and keep n of them drawn
without replacement with probability proportional to w (Gumbel top-k). The kept crystals
approximate the model's distribution tilted by that Gaussian; the effective sample size says how
much of the pool carried the result.
"""

from __future__ import annotations

import numpy as np

from crystal_gpt.data.codec import WyckoffCrystal


def resample_indices(
    predicted: np.ndarray, target: float, width: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """n indices drawn without replacement with weights exp(-(y - t)^2 / 2 w^2), and the
    effective sample size of the weights, (sum w)^2 / sum w^2."""
    if not (np.isfinite(width) and width > 0):
        raise ValueError(f"steering width must be a positive number, got {width!r}")
    logw = -0.5 * ((np.asarray(predicted, dtype=float) - target) / width) ** 2
    logw = np.where(np.isfinite(logw), logw, -np.inf)
    keys = logw + rng.gumbel(size=len(logw))
    order = np.argsort(-keys, kind="stable")[:n]
    w = np.exp(logw - logw.max())
    ess = float(w.sum() ** 2 / (w**2).sum())
    return np.sort(order), ess


def steer(
    model,
    predictor,
    n: int,
    target: float,
    *,
    width: float = 0.5,
    oversample: int = 8,
    seed: int | None = None,
    progress: bool = False,
    **sample_options,
) -> tuple[list[WyckoffCrystal], dict]:
    """n crystals of ``model`` steered toward ``predictor``'s property = ``target``; each
    keeps its prediction in ``meta['predicted']``. Returns the crystals and a record (pool size,
    effective sample size, mean prediction of the pool and of the kept crystals)."""
    from crystal_gpt.sampling.sampler import sample_crystals

    if not isinstance(oversample, int) or oversample < 1:
        raise ValueError(f"oversample must be a whole number >= 1, got {oversample!r}")
    pool = sample_crystals(model, n * oversample, seed=seed, progress=progress, **sample_options)
    kept_pool = [c for c in pool if c is not None]
    predicted = predictor.predict_crystals(kept_pool)
    rng = np.random.default_rng(None if seed is None else seed + 1)
    idx, ess = resample_indices(predicted, target, width, min(n, len(kept_pool)), rng)
    name = predictor.config.target
    out = []
    for i in idx:
        c = kept_pool[i]
        c.meta["predicted"] = {name: float(predicted[i])}
        out.append(c)
    record = {
        "target": target,
        "property": name,
        "width": width,
        "pool": len(kept_pool),
        "effective_sample_size": ess,
        "pool_mean_prediction": float(predicted.mean()) if len(predicted) else float("nan"),
        "kept_mean_prediction": float(predicted[idx].mean()) if len(idx) else float("nan"),
    }
    return out, record
