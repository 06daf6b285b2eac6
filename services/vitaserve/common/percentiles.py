"""The one percentile of the benchmarks and the load test: linear interpolation between the two
nearest ranks (numpy's default, torch.quantile's too), so their p50 / p95 figures compare."""

from __future__ import annotations

import numpy as np


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) of `values`; NaN when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")
