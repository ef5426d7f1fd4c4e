"""GNP-IQ: Gaussian-noise-perturbed iterative quantization of one weight matrix.

The weight ``W`` of shape ``[out_features, in_features]`` is cut into groups of ``group_size`` consecutive input
columns. Each group ``g`` gets its own asymmetric grid: ``n``-bit codes ``q in {0, ..., 2**n - 1}``, a scale and a
zero point, and dequantizes to ``W_hat = scale * (q - zero)``. The solver minimises, independently per group,

    E_g(scale, zero) = sum_j h_j * (W_j - scale * (q_j - zero))**2,   q_j = clamp(round(W_j / scale + zero), 0, 2**n - 1)

where ``h_j`` is the importance of input channel ``j`` (mean squared activation over calibration batches, or 1 when
the solver is data-free). Rows whose input width is not a multiple of ``group_size`` are padded; padded entries get
``h = 0`` and so never influence a fit.

The search:

1. start from min-max rounding (the grid spans exactly the group's range);
2. each iteration proposes a new grid per group by rounding *perturbed* weights ``W + e`` with
   ``e ~ N(0, (sigma_t * scale)**2)`` on the current grid, refitting scale and zero in closed form (weighted least
   squares of ``W`` on the perturbed codes), then polishing with ``refine_steps`` rounds of "round, refit";
3. a group adopts the proposal only where it lowers ``E_g``, so the error never rises; ``sigma_t`` decays
   geometrically (``noise_std * noise_decay**t``) so late iterations explore close to the incumbent.

Rounding is the exact minimiser of ``E_g`` for a fixed grid and the least-squares refit the exact minimiser for fixed
codes, so "round, refit" alone descends to the nearest local minimum; the noise is what lets a group leave it, in
the spirit of the perturbations of MP-ISMoE (arXiv 2605.04058). Scales and zero points are finally stored in float16,
and the codes are rounded once more against those stored values, so what is evaluated is exactly what is served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["QuantizedWeight", "dequantize_groups", "gnpiq_quantize", "minmax_quantize"]

# Variance of the codes below which a least-squares refit of a group is ill-posed (all codes equal).
_MIN_CODE_VARIANCE = 1e-8

# Groups searched together; 2048 groups of 64 float32 weights keep a block's working tensors at 512 KiB each.
_GROUPS_PER_BLOCK = 2048


@dataclass(frozen=True)
class QuantizedWeight:
    """The output of the solver for one weight matrix.

    Attributes:
        codes: ``uint8 [out_features, padded_in_features]``, unpacked codes; ``padded_in_features`` is
            ``in_features`` rounded up to a multiple of ``group_size``.
        scale: ``float16 [out_features, num_groups]``.
        zero: ``float16 [out_features, num_groups]``, a real-valued zero point in code units.
        in_features: width of the original weight, before padding.
        error_history: the weighted squared error summed over all groups, after the start and after every
            iteration (float32 search, before the final float16 rounding); non-increasing.
        final_error: the same error for the stored float16 scale and zero point.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    in_features: int
    error_history: tuple[float, ...]
    final_error: float

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight, ``[out_features, in_features]`` in `dtype`."""
        return dequantize_groups(self.codes, self.scale, self.zero, self.in_features, dtype=dtype)


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, *, dtype: torch.dtype
) -> torch.Tensor:
    """``scale * (codes - zero)`` group by group, cropped to `in_features` columns.

    Args:
        codes: ``[out_features, num_groups * group_size]``, any integer dtype.
        scale, zero: ``[out_features, num_groups]``.
    """
    out_features, num_groups = scale.shape
    q = codes.view(out_features, num_groups, -1).to(dtype)  # [out, groups, group_size]
    W = (q - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]
    return W.view(out_features, -1)[:, :in_features]


def _group(
    W: torch.Tensor, group_size: int, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reshape `W` into groups ``[out * num_groups, group_size]`` with per-element weights ``h`` of the same shape.

    Padded columns repeat the last real column of their row, so they never widen a group's range, and get ``h = 0``.
    ``h`` is None (all ones) when there is neither importance nor padding, which saves a multiply in every step.
    """
    out_features, in_features = W.shape
    padding = (-in_features) % group_size
    if importance is None and not padding:
        return W.reshape(-1, group_size), None
    h = torch.ones(in_features, dtype=torch.float32, device=W.device) if importance is None else importance.float()
    if padding:
        W = torch.cat([W, W[:, -1:].expand(out_features, padding)], dim=1)
        h = torch.cat([h, h.new_zeros(padding)])
    Wg = W.reshape(-1, group_size)  # [out * groups, group_size]
    hg = h.view(1, -1, group_size).expand(out_features, -1, -1).reshape(-1, group_size)
    return Wg, hg


def _round(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest code on each group's grid: the exact minimiser of the error for a fixed scale and zero."""
    q = Wg * scale.reciprocal()[:, None]
    q += zero[:, None]
    return q.round_().clamp_(0, qmax)


def _weighted_mean(x: torch.Tensor, hg: torch.Tensor | None, H: torch.Tensor | float) -> torch.Tensor:
    return x.mean(dim=1) if hg is None else (hg * x).sum(dim=1) / H


def _refit(
    Wg: torch.Tensor, hg: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of ``W ~ a * q + b`` per group, returned as ``scale = a, zero = -b / a``.

    Minimises ``sum_j h_j (W_j - a q_j - b)**2`` in closed form (``h = 1`` when `hg` is None). Where the codes of a
    group are all equal the fit is ill-posed (any scale works); such groups, and any whose fitted scale is not
    positive, keep `scale`, and their zero point is moved so the group dequantizes to its weighted mean.
    """
    H = 1.0 if hg is None else hg.sum(dim=1).clamp_min(1e-30)
    q_mean = _weighted_mean(q, hg, H)
    W_mean = _weighted_mean(Wg, hg, H)
    dq = q - q_mean[:, None]
    var_q = _weighted_mean(dq * dq, hg, H)
    cov = _weighted_mean(dq * Wg, hg, H)  # the mean of W cancels against the centred codes

    a = cov / var_q.clamp_min(_MIN_CODE_VARIANCE)
    ok = (var_q > _MIN_CODE_VARIANCE) & (a > 0)
    new_scale = torch.where(ok, a, scale)
    new_zero = q_mean - W_mean / new_scale
    return new_scale, new_zero


def _error(Wg: torch.Tensor, hg: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """Weighted squared error of each group, ``[num_groups_total]``."""
    residual = q - zero[:, None]
    residual *= scale[:, None]
    residual -= Wg
    residual.square_()
    if hg is not None:
        residual *= hg
    return residual.sum(dim=1)


def _minmax(Wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid: codes 0 and ``qmax`` land exactly on each group's minimum and maximum."""
    lo = Wg.amin(dim=1)
    hi = Wg.amax(dim=1)
    # A constant group has no range; any positive scale represents it exactly through the zero point.
    span = torch.where(hi > lo, hi - lo, lo.abs().clamp_min(1e-8))
    scale = span / qmax
    zero = -lo / scale
    return scale, zero


def _perturbed_proposal(
    Wg: torch.Tensor,
    hg: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    qmax: int,
    sigma: float,
    refine_steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GNP-IQ proposal: codes of the noisy weights, refit to the true weights, then a few "round, refit" steps.

    The noise is measured in quantization steps of each group (``sigma * scale``), so one setting suits every bit
    width and every layer's weight magnitude. Returns the proposed scale, zero and their per-group error.
    """
    noise = torch.randn(Wg.shape, generator=generator, device=Wg.device, dtype=Wg.dtype)
    noise *= sigma * scale[:, None]
    noise += Wg
    q = _round(noise, scale, zero, qmax)
    scale, zero = _refit(Wg, hg, q, scale, zero)
    for _ in range(refine_steps):
        q = _round(Wg, scale, zero, qmax)
        scale, zero = _refit(Wg, hg, q, scale, zero)
    q = _round(Wg, scale, zero, qmax)
    return scale, zero, _error(Wg, hg, q, scale, zero)


def _search_block(
    Wg: torch.Tensor,
    hg: torch.Tensor | None,
    *,
    qmax: int,
    num_iterations: int,
    noise_std: float,
    noise_decay: float,
    refine_steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GNP-IQ search on a block of groups: returns scale, zero and the block's summed error per iteration."""
    # Start: the min-max grid.
    scale, zero = _minmax(Wg, qmax)
    err = _error(Wg, hg, _round(Wg, scale, zero, qmax), scale, zero)
    history = [err.sum()]

    # Perturb, refit, keep improvements group by group.
    for t in range(num_iterations):
        sigma = noise_std * noise_decay**t
        new_scale, new_zero, new_err = _perturbed_proposal(
            Wg, hg, scale, zero, qmax=qmax, sigma=sigma, refine_steps=refine_steps, generator=generator
        )
        better = new_err < err
        scale = torch.where(better, new_scale, scale)
        zero = torch.where(better, new_zero, zero)
        err = torch.where(better, new_err, err)
        history.append(err.sum())
    return scale, zero, torch.stack(history)


def gnpiq_quantize(
    W: torch.Tensor,
    *,
    bits: int = 8,
    group_size: int = 64,
    num_iterations: int = 20,
    noise_std: float = 0.5,
    noise_decay: float = 0.9,
    refine_steps: int = 2,
    seed: int = 0,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize one weight matrix with GNP-IQ (see the module docstring for the objective and the search).

    Args:
        W: ``[out_features, in_features]`` float weight; it is read, never modified.
        bits: code width, 2, 3, 4 or 8.
        group_size: input columns per group; a row whose width is not a multiple is padded (see `_group`).
        num_iterations: perturbed proposals per group; 0 gives plain least-squares-refined min-max rounding.
        noise_std: initial noise, in quantization steps of each group.
        noise_decay: factor applied to the noise after every iteration.
        refine_steps: "round, refit" steps that polish each proposal.
        seed: seeds the noise; the same seed gives identical codes.
        importance: optional ``[in_features]`` non-negative weight of each input channel in the error.

    Returns:
        A `QuantizedWeight` whose ``error_history`` never increases.
    """
    if W.dim() != 2:
        raise ValueError(f"`W` must be a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}.")
    if not torch.isfinite(W).all():
        raise ValueError("`W` contains NaN or Inf values; a quantization grid cannot be fitted to them.")
    qmax = 2**bits - 1
    out_features, in_features = W.shape

    Wg, hg = _group(W.detach().float(), group_size, importance)
    generator = torch.Generator(device=W.device).manual_seed(seed)

    # Groups are independent, so the whole search runs block by block: a block's working tensors stay in the CPU
    # cache across all iterations, which on a machine with little memory bandwidth is several times faster.
    scales, zeros, histories = [], [], []
    for start in range(0, Wg.shape[0], _GROUPS_PER_BLOCK):
        block = slice(start, start + _GROUPS_PER_BLOCK)
        scale, zero, history = _search_block(
            Wg[block],
            None if hg is None else hg[block],
            qmax=qmax,
            num_iterations=num_iterations,
            noise_std=noise_std,
            noise_decay=noise_decay,
            refine_steps=refine_steps,
            generator=generator,
        )
        scales.append(scale)
        zeros.append(zero)
        histories.append(history)
    scale, zero = torch.cat(scales), torch.cat(zeros)
    history = torch.stack(histories).sum(dim=0).tolist()

    # Store in float16 and round the codes against exactly what is stored.
    scale16, zero16 = scale.half(), zero.half()
    scale_f, zero_f = scale16.float(), zero16.float()
    q = _round(Wg, scale_f, zero_f, qmax)
    final_error = float(_error(Wg, hg, q, scale_f, zero_f).sum())

    num_groups = Wg.shape[0] // out_features
    return QuantizedWeight(
        codes=q.to(torch.uint8).view(out_features, -1),
        scale=scale16.view(out_features, num_groups),
        zero=zero16.view(out_features, num_groups),
        in_features=in_features,
        error_history=tuple(history),
        final_error=final_error,
    )


def minmax_quantize(W: torch.Tensor, *, bits: int = 8, group_size: int = 64) -> QuantizedWeight:
    """Plain round-to-nearest on each group's min-max grid: the baseline GNP-IQ starts from."""
    return gnpiq_quantize(W, bits=bits, group_size=group_size, num_iterations=0)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F``."""
    return math.sqrt(float(((W.float() - W_hat.float()) ** 2).sum()) / float((W.float() ** 2).sum()))
