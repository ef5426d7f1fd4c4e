"""The best grid this storage format admits, found by brute force: a yardstick for solvers, not a solver.

For every group, every pair of clipping fractions ``(alpha_lo, alpha_hi)`` from a grid is tried: the group's grid is
set to span ``[min + alpha_lo * range, max - alpha_hi * range]``, then refined by "round, least-squares refit"
steps, and the candidate with the lowest error is kept. The fractions are the union of two grids:

* ``num_fractions`` fractions spaced quadratically from 0 to ``max_fraction``, which reach the large clippings that
  matter at 2 and 3 bits;
* fractions a quarter of a quantization step apart (``k / (4 * (2**bits - 1))``), from one step of widening
  (``k = -4``) to four steps of clipping (``k = 16``). At 8 bits the quadratic grid's first non-zero fraction is
  already a quarter of a step and its next one a whole step, and the error of a group swings by about a tenth
  between such neighbours; this fine grid lowered the 8-bit yardstick on three MiniLM layers from 0.927x to 0.902x
  the round-to-nearest error.

It costs ``(number of fractions)**2 * (refine_steps + 1)`` solver steps (about 2,000 candidates), so it is meant for
a few layers in a benchmark.
"""

from __future__ import annotations

import torch

from .solver import _GROUPS_PER_BLOCK, QuantizedWeight, _check_solver_input, _Groups, grouped_weight

__all__ = ["clipping_search_quantize"]

# The fine grid: fractions k / (_FINE_PER_STEP * qmax) for k in [_FINE_LOWEST, _FINE_HIGHEST].
_FINE_PER_STEP = 4
_FINE_LOWEST = -4
_FINE_HIGHEST = 16


def clipping_fractions(bits: int, num_fractions: int, max_fraction: float) -> list[float]:
    """The sorted clipping fractions tried at each end of a group's range (see the module docstring)."""
    qmax = 2**bits - 1
    coarse = (max_fraction * torch.linspace(0, 1, num_fractions) ** 2).tolist()
    fine = [k / (_FINE_PER_STEP * qmax) for k in range(_FINE_LOWEST, _FINE_HIGHEST + 1)]
    return sorted({round(f, 12) for f in coarse + fine if f <= max_fraction})


def _search_block(
    groups: _Groups, fractions: list[float], *, qmax: int, refine_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best refined clipping of every group of a block: scale, zero and error, ``[groups]`` each."""
    lo0, hi0 = groups.W.aminmax(dim=1)
    span0 = (hi0 - lo0).clamp_min(1e-8)
    q = torch.empty_like(groups.W)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale = torch.ones_like(lo0)
    best_zero = torch.zeros_like(lo0)
    for a_lo in fractions:
        for a_hi in fractions:
            if a_lo + a_hi >= 0.95:
                continue
            lo = lo0 + a_lo * span0
            hi = hi0 - a_hi * span0
            scale = (hi - lo) / qmax
            zero = -lo / scale
            for _ in range(refine_steps):
                scale, zero = groups.refit(groups.round(scale, zero, qmax, out=q), scale)
            err = groups.error(groups.round(scale, zero, qmax, out=q), scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero, best_err


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
    """Exhaustive search over per-group clipping ranges, each refined by least squares; keeps the best per group.

    Returns a `QuantizedWeight` like `gnpiq_quantize` does; its ``error_history`` holds the single float32 error of
    the best candidates, and its ``final_error`` the error once scale and zero are stored in float16.
    """
    _check_solver_input(W, bits, group_size, importance)
    qmax = 2**bits - 1
    out_features, in_features = W.shape
    Wg, hg = grouped_weight(W.detach().float(), group_size, importance)
    fractions = clipping_fractions(bits, num_fractions, max_fraction)

    # Block by block, as the solver does, so each block stays in the CPU cache across all candidates.
    scales, zeros, errors = [], [], []
    for start in range(0, Wg.shape[0], _GROUPS_PER_BLOCK):
        block = slice(start, start + _GROUPS_PER_BLOCK)
        groups = _Groups(Wg[block], None if hg is None else hg[block])
        scale, zero, err = _search_block(groups, fractions, qmax=qmax, refine_steps=refine_steps)
        scales.append(scale)
        zeros.append(zero)
        errors.append(err)
    scale16, zero16 = torch.cat(scales).half(), torch.cat(zeros).half()

    groups = _Groups(Wg, hg)
    q = groups.round(scale16.float(), zero16.float(), qmax, out=torch.empty_like(Wg))
    final = float(groups.error(q, scale16.float(), zero16.float()).sum())
    num_groups = Wg.shape[0] // out_features
    return QuantizedWeight(
        codes=q.to(torch.uint8).view(out_features, -1),
        scale=scale16.view(out_features, num_groups),
        zero=zero16.view(out_features, num_groups),
        in_features=in_features,
        error_history=(float(torch.cat(errors).sum()),),
        final_error=final,
    )
