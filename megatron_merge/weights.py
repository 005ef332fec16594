"""Merge weights: one number per checkpoint, for checkpoints ordered oldest first.

Every merge computes ``M = sum_i w_i * M_i`` over checkpoints ``M_1 .. M_N`` (``M_1`` the oldest).
This module only decides the ``w_i``; :mod:`megatron_merge.accumulate` applies them.

Methods (N >= 2 checkpoints, i = 1..N):

``sma``  simple moving average, the paper's default:  ``w_i = 1 / N``.

``ema``  exponential moving average with the paper's recursion
         ``M^(1) = M_1``, ``M^(i) = alpha * M_i + (1 - alpha) * M^(i-1)``, which unrolls to
         ``w_1 = (1 - alpha)^(N-1)`` and ``w_i = alpha * (1 - alpha)^(N-i)`` for ``i >= 2``.
         The weights already sum to 1 and are not renormalised. ``alpha`` in (0, 1];
         ``alpha = 1`` returns the newest checkpoint. Default 0.2 (the better of the paper's two).

``wma``  weighted moving average, newer weighs more: ``w_i = i / (N (N + 1) / 2)``.

``weights``  explicit weights, one per checkpoint, each >= 0, divided by their sum. With
         ``normalize=False`` they are used as given: any finite values, negative ones included
         (extrapolation, task arithmetic), as long as not all are zero.

``wsm-linear`` / ``wsm-minus-sqrt``  WSM ("Warmup-Stable and Merge", Tian et al. 2025,
         arXiv 2507.17634): merging the checkpoints of a constant-LR run emulates running an LR
         decay over the same window. Write the merge as ``M = M_1 + sum_k W_k (M_{k+1} - M_k)``:
         ``W_k`` is the LR multiplier the merge effectively applies to the updates between
         checkpoint k and k+1. For a decay shape ``g`` on [0, 1] with ``g(0) = 1`` and
         ``g(1) = 0`` we sample ``W_k = g(k / N)`` and get the telescoping weights

             w_i = g((i - 1) / N) - g(i / N),        i = 1..N,   sum_i w_i = g(0) - g(1) = 1.

         ``wsm-linear``: ``g(x) = 1 - x``, so ``w_i = 1 / N`` -- linear decay is the SMA, as the
         WSM paper notes. ``wsm-minus-sqrt``: ``g(x) = 1 - sqrt(x)`` (the "1-sqrt" cooldown),
         ``w_i = sqrt(i / N) - sqrt((i - 1) / N)``: the fast early LR drop keeps the merge close
         to the older checkpoints, so weights decrease from oldest to newest.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

METHODS = ("sma", "ema", "wma", "weights", "wsm-linear", "wsm-minus-sqrt")
DEFAULT_EMA_ALPHA = 0.2

# Decay shapes g(x) on [0, 1], g(0) = 1, g(1) = 0, for the WSM methods.
_WSM_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "wsm-linear": lambda x: 1.0 - x,
    "wsm-minus-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def merge_weights(
    method: str,
    n: int,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> list[float]:
    """Return the weight of each of ``n`` checkpoints (oldest first) under ``method``.

    Args:
        method: one of :data:`METHODS` (formulas in the module docstring).
        n: number of checkpoints; at least 2 (merging one checkpoint is refused).
        alpha: EMA smoothing factor in (0, 1]; only for ``ema`` (default 0.2).
        weights: explicit weights, only for ``weights``; ``len(weights) == n``; each >= 0
            unless ``normalize`` is False.
        normalize: divide explicit weights by their sum (only for ``weights``); without it
            they are used as given (see :func:`unusual_weights` for what to warn about).

    Raises:
        ValueError: with a message saying what was expected.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"merging needs at least 2 checkpoints, got {n}")
    if alpha is not None and method != "ema":
        raise ValueError(f"alpha is only used by the ema method, not {method!r}")
    if weights is not None and method != "weights":
        raise ValueError(f"explicit weights need method 'weights', not {method!r}")
    if not normalize and method != "weights":
        raise ValueError("normalize=False only applies to explicit weights (method 'weights')")

    if method == "sma":
        return [1.0 / n] * n
    if method == "ema":
        return _ema_weights(n, DEFAULT_EMA_ALPHA if alpha is None else alpha)
    if method == "wma":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method == "weights":
        return _explicit_weights(n, weights, normalize)
    decay = _WSM_DECAY_SHAPES[method]
    return [decay((i - 1) / n) - decay(i / n) for i in range(1, n + 1)]


def _ema_weights(n: int, alpha: float) -> list[float]:
    if not isinstance(alpha, (int, float)) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"ema alpha must be in (0, 1], got {alpha}")
    keep = 1.0 - alpha
    return [keep ** (n - 1)] + [alpha * keep ** (n - i) for i in range(2, n + 1)]


def _explicit_weights(n: int, weights: Sequence[float] | None, normalize: bool) -> list[float]:
    if weights is None:
        raise ValueError("method 'weights' needs one weight per checkpoint")
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"got {len(values)} weights for {n} checkpoints")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"weights must be finite, got {values}")
    if all(w == 0 for w in values):
        raise ValueError(f"weights must not all be zero, got {values}")
    if not normalize:
        return values
    if any(w < 0 for w in values):
        raise ValueError(f"weights must be >= 0 to be normalized, got {values}; "
                         f"use them as given with --no-normalize")
    return [w / math.fsum(values) for w in values]


def unusual_weights(weights: Sequence[float]) -> str | None:
    """Why weights used as given deserve a warning (negative, or not summing to 1), or None."""
    reasons = []
    if any(w < 0 for w in weights):
        reasons.append("some are negative (the merge extrapolates beyond the checkpoints)")
    total = math.fsum(weights)
    if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        reasons.append(f"they sum to {total:g}, not 1 (the merge scales every weight tensor by that)")
    return "; ".join(reasons) or None


def parse_weight_list(text: str) -> list[float]:
    """Parse ``"0.2,0.3,0.5"`` (the CLI's ``--weights``) into floats."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--weights expects comma-separated numbers, got {text!r}") from err
