"""The best grid this storage format admits, found by brute force: a yardstick for solvers, not a solver.

For every group, every pair of clipping fractions ``(alpha_lo, alpha_hi)`` from a grid is tried: the group's grid is
set to span ``[min + alpha_lo * range, max - alpha_hi * range]``, then refined by "round, least-squares refit"
steps, and the candidate with the lowest error is kept. The fractions are spaced quadratically so that the small
clippings that matter at 8 bits are sampled finely while the large ones that matter at 2 bits are still reached.
It costs ``num_fractions**2 * (refine_steps + 1)`` solver steps, so it is meant for a few layers in a benchmark.
"""

from __future__ import annotations

import torch

from .solver import QuantizedWeight, _error, _group, _refit, _round

__all__ = ["clipping_search_quantize"]


def clipping_search_quantize(
    W: torch.Tensor,
    *,
    bits: int = 8,
    group_size: int = 64,
    num_fractions: int = 24,
    max_fraction: float = 0.5,
    refine_steps: int = 4,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Exhaustive search over per-group clipping ranges, each refined by least squares; keeps the best per group."""
    qmax = 2**bits - 1
    out_features, in_features = W.shape
    Wg, hg = _group(W.detach().float(), group_size, importance)
    lo0, hi0 = Wg.amin(dim=1), Wg.amax(dim=1)
    span0 = (hi0 - lo0).clamp_min(1e-8)
    fractions = max_fraction * torch.linspace(0, 1, num_fractions) ** 2

    best_err = torch.full_like(lo0, float("inf"))
    best_scale = torch.ones_like(lo0)
    best_zero = torch.zeros_like(lo0)
    for a_lo in fractions.tolist():
        for a_hi in fractions.tolist():
            if a_lo + a_hi >= 0.95:
                continue
            lo = lo0 + a_lo * span0
            hi = hi0 - a_hi * span0
            scale = (hi - lo) / qmax
            zero = -lo / scale
            for _ in range(refine_steps):
                q = _round(Wg, scale, zero, qmax)
                scale, zero = _refit(Wg, hg, q, scale, zero)
            err = _error(Wg, hg, _round(Wg, scale, zero, qmax), scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)

    scale16, zero16 = best_scale.half(), best_zero.half()
    q = _round(Wg, scale16.float(), zero16.float(), qmax)
    final = float(_error(Wg, hg, q, scale16.float(), zero16.float()).sum())
    num_groups = Wg.shape[0] // out_features
    return QuantizedWeight(
        codes=q.to(torch.uint8).view(out_features, -1),
        scale=scale16.view(out_features, num_groups),
        zero=zero16.view(out_features, num_groups),
        in_features=in_features,
        error_history=(float(best_err.sum()),),
        final_error=final,
    )
