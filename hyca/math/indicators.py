"""The ten dynamics indicators of paper A.2.1, per block and per hidden dimension.

Input is a probe *sketch trajectory* ``traj`` of shape ``(steps, blocks, r, dim)``: at
every step, each block's residual projected over its token (and batch) axis to ``r``
rows, so that a norm over the ``r`` axis approximates the norm over tokens of one
dimension (docs/design.md, section 5). Every "norm" and "dot product" below runs over that ``r`` axis;
``r`` may be 1.

Per-step indicators (differences, ratios, cosines, energy) are averaged over the steps
where they are defined (``d1`` from the second step on, ``d2``/``eta``/``rho`` from the
third, ``d3``/``kappa`` from the fourth); an indicator with no defined step is 0. The
two spectral ones use the orthonormal DCT-II over the time axis, power summed over ``r``
(or over its first ``spectral_rows`` rows: a sub-sketch, see below).

:func:`indicators` is the vectorized reference; :class:`IndicatorAccumulator` computes
the same values one step at a time, holding a window of 4 steps, running sums, and the
DCT coefficients (the basis is known from the step count), so a probe never has to keep
the whole trajectory of sketches in a list. Its DCT coefficients are the one part as
large as a whole trajectory, ``(steps, blocks, rows, dim)``; ``spectral_rows`` keeps them
for the first rows of the sketch only. The first rows of a Gaussian sketch are a smaller
Gaussian sketch, and both spectral indicators are ratios, so they stay unbiased, only
noisier; for FLUX.1-dev (57 blocks x 3072 dims, 50 steps) two rows take 70 MB.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Indicator names, in the order of the last axis of :func:`indicators`.
INDICATOR_NAMES: tuple[str, ...] = (
    "d1",  # first-order difference norm (velocity), eq. 6
    "d2",  # second-order difference norm (curvature), eq. 7
    "d3",  # third-order difference norm (jerk), eq. 8
    "eta",  # curvature ratio d2 / (d1 + eps), eq. 9
    "kappa",  # jerk ratio d3 / (d2 + eps), eq. 10
    "rho",  # direction consistency: cosine of successive differences, eq. 11
    "gamma",  # relative change rate d1 / (||f_{k-1}|| + eps), eq. 12
    "energy",  # ||f_k||, eq. 13
    "lfr",  # low-frequency ratio of the DCT power, eq. 14
    "sf",  # spectral flatness of the DCT power, eq. 15
)

#: The paper's epsilon guarding the ratios.
EPS = 1e-8
#: Fraction of DCT components counted as "low frequency" (paper: the first 20%).
LOW_FREQUENCY_FRACTION = 0.2
# Floor inside the logarithm of the spectral flatness: a pure tone has exact zeros.
_LOG_FLOOR = 1e-30


def low_frequency_count(num_steps: int) -> int:
    """``q`` of eq. 14: the first 20% of the components, rounded up, at least one."""
    return max(1, math.ceil(LOW_FREQUENCY_FRACTION * num_steps - 1e-9))


def dct_basis(num_steps: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (frequency, time): ``coefficients = C @ signal``.

    Orthonormal so that total power equals the signal energy, and white noise of
    variance s^2 has power s^2 in every component.
    """
    n = num_steps
    k = np.arange(n)
    basis = np.cos(np.pi * np.outer(k, k + 0.5) / n) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return torch.as_tensor(basis, dtype=dtype, device=device)


def _norm(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.square().sum(axis).sqrt()


def _mean_or_zero(total: torch.Tensor, count: int) -> torch.Tensor:
    return total / count if count > 0 else torch.zeros_like(total)


def _spectral(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``power`` (freq, blocks, dim) -> (low-frequency ratio, spectral flatness)."""
    q = low_frequency_count(power.shape[0])
    p64 = power.double()
    total = p64.sum(0)
    lfr = p64[:q].sum(0) / (total + EPS)
    geometric = torch.exp(torch.log(p64 + _LOG_FLOOR).mean(0))
    sf = geometric / (total / power.shape[0] + EPS)
    return lfr.float(), sf.float()


def _stack(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([values[name].float() for name in INDICATOR_NAMES], dim=-1)


def _spectral_rows(rows: int, spectral_rows: int | None) -> int:
    if spectral_rows is None:
        return rows
    if not isinstance(spectral_rows, int) or spectral_rows < 1:
        raise ValueError(f"spectral_rows must be a positive integer or None (all rows), got {spectral_rows!r}")
    return min(rows, spectral_rows)


def indicators(traj: torch.Tensor | np.ndarray, spectral_rows: int | None = None) -> torch.Tensor:
    """All ten indicators, ``(steps, blocks, r, dim)`` -> ``(blocks, dim, 10)`` float32.

    Fully vectorized; memory is a few copies of ``traj``. ``spectral_rows``: how many
    of the ``r`` rows the two spectral indicators use (all when None).
    """
    f = torch.as_tensor(traj).float()
    if f.ndim != 4:
        raise ValueError(f"trajectory must be (steps, blocks, r, dim), got shape {tuple(f.shape)}")
    steps, blocks, r, dim = f.shape
    d1v = f[1:] - f[:-1]  # (T-1, B, r, D): difference ending at step k = 1 ..
    d2v = d1v[1:] - d1v[:-1]  # ending at k = 2 ..
    d3v = d2v[1:] - d2v[:-1]  # ending at k = 3 ..
    n0 = _norm(f, 2)  # (T, B, D)
    n1, n2, n3 = _norm(d1v, 2), _norm(d2v, 2), _norm(d3v, 2)
    dot = (d1v[1:] * d1v[:-1]).sum(2)  # (T-2, B, D): successive differences at k = 2 ..
    del d2v, d3v

    out = {
        "d1": _mean_or_zero(n1.sum(0), steps - 1),
        "d2": _mean_or_zero(n2.sum(0), steps - 2),
        "d3": _mean_or_zero(n3.sum(0), steps - 3),
        "eta": _mean_or_zero((n2 / (n1[1:] + EPS)).sum(0), steps - 2),
        "kappa": _mean_or_zero((n3 / (n2[1:] + EPS)).sum(0), steps - 3),
        "rho": _mean_or_zero((dot / (n1[1:] * n1[:-1] + EPS)).sum(0), steps - 2),
        "gamma": _mean_or_zero((n1 / (n0[:-1] + EPS)).sum(0), steps - 1),
        "energy": n0.mean(0),
    }
    rs = _spectral_rows(r, spectral_rows)
    coefficients = dct_basis(steps, device=f.device) @ f[:, :, :rs].reshape(steps, -1)
    power = coefficients.reshape(steps, blocks, rs, dim).square().sum(2)
    out["lfr"], out["sf"] = _spectral(power)
    return _stack(out)


class IndicatorAccumulator:
    """Incremental :func:`indicators`: call :meth:`update` with each step's sketch
    ``(blocks, r, dim)``, in order, then :meth:`finalize`.

    Holds the last 4 sketches, one running sum per indicator, and the DCT coefficients
    ``(num_steps, blocks, spectral_rows, dim)`` updated with a rank-one product per step
    (the power spectrum needs the coefficients before squaring, so they cannot be reduced
    further). Tensors live on the device of the first sketch given, in float32.
    """

    def __init__(self, num_blocks: int, dim: int, num_steps: int, spectral_rows: int | None = None) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        _spectral_rows(1, spectral_rows)  # validates
        self.num_blocks, self.dim, self.num_steps = num_blocks, dim, num_steps
        self.spectral_rows = spectral_rows
        self.step = 0
        self._window: list[torch.Tensor] = []  # newest first: f_k, f_{k-1}, f_{k-2}, f_{k-3}
        self._sums: dict[str, torch.Tensor] = {}
        self._coefficients: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] += value
        else:
            self._sums[name] = value.clone()

    def update(self, step_sketch: torch.Tensor) -> None:
        f = torch.as_tensor(step_sketch).detach().float()
        if f.ndim != 3 or f.shape[0] != self.num_blocks or f.shape[2] != self.dim:
            raise ValueError(
                f"sketch must be (blocks={self.num_blocks}, r, dim={self.dim}), got {tuple(f.shape)}"
            )
        if self.step >= self.num_steps:
            raise ValueError(f"more updates than the {self.num_steps} steps announced")
        if self._coefficients is None:
            self._basis = dct_basis(self.num_steps, device=f.device)
            rs = _spectral_rows(f.shape[1], self.spectral_rows)
            self._coefficients = torch.zeros((self.num_steps, f.shape[0], rs, f.shape[2]), device=f.device)
        elif f.shape != self._window[0].shape:
            raise ValueError(f"sketch shape changed from {tuple(self._window[0].shape)} to {tuple(f.shape)}")
        # DCT: coefficients[i] += C[i, k] * f_k, one outer product.
        rows = f[:, : self._coefficients.shape[2]].reshape(-1)
        self._coefficients.view(self.num_steps, -1).addr_(self._basis[:, self.step], rows)

        w = [f, *self._window]
        n0 = _norm(f, 1)
        self._add("energy", n0)
        # Differences as differences of differences, in the same order as the vectorized
        # path, so both round alike.
        if len(w) >= 2:
            d1 = w[0] - w[1]
            n1 = _norm(d1, 1)
            self._add("d1", n1)
            self._add("gamma", n1 / (_norm(w[1], 1) + EPS))
        if len(w) >= 3:
            d1_prev = w[1] - w[2]
            d2 = d1 - d1_prev
            n1_prev, n2 = _norm(d1_prev, 1), _norm(d2, 1)
            self._add("d2", n2)
            self._add("eta", n2 / (n1 + EPS))
            self._add("rho", (d1 * d1_prev).sum(1) / (n1 * n1_prev + EPS))
        if len(w) >= 4:
            d2_prev = d1_prev - (w[2] - w[3])
            n3 = _norm(d2 - d2_prev, 1)
            self._add("d3", n3)
            self._add("kappa", n3 / (n2 + EPS))
        self._window = w[:3]  # with the next sketch, a window of 4
        self.step += 1

    def finalize(self) -> torch.Tensor:
        """``(blocks, dim, 10)``, equal to :func:`indicators` on the stacked sketches."""
        if self.step != self.num_steps:
            raise ValueError(f"got {self.step} of {self.num_steps} steps")
        steps = self.num_steps
        counts = {"d1": steps - 1, "gamma": steps - 1, "d2": steps - 2, "eta": steps - 2,
                  "rho": steps - 2, "d3": steps - 3, "kappa": steps - 3, "energy": steps}
        zeros = torch.zeros(self._window[0].shape[0], self.dim, device=self._window[0].device)
        out = {name: _mean_or_zero(self._sums.get(name, zeros), count) for name, count in counts.items()}
        out["lfr"], out["sf"] = _spectral(self._coefficients.square().sum(2))
        return _stack(out)
