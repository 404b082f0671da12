"""The ten indicators of paper A.2.1 against values worked out by hand on trajectories
whose differences and spectra are known in closed form."""

import math

import numpy as np
import pytest
import torch

from hyca.math.indicators import (EPS, INDICATOR_NAMES, IndicatorAccumulator, dct_basis, indicators,
                                  low_frequency_count)

COLUMN = {name: i for i, name in enumerate(INDICATOR_NAMES)}


def trajectory(values, r=1, blocks=1):
    """(steps,) or (steps, dim) values -> (steps, blocks, r, dim), same in every row."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim == 1:
        v = v.unsqueeze(1)
    return v[:, None, None, :].expand(v.shape[0], blocks, r, v.shape[1]).float()


def value(result, name, block=0, dim=0):
    return float(result[block, dim, COLUMN[name]])


def test_linear_trajectory_has_no_curvature_and_one_direction():
    steps, slope, start = 12, 0.5, 3.0
    r = 4  # norms run over the r rows: each row moves by `slope`
    result = indicators(trajectory(start + slope * np.arange(steps), r=r))
    assert value(result, "d1") == pytest.approx(slope * math.sqrt(r), rel=1e-5)
    assert value(result, "d2") == pytest.approx(0, abs=1e-5)
    assert value(result, "d3") == pytest.approx(0, abs=1e-5)
    assert value(result, "eta") == pytest.approx(0, abs=1e-5)
    assert value(result, "rho") == pytest.approx(1, abs=1e-6)
    expected_gamma = np.mean([slope / (start + slope * (k - 1)) for k in range(1, steps)])
    assert value(result, "gamma") == pytest.approx(expected_gamma, rel=1e-5)
    expected_energy = np.mean([(start + slope * k) * math.sqrt(r) for k in range(steps)])
    assert value(result, "energy") == pytest.approx(expected_energy, rel=1e-5)


def test_constant_trajectory():
    steps, c, r = 10, 2.0, 3
    result = indicators(trajectory(np.full(steps, c), r=r))
    for name in ("d1", "d2", "d3", "eta", "kappa", "rho", "gamma"):
        assert value(result, name) == 0.0, name
    assert value(result, "energy") == pytest.approx(c * math.sqrt(r), rel=1e-6)
    assert value(result, "lfr") == pytest.approx(1.0, abs=1e-6)  # all power in the DC component
    assert value(result, "sf") < 1e-6  # one spike (up to float32 rounding): no flatness


def test_alternating_trajectory_reverses_every_step():
    # f_k = (-1)^k: differences 2, 4, 8 in size, each the reverse of the one before
    steps = 9
    result = indicators(trajectory((-1.0) ** np.arange(steps)))
    assert value(result, "d1") == pytest.approx(2, rel=1e-6)
    assert value(result, "d2") == pytest.approx(4, rel=1e-6)
    assert value(result, "d3") == pytest.approx(8, rel=1e-6)
    assert value(result, "eta") == pytest.approx(2, rel=1e-6)
    assert value(result, "kappa") == pytest.approx(2, rel=1e-6)
    assert value(result, "rho") == pytest.approx(-1, abs=1e-6)
    assert value(result, "gamma") == pytest.approx(2, rel=1e-6)
    assert value(result, "energy") == pytest.approx(1, rel=1e-6)


def test_geometric_trajectory_has_constant_ratios():
    # f_k = a c^k: the n-th difference ending at k is a (c - 1)^n c^(k - n), so
    # eta = kappa = |c - 1| / c and gamma = |c - 1| at every step
    a, c, steps = 2.0, 0.8, 15
    result = indicators(trajectory(a * c ** np.arange(steps)))
    assert value(result, "eta") == pytest.approx(abs(c - 1) / c, rel=1e-4)
    assert value(result, "kappa") == pytest.approx(abs(c - 1) / c, rel=1e-4)
    assert value(result, "gamma") == pytest.approx(abs(c - 1), rel=1e-4)
    assert value(result, "rho") == pytest.approx(1, abs=1e-4)  # eps 1e-8 vs products down to ~1e-4
    assert value(result, "d1") == pytest.approx(np.mean(a * (1 - c) * c ** np.arange(steps - 1)), rel=1e-5)


@pytest.mark.parametrize("frequency", [0, 1, 5, 11])
def test_a_pure_dct_tone_puts_all_power_in_one_component(frequency):
    steps = 20
    tone = dct_basis(steps, dtype=torch.float64)[frequency] * 3.0  # power 9 at `frequency`
    result = indicators(trajectory(tone.numpy()))
    q = low_frequency_count(steps)  # 4: the first 20%
    assert value(result, "lfr") == pytest.approx(1.0 if frequency < q else 0.0, abs=1e-5)
    # geometric mean: (9 * floor^(T-1))^(1/T) with floor 1e-30, over the mean 9 / T
    expected_sf = math.exp((math.log(9 + 1e-30) + (steps - 1) * math.log(1e-30)) / steps) / (9 / steps + EPS)
    assert value(result, "sf") == pytest.approx(expected_sf, rel=1e-2)


def test_sine_over_whole_periods_is_low_frequency_and_peaked():
    steps = 40
    sine = np.sin(2 * np.pi * np.arange(steps) / steps)  # one period: a handful of DCT components
    result = indicators(trajectory(sine))
    assert value(result, "lfr") > 0.95
    assert value(result, "sf") < 0.05


def test_impulses_in_every_row_have_a_flat_spectrum():
    # row j is an impulse at step j: the power in component i is sum_j C[i, j]^2 = 1 for every i
    steps = 10
    traj = torch.eye(steps)[:, None, :, None]  # (steps, 1 block, r = steps rows, 1 dim)
    result = indicators(traj)
    assert value(result, "sf") == pytest.approx(1.0, rel=1e-5)
    assert value(result, "lfr") == pytest.approx(low_frequency_count(steps) / steps, rel=1e-5)


def test_white_noise_has_the_flatness_of_a_chi_square_spectrum():
    # one row: each component's power is s^2 chi2_1, E ln chi2_1 = digamma(1/2) + ln 2,
    # so the geometric over the arithmetic mean tends to exp(digamma(1/2) + ln 2) = 0.2807
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(400, 1, 1, 200, generator=g)
    sf = indicators(traj)[0, :, COLUMN["sf"]]
    assert float(sf.mean()) == pytest.approx(math.exp(-1.96351 + math.log(2)), rel=0.05)


def test_incremental_accumulator_equals_the_vectorized_reference():
    g = torch.Generator().manual_seed(3)
    traj = torch.randn(13, 3, 4, 7, generator=g).cumsum(0)
    for spectral_rows in (None, 2):
        acc = IndicatorAccumulator(3, 7, 13, spectral_rows=spectral_rows)
        for step in traj:
            acc.update(step)
        torch.testing.assert_close(acc.finalize(), indicators(traj, spectral_rows=spectral_rows),
                                   rtol=1e-5, atol=1e-6)


def test_spectral_rows_use_only_the_first_rows_for_the_spectrum():
    g = torch.Generator().manual_seed(4)
    traj = torch.randn(11, 2, 5, 6, generator=g)
    some = indicators(traj, spectral_rows=2)
    torch.testing.assert_close(some[..., 8:], indicators(traj[:, :, :2])[..., 8:])
    torch.testing.assert_close(some[..., :8], indicators(traj)[..., :8])


def test_short_trajectories_leave_undefined_indicators_at_zero():
    result = indicators(trajectory([1.0, 2.0]))
    assert value(result, "d1") == pytest.approx(1.0)
    assert value(result, "d2") == 0.0 and value(result, "d3") == 0.0 and value(result, "kappa") == 0.0


def test_bad_input_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(steps, blocks, r, dim\)"):
        indicators(torch.zeros(5, 3))
    acc = IndicatorAccumulator(2, 4, 3)
    with pytest.raises(ValueError, match="blocks=2"):
        acc.update(torch.zeros(3, 1, 4))
    acc.update(torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="got 1 of 3 steps"):
        acc.finalize()
    with pytest.raises(ValueError, match="spectral_rows"):
        IndicatorAccumulator(2, 4, 3, spectral_rows=0)
