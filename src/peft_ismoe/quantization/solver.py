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
2. each iteration proposes a new grid per group by rounding *perturbed* weights ``W + e`` on the current grid, with
   ``e ~ N(0, (sigma_t * scale)**2)``, refitting scale and zero in closed form (weighted least squares of ``W`` on
   the perturbed codes), then polishing with ``refine_steps`` rounds of "round, refit";
3. a group adopts the proposal only where it lowers ``E_g``, so the error never rises; ``sigma_t`` decays
   geometrically, ``sigma_t = noise_std * noise_decay**t * sqrt((2**n - 1) / 15)``, so late iterations explore close
   to the incumbent. The last factor is 1 at 4 bits and widens the noise on finer grids (2.1 quantization steps at
   8 bits against 0.22 at 2 bits, for ``noise_std = 0.5``): on a grid of 255 steps a nudge of half a step only
   reaches the neighbouring local minimum of ``E_g``, while on a grid of 3 steps it already moves the grid a lot.

Rounding is the exact minimiser of ``E_g`` for a fixed grid and the least-squares refit the exact minimiser for fixed
codes, so "round, refit" alone descends to the nearest local minimum; the noise is what lets a group leave it, in
the spirit of the perturbations of MP-ISMoE (arXiv 2605.04058). Scales and zero points are finally stored in float16,
and the codes are rounded once more against those stored values, so what is evaluated is exactly what is served.

The noise of a block of groups is drawn once, as a bank of Gaussian rows twice as many as the groups, and each
iteration deals every group a row picked at random and a random sign: drawing fresh Gaussians every iteration cost
as much as the rest of the iteration together.

Late iterations touch only the groups still moving (the *active set*): a group that has gone ``patience``
iterations in a row without improving leaves the search and keeps its grid, so the iterations after it cost only
what the remaining groups cost. A whole block stops once an iteration lowers its summed error by no more than
``tolerance`` of it. Both only skip proposals: the error still never rises and the same seed gives the same codes.
Measured on the limit layers of ``benchmarks/quantization.py`` at 2-8 bits, a patience of 5 runs 60-77% of the
group-iterations of the full search for at most 0.5% more error; 4 runs 50-65% for up to 1.1% more, 3 runs 40-51%
for up to 1.6% more. 5 is the smallest that keeps every error target of the benchmark (MiniLM at 4 bits, at 0.950x
HQQ's error, is the one that decides). A tolerance of ``1e-4`` saves at most 1% more work; ``1e-3`` saved up to 11%
but pushed that same 4-bit error over the target.

`search_grid` is the search itself, on any set of groups from any starting grid: `gnpiq_quantize` runs it from the
min-max grid on a whole weight, the re-quantization callback from a layer's stored grid on a few of its groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_int, is_real
from .packing import SUPPORTED_BITS

__all__ = [
    "GridSearch",
    "QuantizedWeight",
    "dequantize_groups",
    "gnpiq_quantize",
    "group_error",
    "grouped_weight",
    "minmax_quantize",
    "noise_in_steps",
    "round_to_grid",
    "search_grid",
]

# Variance of the codes below which a least-squares refit of a group is ill-posed (all codes equal).
_MIN_CODE_VARIANCE = 1e-8

# Groups searched together; 4096 groups of 64 float32 weights make a block's working tensors 1 MiB each, small
# enough to stay in the CPU cache and large enough that the per-operation overhead of the small per-group tensors
# is paid less often (measured 5-13% faster than 2048 on the benchmark's limit layers).
_GROUPS_PER_BLOCK = 4096

# Defaults of the active set and of the early stop of a block (see the module docstring for the measurements).
_PATIENCE = 5
_TOLERANCE = 1e-4

# Rows of Gaussian noise drawn per group of a block, dealt out at random across the iterations.
_NOISE_BANK_FACTOR = 2


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


def noise_in_steps(noise_std: float, bits: int) -> float:
    """The initial perturbation in quantization steps at `bits`: `noise_std` times ``sqrt((2**bits - 1) / 15)``."""
    return noise_std * math.sqrt((2**bits - 1) / 15)


class _Groups:
    """A block of groups and the per-group constants every round and refit reuses.

    ``W`` and ``h`` are ``[groups, group_size]`` (``h`` None means all ones); ``total`` is each group's summed
    weight, ``mean`` its weighted mean, ``h_centred = h * (W - mean)``: with it the covariance of codes and weights
    is one dot product, because the weighted sum of ``W - mean`` is zero.
    """

    def __init__(self, W: torch.Tensor, h: torch.Tensor | None, *, centred: bool = True) -> None:
        self.W = W
        self.h = h
        self._buffer = torch.empty_like(W)
        if not centred:  # only rounding and errors are needed: skip the constants of the refit
            return
        group_size = W.shape[1]
        if h is None:
            self.total = torch.full((W.shape[0],), float(group_size), device=W.device)
            self.mean = W.mean(dim=1)
            self.h_centred = W - self.mean[:, None]
        else:
            self.total = h.sum(dim=1).clamp_min(1e-30)
            self.mean = torch.linalg.vecdot(h, W) / self.total
            self.h_centred = h * (W - self.mean[:, None])

    def subset(self, index: torch.Tensor) -> _Groups:
        """The groups at `index` (``[k]`` int64), their constants copied rather than recomputed."""
        groups = _Groups.__new__(_Groups)
        groups.W = self.W.index_select(0, index)
        groups.h = None if self.h is None else self.h.index_select(0, index)
        groups.total = self.total.index_select(0, index)
        groups.mean = self.mean.index_select(0, index)
        groups.h_centred = self.h_centred.index_select(0, index)
        groups._buffer = torch.empty_like(groups.W)
        return groups

    def round(self, scale: torch.Tensor, zero: torch.Tensor, qmax: int, out: torch.Tensor) -> torch.Tensor:
        """Nearest code on each group's grid, into `out`: the exact minimiser of the error for a fixed grid."""
        # NOTE: multiply then add in place; addcmul with a broadcast first operand takes a slow path on CPU.
        torch.mul(self.W, scale.reciprocal()[:, None], out=out).add_(zero[:, None])
        return out.round_().clamp_(0, qmax)

    def refit(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted least squares of ``W ~ a * q + b`` per group, returned as ``scale = a, zero = -b / a``.

        Minimises ``sum_j h_j (W_j - a q_j - b)**2`` in closed form. Where the codes of a group are all equal the
        fit is ill-posed (any scale works); such groups, and any whose fitted scale is not positive, keep `scale`,
        and their zero point is moved so the group dequantizes to its weighted mean.
        """
        # Sums of integer codes are exact in float32, so a group of equal codes gets a variance of exactly zero.
        if self.h is None:
            q_sum, q_square = q.sum(dim=1), torch.linalg.vecdot(q, q)
        else:
            hq = torch.mul(q, self.h, out=self._buffer)
            q_sum, q_square = hq.sum(dim=1), torch.linalg.vecdot(hq, q)
        q_mean = q_sum / self.total
        var_q = q_square / self.total - q_mean.square()
        cov = torch.linalg.vecdot(q, self.h_centred) / self.total

        a = cov / var_q.clamp_min(_MIN_CODE_VARIANCE)
        ok = (var_q > _MIN_CODE_VARIANCE) & (a > 0)
        new_scale = torch.where(ok, a, scale)
        return new_scale, q_mean - self.mean / new_scale

    def error(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of each group, ``[groups]``."""
        residual = torch.sub(q, zero[:, None], out=self._buffer)
        residual.mul_(scale[:, None]).sub_(self.W)
        if self.h is None:
            return torch.linalg.vecdot(residual, residual)
        return torch.linalg.vecdot(residual * self.h, residual)

    def minmax(self, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Asymmetric min-max grid: codes 0 and ``qmax`` land exactly on each group's minimum and maximum."""
        lo, hi = self.W.aminmax(dim=1)
        # A constant group has no range; any positive scale represents it exactly through the zero point.
        span = torch.where(hi > lo, hi - lo, lo.abs().clamp_min(1e-8))
        scale = span / qmax
        return scale, -lo / scale


def grouped_weight(
    W: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
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
    hg = h.view(1, -1, group_size).expand(out_features, -1, -1).reshape(-1, group_size).contiguous()
    return Wg, hg


@dataclass(frozen=True)
class GridSearch:
    """The output of `search_grid`: the grid of every group searched, and what the search achieved.

    Attributes:
        scale, zero: ``float32 [groups]``, the best grid found per group (float32; not yet stored in float16).
        error: ``float32 [groups]``, each group's weighted squared error on that grid.
        error_history: the error summed over the groups, at the start and after every iteration; non-increasing.
        group_iterations: iterations summed over the groups, each group counted for every iteration it took part in.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    error: torch.Tensor
    error_history: tuple[float, ...]
    group_iterations: int


def _iterate(
    groups: _Groups,
    scale: torch.Tensor,
    zero: torch.Tensor,
    err: torch.Tensor,
    noise: torch.Tensor,
    *,
    qmax: int,
    sigma: float,
    refine_steps: int,
    generator: torch.Generator,
    q: torch.Tensor,
    e: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GNP-IQ iteration: propose a grid from perturbed weights, polish it, keep it where it lowers the error.

    The perturbation is in quantization steps of each group (``W + sigma * scale * e`` divided by ``scale`` is
    ``W / scale + sigma * e``), so the noise rows are added to the scaled weights directly. `q` and `e` are work
    buffers shaped like the block. Returns the kept scale, zero and error, and which groups improved.
    """
    num_groups = scale.shape[0]
    rows = torch.randint(0, noise.shape[0], (num_groups,), generator=generator, device=noise.device)
    signs = torch.randint(0, 2, (num_groups,), generator=generator, device=noise.device).float()
    amplitude = signs.mul_(2 * sigma).sub_(sigma)  # +-sigma per group
    torch.index_select(noise, 0, rows, out=e)  # [groups, group_size]

    # Codes of the perturbed weights on the current grid, then the least-squares grid of the true weights.
    torch.mul(groups.W, scale.reciprocal()[:, None], out=q).add_(zero[:, None])
    q.addcmul_(e, amplitude[:, None]).round_().clamp_(0, qmax)
    new_scale, new_zero = groups.refit(q, scale)
    for _ in range(refine_steps):
        new_scale, new_zero = groups.refit(groups.round(new_scale, new_zero, qmax, out=q), new_scale)
    new_err = groups.error(groups.round(new_scale, new_zero, qmax, out=q), new_scale, new_zero)

    # Keep-if-better, group by group: the error never rises.
    better = new_err < err
    return (
        torch.where(better, new_scale, scale),
        torch.where(better, new_zero, zero),
        torch.where(better, new_err, err),
        better,
    )


def _search_block(
    groups: _Groups,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    qmax: int,
    num_iterations: int,
    sigma: float,
    noise_decay: float,
    refine_steps: int,
    patience: int,
    tolerance: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
    """The GNP-IQ search on a block of groups from the grid (`scale`, `zero`).

    Returns the kept scale, zero and error per group, the block's summed error after the start and after every
    iteration, and the number of group-iterations run. A group leaves the search after `patience` iterations in a
    row without improving (the *active set*); the block stops when an iteration lowered its summed error by less
    than `tolerance` of it. Either way the remaining iterations leave the error where it is.
    """
    q = torch.empty_like(groups.W)
    err = groups.error(groups.round(scale, zero, qmax, out=q), scale, zero)
    history = [err.sum()]
    if num_iterations == 0:
        return scale, zero, err, history, 0

    bank_shape = (_NOISE_BANK_FACTOR * groups.W.shape[0], groups.W.shape[1])
    noise = torch.randn(bank_shape, generator=generator, device=groups.W.device, dtype=groups.W.dtype)
    e = torch.empty_like(groups.W)
    stale = torch.zeros_like(err, dtype=torch.int32)  # iterations since each group last improved
    active: torch.Tensor | None = None  # indices of the groups still searched; None means all of them
    work, work_q, work_e = groups, q, e
    group_iterations = 0
    for t in range(num_iterations):
        if active is None:
            s, z, r = scale, zero, err
        else:
            s, z, r = scale[active], zero[active], err[active]
        s, z, r, better = _iterate(
            work, s, z, r, noise,
            qmax=qmax, sigma=sigma * noise_decay**t, refine_steps=refine_steps, generator=generator,
            q=work_q, e=work_e,
        )  # fmt: skip
        group_iterations += s.shape[0]
        if active is None:
            scale, zero, err = s, z, r
            stale = torch.where(better, 0, stale + 1)
        else:
            scale, zero, err = (
                scale.index_copy(0, active, s),
                zero.index_copy(0, active, z),
                err.index_copy(0, active, r),
            )
            stale[active] = torch.where(better, 0, stale[active] + 1)
        history.append(err.sum())

        gain = float(history[-2] - history[-1])
        if gain <= tolerance * float(history[-2]):
            break
        still = (stale < patience).nonzero().squeeze(1)
        if still.numel() == 0:
            break
        if still.numel() < work.W.shape[0]:
            active = still
            work = groups.subset(active)
            work_q, work_e = torch.empty_like(work.W), torch.empty_like(work.W)
    history.extend(history[-1:] * (num_iterations + 1 - len(history)))
    return scale, zero, err, history, group_iterations


def search_grid(
    W_groups: torch.Tensor,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    bits: int,
    num_iterations: int = 12,
    noise_std: float = 0.5,
    noise_decay: float = 0.95,
    refine_steps: int = 3,
    patience: int = _PATIENCE,
    tolerance: float = _TOLERANCE,
    generator: torch.Generator,
) -> GridSearch:
    """The GNP-IQ search on any set of groups, from any grid: the one implementation of the method's maths.

    `gnpiq_quantize` calls it on every group of a weight from the min-max grid; the re-quantization callback calls
    it on a random subset of a layer's groups from the grid the layer stores.

    Args:
        W_groups: ``float32 [groups, group_size]``, the float weights of the groups searched (see `grouped_weight`).
        weights: ``[groups, group_size]`` non-negative weight of each entry in the error (importance, 0 on padding),
            or None for all ones.
        scale, zero: ``[groups]``, the grid each group starts from.
        bits: code width, 2, 3, 4 or 8.
        num_iterations, noise_std, noise_decay, refine_steps: the search, as in `gnpiq_quantize`.
        patience: iterations in a row without improvement after which a group leaves the search.
        tolerance: a block of groups stops once an iteration lowers its summed error by no more than this
            fraction of it; 0 never stops early.
        generator: seeds the noise; the same generator state gives the same grids.
    """
    _check_stopping(patience, tolerance)
    qmax = 2**bits - 1
    sigma = noise_in_steps(noise_std, bits)
    scale, zero = scale.float(), zero.float()

    # Groups are independent, so the whole search runs block by block: a block's working tensors stay in the CPU
    # cache across all iterations, which on a machine with little memory bandwidth is several times faster.
    scales, zeros, errors, histories = [], [], [], []
    group_iterations = 0
    for start in range(0, W_groups.shape[0], _GROUPS_PER_BLOCK):
        block = slice(start, start + _GROUPS_PER_BLOCK)
        groups = _Groups(W_groups[block], None if weights is None else weights[block])
        s, z, r, history, count = _search_block(
            groups, scale[block], zero[block],
            qmax=qmax, num_iterations=num_iterations, sigma=sigma, noise_decay=noise_decay,
            refine_steps=refine_steps, patience=patience, tolerance=tolerance, generator=generator,
        )  # fmt: skip
        scales.append(s)
        zeros.append(z)
        errors.append(r)
        histories.append(torch.stack(history))
        group_iterations += count
    if not scales:
        empty = scale.new_zeros(0)
        return GridSearch(empty, empty, empty, (0.0,) * (num_iterations + 1), 0)
    return GridSearch(
        scale=torch.cat(scales),
        zero=torch.cat(zeros),
        error=torch.cat(errors),
        error_history=tuple(torch.stack(histories).sum(dim=0).tolist()),
        group_iterations=group_iterations,
    )


def round_to_grid(
    W_groups: torch.Tensor, weights: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, *, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of each group on the grid (`scale`, `zero`) and each group's weighted squared error, ``[groups]``."""
    groups = _Groups(W_groups, weights, centred=False)
    q = groups.round(scale.float(), zero.float(), 2**bits - 1, out=torch.empty_like(W_groups))
    return q, groups.error(q, scale.float(), zero.float())


def group_error(
    W_groups: torch.Tensor, weights: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """Weighted squared error of given codes on the grid (`scale`, `zero`), per group, ``[groups]``."""
    return _Groups(W_groups, weights, centred=False).error(codes.float(), scale.float(), zero.float())


def _check_solver_input(W: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"`W` must be a 2-D float weight [out_features, in_features], got {shape!r}.")
    if not torch.isfinite(W).all():
        raise ValueError("`W` contains NaN or Inf values; a quantization grid cannot be fitted to them.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    if importance is not None:
        if importance.shape != (W.shape[1],):
            raise ValueError(
                f"`importance` must have shape ({W.shape[1]},), one weight per input column, got "
                f"{tuple(importance.shape)!r}."
            )
        if not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("`importance` must be finite and non-negative.")


def _check_stopping(patience: int, tolerance: float) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"`patience` must be an int >= 1, got {patience!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be a number in [0, 1), got {tolerance!r}.")


def _check_search(num_iterations: int, noise_std: float, noise_decay: float, refine_steps: int) -> None:
    """The same limits `GNPIQConfig` enforces, for callers of the solver who skip the config."""
    check_int("num_iterations", num_iterations, minimum=0)
    check_int("refine_steps", refine_steps, minimum=0)
    if not is_real(noise_std) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"`noise_std` must be a finite number >= 0, got {noise_std!r}.")
    if not is_real(noise_decay) or not 0 < noise_decay <= 1:
        raise ValueError(f"`noise_decay` must be a number in (0, 1], got {noise_decay!r}.")


def gnpiq_quantize(
    W: torch.Tensor,
    *,
    bits: int = 8,
    group_size: int = 64,
    num_iterations: int = 12,
    noise_std: float = 0.5,
    noise_decay: float = 0.95,
    refine_steps: int = 3,
    patience: int = _PATIENCE,
    tolerance: float = _TOLERANCE,
    seed: int = 0,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize one weight matrix with GNP-IQ (see the module docstring for the objective and the search).

    Args:
        W: ``[out_features, in_features]`` float weight; it is read, never modified.
        bits: code width, 2, 3, 4 or 8.
        group_size: input columns per group; a row whose width is not a multiple is padded (see `grouped_weight`).
        num_iterations: perturbed proposals per group; 0 gives plain min-max rounding.
        noise_std: initial noise in quantization steps at 4 bits, scaled for other widths by `noise_in_steps`.
        noise_decay: factor applied to the noise after every iteration.
        refine_steps: "round, refit" steps that polish each proposal.
        patience: iterations in a row without improvement after which a group leaves the search.
        tolerance: a block of groups stops once an iteration lowers its summed error by no more than this fraction
            of it; 0 never stops early.
        seed: seeds the noise; the same seed gives identical codes.
        importance: optional ``[in_features]`` non-negative weight of each input channel in the error.

    Returns:
        A `QuantizedWeight` whose ``error_history`` never increases.

    Raises:
        ValueError: if `W` is not a 2-D float tensor or holds NaN or Inf, `bits` is unsupported, `group_size` is
            not a positive int, `importance` has the wrong shape or negative entries, `patience` is not a positive
            int, `tolerance` is not a number in [0, 1), `num_iterations` or `refine_steps` is not an int >= 0,
            `noise_std` is not a finite number >= 0 or `noise_decay` is not in (0, 1].
    """
    _check_solver_input(W, bits, group_size, importance)
    _check_stopping(patience, tolerance)
    _check_search(num_iterations, noise_std, noise_decay, refine_steps)
    qmax = 2**bits - 1
    out_features, in_features = W.shape

    Wg, hg = grouped_weight(W.detach().float(), group_size, importance)
    scale, zero = _Groups(Wg, hg, centred=False).minmax(qmax)
    search = search_grid(
        Wg, hg, scale, zero,
        bits=bits, num_iterations=num_iterations, noise_std=noise_std, noise_decay=noise_decay,
        refine_steps=refine_steps, patience=patience, tolerance=tolerance,
        generator=torch.Generator(device=W.device).manual_seed(seed),
    )  # fmt: skip

    # Store in float16 and round the codes against exactly what is stored.
    scale16, zero16 = search.scale.half(), search.zero.half()
    q, final_error = round_to_grid(Wg, hg, scale16, zero16, bits=bits)

    num_groups = Wg.shape[0] // out_features
    return QuantizedWeight(
        codes=q.to(torch.uint8).view(out_features, -1),
        scale=scale16.view(out_features, num_groups),
        zero=zero16.view(out_features, num_groups),
        in_features=in_features,
        error_history=search.error_history,
        final_error=float(final_error.sum()),
    )


def minmax_quantize(W: torch.Tensor, *, bits: int = 8, group_size: int = 64) -> QuantizedWeight:
    """Plain round-to-nearest on each group's min-max grid: the baseline GNP-IQ starts from."""
    return gnpiq_quantize(W, bits=bits, group_size=group_size, num_iterations=0)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F``."""
    return math.sqrt(float(((W.float() - W_hat.float()) ** 2).sum()) / float((W.float() ** 2).sum()))
