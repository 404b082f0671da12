"""torch.compile with HyCa (issue 12): regional compilation (``compile_repeated_blocks``)
and in-place ``model.compile()`` in either order with ``hyca.enable`` give the eager
output; graph breaks and recompiles stay bounded (none after the first run); compiling
into a wrapper first is an error that says what to do. The ``eager`` backend keeps this
fast: Dynamo's tracing, guards and graph breaks are the same for inductor
(docs/compile.md has inductor's numbers)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import hyca

from tiny_families import CASES

SETTINGS = dict(profile="taylor-1", interval=2, warmup=1)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _eager_hyca(case):
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    return case.run(pipe, 8), hyca.stats(pipe)[0]


def _compile(pipe, how: str) -> None:
    if how == "regional":
        pipe.transformer.compile_repeated_blocks(backend="eager")
    else:
        pipe.transformer.compile(backend="eager")


@pytest.mark.parametrize("how, hyca_first", [("regional", True), ("regional", False), ("whole-in-place", True)])
def test_compiled_hyca_equals_eager_hyca_with_bounded_recompiles(fresh_dynamo, how, hyca_first):
    case = CASES["flux"]
    expected, expected_stats = _eager_hyca(case)
    pipe = case.build()
    if hyca_first:
        hyca.enable(pipe, **SETTINGS)
        _compile(pipe, how)
    else:
        _compile(pipe, how)
        hyca.enable(pipe, **SETTINGS)
    torch.testing.assert_close(case.run(pipe, 8), expected, rtol=0, atol=0)
    after_first = (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
                   counters["frames"]["total"])
    torch.testing.assert_close(case.run(pipe, 8), expected, rtol=0, atol=0)
    case.run(pipe, 5)
    assert (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
            counters["frames"]["total"]) == after_first  # nothing traced again after the first run
    # docs/compile.md: HyCa's two calls per block; compiled whole, Dynamo also breaks the block
    # hooks' calls where it resumes inside the transformer's skip hook (hyca/adapters/diffusers/outputs.py)
    assert after_first[0] <= (8 if how == "regional" else 10) and after_first[1] <= 10
    stats = hyca.stats(pipe)[0]
    assert (stats.computed, stats.forecast) == (3, 2)  # the 5-step run: 0, 2, 4


def test_compiling_into_a_wrapper_first_says_what_to_do():
    pipe = CASES["flux"].build()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with pytest.raises(RuntimeError, match=r"pipe.transformer = pipe.transformer._orig_mod.*hyca.enable"
                                           r".*compile_repeated_blocks\(\)"):
        hyca.enable(pipe, **SETTINGS)


def test_a_wrapper_compiled_after_enable_still_reports(fresh_dynamo):
    case = CASES["flux"]
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    case.run(pipe, 4)
    assert hyca.is_enabled(pipe)
    assert hyca.stats(pipe)[0].computed == 3  # 0, 2 and the last
    hyca.disable(pipe)
    assert not hyca.is_enabled(pipe)
