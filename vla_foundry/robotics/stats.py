"""Writing ``stats.json`` (format spec §12.1) from windows of low-dimensional data."""

from __future__ import annotations

import numpy as np

PERCENTILES = (1, 2, 5, 95, 98, 99)


def _summaries(x: np.ndarray, axis) -> dict[str, np.ndarray]:
    """The stats.json summaries of ``x`` reduced over ``axis``."""
    summary = {"mean": x.mean(axis=axis), "std": x.std(axis=axis), "min": x.min(axis=axis), "max": x.max(axis=axis)}
    for q in PERCENTILES:
        summary[f"percentile_{q}"] = np.percentile(x, q, axis=axis)
    return summary


def field_stats(fields: dict[str, np.ndarray]) -> dict[str, dict]:
    """{field: (N, Ts, d) windows} → {field: {mean, std, …: [d], …_per_timestep: [Ts][d], count: N}}.

    Global summaries pool all N·Ts rows; per-timestep ones pool the N windows at each step.
    """
    stats = {}
    for name, x in fields.items():
        x = np.asarray(x, dtype=np.float64)
        entry: dict = {k: [float(v) for v in value] for k, value in _summaries(x.reshape(-1, x.shape[-1]), 0).items()}
        for k, value in _summaries(x, 0).items():
            entry[f"{k}_per_timestep"] = [[float(v) for v in row] for row in value]
        entry["count"] = int(x.shape[0])
        stats[name] = entry
    return stats
