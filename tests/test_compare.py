"""Stability report: ARI per block and overall, solver agreement, checked against a
pair-counting ARI written out here and against hand-made cases."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch

from hyca.math.solvers import pool_names
from hyca.profiles.compare import compare_profiles
from hyca.profiles.io import ProfileError
from hyca.profiles.profile import Profile

from profile_helpers import permuted, random_profile, tiny_fingerprint


def pair_counting_ari(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's ARI from the contingency table, written independently of sklearn."""
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    index = sum(comb(int(n), 2) for n in table.flatten())
    rows = sum(comb(int(n), 2) for n in table.sum(1))
    cols = sum(comb(int(n), 2) for n in table.sum(0))
    expected = rows * cols / comb(len(a), 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def test_relabelled_clusters_give_ari_one_and_full_agreement():
    fp = tiny_fingerprint()
    a = random_profile(fp, clusters=4)
    b = permuted(a, seed=1)
    assert not torch.equal(a.labels, b.labels)  # the ids really differ
    result = compare_profiles(a, b)
    assert result.ari_per_block == pytest.approx((1.0,) * a.num_blocks)
    assert result.ari_overall == pytest.approx(1.0)
    assert result.solver_agreement == 1.0
    assert result.same_model is True


def test_independent_random_labels_give_ari_near_zero():
    g = torch.Generator().manual_seed(0)
    blocks, dim, k = 6, 3072, 4
    a = Profile(torch.randint(0, k, (blocks, dim), generator=g), torch.zeros(blocks, k, dtype=torch.int64))
    b = Profile(torch.randint(0, k, (blocks, dim), generator=g), torch.zeros(blocks, k, dtype=torch.int64))
    result = compare_profiles(a, b)
    assert abs(result.ari_overall) < 0.01
    assert result.same_model is None  # neither names its model


def test_matches_pair_counting_ari_on_partial_agreement():
    fp = tiny_fingerprint()
    a = random_profile(fp, clusters=3, seed=1)
    labels = a.labels.clone()
    labels[:, :10] = (labels[:, :10] + 1) % 3  # move a third of the dims to another cluster
    b = Profile(labels, a.solvers, dict(a.metadata))
    result = compare_profiles(a, b)
    want = [pair_counting_ari(x.numpy(), y.numpy()) for x, y in zip(a.labels, b.labels)]
    assert result.ari_per_block == pytest.approx(want)
    assert result.ari_overall == pytest.approx(sum(want) / len(want))
    assert 0 < result.ari_overall < 1


def test_solver_agreement_counts_dims():
    ids = {name: i for i, name in enumerate(pool_names())}
    # block 0: dims 0,1 in cluster 0, dims 2,3 in cluster 1; b swaps cluster 1's solver.
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    a = Profile(labels, torch.tensor([[ids["reuse"], ids["taylor-2"]], [ids["reuse"], ids["taylor-1"]]]))
    b = Profile(labels, torch.tensor([[ids["reuse"], ids["taylor-1"]], [ids["reuse"], ids["taylor-1"]]]))
    assert compare_profiles(a, b).solver_agreement == pytest.approx(6 / 8)


def test_different_models_are_flagged_and_shapes_must_match():
    fp = tiny_fingerprint()
    a = random_profile(fp)
    b = random_profile({**fp, "config_sha256": "0" * 64})
    assert compare_profiles(a, b).same_model is False
    c = Profile(torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ProfileError, match="different shapes"):
        compare_profiles(a, c)
