"""Clustering and solver selection on synthetic trajectories with planted dynamics.

Each block's dimensions are drawn from four known kinds of motion; the analysis must
recover the groups (adjusted Rand index > 0.9) and give each the solver that is best
for it by construction, or, where no closed form says which is best, the one an
independent brute-force replay finds."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from hyca.engine.schedule import Schedule
from hyca.math.clustering import cluster, log_scaled, standardized
from hyca.math.indicators import INDICATOR_NAMES, IndicatorAccumulator
from hyca.math.selection import Replay, ReplayErrors, overall_error, per_cluster, select
from hyca.math.solvers import get_solver, pool, pool_names
from hyca.probing import analyse

STEPS, INTERVAL, WARMUP = 30, 4, 3
BLOCKS, PER_GROUP, ROWS = 3, 40, 4
GROUPS = ("still", "cubic", "oscillating", "noisy")


def planted(seed=0, blocks=BLOCKS):
    """(steps, blocks, rows, dim) trajectory and the planted group of every dimension."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS, dtype=np.float64)[:, None, None]  # (steps, 1, 1)
    shape = (1, ROWS, PER_GROUP)
    parts = []
    for block in range(blocks):
        scale = lambda: np.exp(rng.normal(0, 0.5, size=(1, 1, PER_GROUP)))  # noqa: E731
        still = scale() * (1 + 0.1 * rng.normal(size=shape)) + 1e-4 * rng.normal(size=(STEPS, ROWS, PER_GROUP))
        u = t / STEPS
        coeff = [rng.normal(size=shape) for _ in range(4)]
        cubic = scale() * (coeff[0] + 2 * coeff[1] * u + 3 * coeff[2] * u**2 + 4 * coeff[3] * u**3)
        omega = rng.uniform(2 * np.pi / 7, 2 * np.pi / 5, size=(1, 1, PER_GROUP))
        oscillating = scale() * np.sin(omega * t + rng.uniform(0, 2 * np.pi, size=shape))
        noisy = scale() * (1 + rng.normal(size=(STEPS, ROWS, PER_GROUP)))
        parts.append(np.concatenate([still, cubic, oscillating, noisy], axis=2))
    traj = torch.tensor(np.stack(parts, axis=1), dtype=torch.float32)
    groups = np.repeat(np.arange(len(GROUPS)), PER_GROUP)
    return traj, groups


def record(traj, positions=None, plan=None):
    """Feed a trajectory through the probe's two online consumers, as the recorder does."""
    steps, blocks, _, dim = traj.shape
    plan = plan or Schedule(INTERVAL, WARMUP).plan(steps)
    positions = positions if positions is not None else np.arange(steps, dtype=float)
    acc, replay = IndicatorAccumulator(blocks, dim, steps), ReplayErrors(plan)
    for step in range(steps):
        acc.update(traj[step])
        replay.update(traj[step], positions[step])
    return acc.finalize(), replay.result()


def brute_force_errors(traj, positions, plan, solvers, power=1.0):
    """Independent replay: for every forecast step, every computed step before it,
    newest first; squared error per (solver, block, dim) weighted by
    (target / steps) ** power / block energy."""
    traj = traj.double().numpy()
    errors = np.zeros((len(solvers), traj.shape[1], traj.shape[3]))
    energy = np.zeros(traj.shape[1:2] + traj.shape[3:])
    for target in range(len(plan)):
        if plan[target]:
            continue
        computed = [k for k in range(target) if plan[k]][::-1]
        truth = traj[target]  # (blocks, rows, dim)
        weight = (target / len(plan)) ** power / (truth**2).sum(axis=(1, 2))[:, None]
        energy += (truth**2).sum(1) * weight
        for s, solver in enumerate(solvers):
            used = computed[: solver.history]
            w = solver.weights([positions[k] for k in used], positions[target])
            forecast = sum(wj * traj[k] for wj, k in zip(w, used))
            errors[s] += ((forecast - truth) ** 2).sum(1) * weight
    return errors, energy


def test_replay_matches_an_independent_brute_force_replay():
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(17, 2, 3, 5, generator=g).cumsum(0)
    positions = np.cumsum(np.linspace(0.1, 0.02, 17))  # uneven, like a shifted sigma schedule
    plan = Schedule(interval=3, warmup=2).plan(17)
    _, replay = record(traj, positions, plan)
    errors, energy = brute_force_errors(traj, positions, plan, pool())
    np.testing.assert_allclose(replay.errors.numpy(), errors, rtol=1e-4)
    np.testing.assert_allclose(replay.energy.numpy(), energy, rtol=1e-5)
    assert replay.targets == plan.count(False)


def test_without_progress_weight_every_step_counts_alike():
    g = torch.Generator().manual_seed(2)
    traj = torch.randn(13, 2, 3, 4, generator=g).cumsum(0)
    positions = np.arange(13, dtype=float)
    plan = Schedule(interval=3, warmup=2).plan(13)
    replay = ReplayErrors(plan, progress_power=0.0)
    for step in range(13):
        replay.update(traj[step], positions[step])
    errors, energy = brute_force_errors(traj, positions, plan, pool(), power=0.0)
    np.testing.assert_allclose(replay.result().errors.numpy(), errors, rtol=1e-4)
    np.testing.assert_allclose(replay.result().energy.numpy(), energy, rtol=1e-5)
    with pytest.raises(ValueError, match="progress_power"):
        ReplayErrors(plan, progress_power=-1.0)


def test_late_errors_outweigh_a_larger_early_one():
    """History one step apart (warm-up), then three apart: taylor-1 misses the early
    targets, reuse the late ones. Weighing every step alike picks reuse; the progress
    weight t / steps picks taylor-1. Expected values worked out by hand below."""
    plan = [True, True, False, False, True, False, False, True]
    values = [0.0, 1.0, 1.0, 1.0, 0.5, 1 / 3, 1 / 6, 0.0]
    traj = torch.tensor(values, dtype=torch.float64).view(8, 1, 1, 1)
    solvers = (get_solver("reuse"), get_solver("taylor-1"))
    # targets 2, 3 (history 1@1, 0@0; energy 1): reuse exact, taylor-1 says 2, 3 -> errors 1, 4
    # targets 5, 6 (history 0.5@4, 1@1): taylor-1 exact, reuse 0.5 -> (1/6)^2/(1/9), (1/3)^2/(1/36)
    expected = {0.0: [0.25 + 4.0, 1.0 + 4.0], 1.0: [(5 * 0.25 + 6 * 4.0) / 8, (2 * 1.0 + 3 * 4.0) / 8]}
    for power, (reuse, taylor) in expected.items():
        replay = ReplayErrors(plan, solvers, progress_power=power)
        for step in range(8):
            replay.update(traj[step], float(step))
        result = replay.result()
        assert result.errors[:, 0, 0].tolist() == pytest.approx([reuse, taylor])
        chosen = select(result, torch.zeros(1, 1, dtype=torch.int64), 1).chosen
        assert solvers[int(chosen)].name == ("reuse" if power == 0 else "taylor-1")


def test_planted_groups_are_recovered_per_block_and_shared():
    traj, groups = planted()
    values, _ = record(traj)
    labels = cluster(values, k=4, seed=0)
    for block in range(BLOCKS):
        assert adjusted_rand_score(groups, labels[block].numpy()) > 0.9
    shared = cluster(values, k=4, seed=0, shared=True)
    assert adjusted_rand_score(np.tile(groups, BLOCKS), shared.flatten().numpy()) > 0.9


def test_each_planted_group_gets_its_best_solver():
    traj, groups = planted(seed=2)
    values, replay = record(traj)
    profile, report = analyse(values, replay, clusters=4, seed=0)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    reference, _ = brute_force_errors(traj, np.arange(STEPS, dtype=float), plan, pool())
    dim_solvers = profile.dim_solvers()
    for block in range(BLOCKS):
        for g, name in enumerate(GROUPS):
            chosen = set(pool_names()[i] for i in dim_solvers[block, groups == g].tolist())
            if name in ("still", "noisy"):
                # any extrapolation amplifies noise: sum of squared weights > 1 = reuse's
                assert chosen == {"reuse"}, (block, name, chosen)
            elif name == "cubic":
                # the only pool member exact on cubics for any spacing
                assert chosen == {"lagrange-4"}, (block, name, chosen)
            else:
                best = pool_names()[reference[:, block, groups == g].sum(1).argmin()]
                assert chosen == {best}, (block, name, chosen, best)
    assert report["replay_error"]["profile"] < min(report["replay_error"]["uniform"].values())


def test_labels_are_numbered_by_motion_and_do_not_depend_on_the_seed():
    traj, groups = planted(seed=3)
    values, _ = record(traj)
    labels = [cluster(values, k=4, seed=s) for s in (0, 1, 2)]
    # k-means numbers clusters at random; after renumbering, the labels themselves agree
    # (up to a point on a boundary that another initialisation settles differently)
    for other in labels[1:]:
        assert (other == labels[0]).double().mean() > 0.99
    d1 = log_scaled(values[0].numpy())[:, INDICATOR_NAMES.index("d1")]
    means = [d1[labels[0][0].numpy() == c].mean() for c in range(4)]
    assert means == sorted(means)
    assert set(labels[0][0, groups == 0].tolist()) == {0}  # the still group moves least


def test_standardized_features_are_z_scores_of_log_magnitudes():
    values = np.abs(np.random.default_rng(0).normal(size=(50, len(INDICATOR_NAMES)))) + 0.1
    x = standardized(values)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-12)
    d1 = INDICATOR_NAMES.index("d1")
    rho = INDICATOR_NAMES.index("rho")
    assert np.corrcoef(x[:, d1], np.log(values[:, d1]))[0, 1] > 0.999999
    assert np.corrcoef(x[:, rho], values[:, rho])[0, 1] > 0.999999  # rho stays linear


def test_select_takes_the_least_error_per_cluster_and_one_per_cluster_when_shared():
    # 2 solvers, 2 blocks, 4 dims; labels put dims {0, 1} and {2, 3} together
    errors = torch.tensor([[[1.0, 1.0, 5.0, 5.0], [1.0, 1.0, 1.0, 9.0]],
                           [[2.0, 2.0, 1.0, 1.0], [0.5, 0.5, 2.0, 2.0]]], dtype=torch.float64)
    energy = torch.ones(2, 4, dtype=torch.float64)
    replay = Replay(errors, energy, targets=1, solvers=(get_solver("reuse"), get_solver("taylor-1")))
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    picked = select(replay, labels, k=2)
    assert picked.chosen.tolist() == [[0, 1], [1, 1]]  # block 1 cluster 1: reuse 10 vs taylor 4
    torch.testing.assert_close(picked.relative_errors[0, 1], torch.tensor([5.0, 1.0], dtype=torch.float64))
    shared = select(replay, labels, k=2, shared=True)
    assert shared.chosen.tolist() == [[0, 1], [0, 1]]  # cluster 0: 4 vs 5; cluster 1: 20 vs 6
    assert overall_error(replay, torch.gather(picked.chosen, 1, labels)) == pytest.approx((2 + 2 + 1 + 4) / 8)


def test_a_cluster_empty_in_one_block_gets_that_blocks_best_solver():
    errors = torch.tensor([[[1.0, 1.0], [3.0, 3.0]], [[2.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)
    replay = Replay(errors, torch.ones(2, 2, dtype=torch.float64), 1, (get_solver("reuse"), get_solver("taylor-1")))
    labels = torch.tensor([[0, 0], [1, 1]])  # cluster 1 empty in block 0, cluster 0 in block 1
    picked = select(replay, labels, k=2, shared=True)
    assert picked.chosen.tolist() == [[0, 0], [1, 1]]
    assert picked.sizes.tolist() == [[2, 0], [0, 2]]
    assert torch.isnan(picked.relative_errors[0, 1]).all()


def test_per_cluster_sums_dimensions():
    values = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    labels = torch.tensor([[0, 1, 0, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
    assert per_cluster(values, labels, 3).tolist() == [[2.0, 1.0, 12.0], [21.0, 30.0, 0.0]]


def test_fewer_dimensions_than_clusters_and_bad_input():
    values = torch.rand(2, 3, len(INDICATOR_NAMES))
    labels = cluster(values, k=5)
    assert labels.shape == (2, 3) and int(labels.max()) < 5
    with pytest.raises(ValueError, match="positive integer"):
        cluster(values, k=0)
    with pytest.raises(ValueError, match="NaN"):
        cluster(torch.full((1, 4, len(INDICATOR_NAMES)), float("nan")), k=2)
    with pytest.raises(ValueError, match="compute its first step"):
        ReplayErrors([False, True])
    replay = ReplayErrors([True, True])
    replay.update(torch.zeros(1, 1, 2), 0.0)
    replay.update(torch.zeros(1, 1, 2), 1.0)
    with pytest.raises(ValueError, match="forecasts no step"):
        replay.result()


def test_a_block_without_residual_at_a_step_is_skipped_there():
    replay = ReplayErrors([True, False, False])
    replay.update(torch.ones(2, 1, 3), 0.0)
    replay.update(torch.stack([torch.zeros(1, 3), torch.full((1, 3), 2.0)]), 1.0)  # block 0 silent
    replay.update(torch.full((2, 1, 3), 3.0), 2.0)
    result = replay.result()
    assert torch.isfinite(result.errors).all()
    # block 0 counts only the last target: reuse misses 3 by 2 in each of 3 dims, over energy 27,
    # at step 2 of 3 (progress weight 2/3); block 1 also the first target (1 of 3)
    assert result.errors[0, 0].tolist() == pytest.approx([4 / 27 * 2 / 3] * 3)
    assert result.errors[0, 1].tolist() == pytest.approx([1 / 12 / 3 + 4 / 27 * 2 / 3] * 3)
