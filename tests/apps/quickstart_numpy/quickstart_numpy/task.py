"""The model: a few float32 arrays whose total size is set by the run config."""

import numpy as np


def get_model(size_mb: float) -> list[np.ndarray]:
    n = max(1, int(size_mb * 1024 * 1024 / 4))
    rng = np.random.default_rng(0)  # random, so equal-looking chunks do not deduplicate
    return [rng.standard_normal(n, dtype=np.float32), np.zeros((2, 3), dtype=np.float32)]
