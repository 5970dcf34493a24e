"""Linear CKA by its definition (Kornblith et al., 2019), the tests' reference."""

from __future__ import annotations

import math

import numpy as np


def cka_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels and H = I - 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))
