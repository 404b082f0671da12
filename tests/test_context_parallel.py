"""HyCa under diffusers' context parallelism: two CPU ranks over gloo (``tests/cp_worker.py``,
one session for every scenario, about 15 s), compared with one process running the same
tiny pipelines.

The worker uses two CPU test shims, named there: ``torch.accelerator.device_count()``
returns 1 (diffusers builds its mesh only when it is > 0) and, for ring attention, the
native attention op returns its log-sum-exp (only diffusers' GPU backends do).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT = 300  # seconds for the whole 2-rank session (about 15 s on a 2-core CPU)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saw (index = rank)."""
    out = tmp_path_factory.mktemp("cp") / "results.json"
    done = subprocess.run([sys.executable, str(HERE / "cp_worker.py"), str(out)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=_environment(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


SCENARIOS = ["flux-ulysses-guided", "flux-ring", "wan2.1-ulysses-guided", "wan2.1-ring", "wan2.2-ulysses-guided",
             "qwenimage-ulysses-guided", "qwenimage-ring"]


def test_the_families_with_a_context_parallel_plan():
    """diffusers 0.42.1 ships a ``_cp_plan`` for FLUX, Qwen-Image and Wan among HyCa's
    families; the others (HunyuanVideo, SD3, Chroma, Lumina2, Z-Image, CogView4, Sana,
    HiDream) have none. If diffusers adds one, add the family to cp_worker.SCENARIOS and
    docs/multi-gpu.md."""
    import diffusers

    from hyca.adapters.diffusers.families import FAMILIES

    with_plan = {name for name in FAMILIES if getattr(getattr(diffusers, name), "_cp_plan", None) is not None}
    # rows added to the family table with a plan that no scenario runs yet (docs/multi-gpu.md says so)
    not_run = {"Flux2Transformer2DModel", "ChronoEditTransformer3DModel"}
    assert with_plan - not_run == {"FluxTransformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel"}
    assert not_run <= with_plan
    sys.path.insert(0, str(HERE))
    from cp_worker import SCENARIOS as RUN
    from tiny_families import CASES

    assert [name for name, *_ in RUN] == SCENARIOS
    classes = {type(CASES[family].transformer(0)).__name__ for _, family, *_ in RUN}
    assert classes == with_plan - not_run
    assert {kind for _, _, kind, *_ in RUN} == {"ulysses", "ring"}
    assert {order for _, _, _, order, _ in RUN} == {"cp-first", "hyca-first"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_give_the_single_process_output(ranks, name):
    """Every family with a plan, Ulysses and ring, context parallelism enabled before or
    after HyCa, guard on, a four-solver profile: each rank's output equals one process's to
    float tolerance, the ranks' outputs are identical, each rank's engine summed over the
    group (its reduce), and the guard switched exactly as it does in one process (and it
    does switch in these runs)."""
    for rank, seen in enumerate(ranks):
        run = seen["scenarios"][name]
        assert run["max_abs_diff"] <= 1e-5 * max(1.0, run["scale"]), (rank, run["max_abs_diff"])
        assert all(e == {"reduce": "RankGroup", "seed": 0} for e in run["engines"])
        assert sum(run["parallel"]["forecast"]) == sum(run["single"]["forecast"]) > 0
        assert run["reduce_calls"].get("dim2", 0) > 0  # the guard's error tables went through the group
        assert run["parallel"]["switches"] == run["single"]["switches"]
    assert ranks[0]["scenarios"][name]["output_digest"] == ranks[1]["scenarios"][name]["output_digest"]
    if not name.startswith("wan2.2"):  # each Wan 2.2 expert sees 6 of the 12 steps: too few to switch
        assert any(ranks[0]["scenarios"][name]["parallel"]["switches"])


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_guidance_difference_is_sketched_only_with_two_branches(ranks, name):
    """Two branches: the guard also compares forecasts of cond - uncond through random
    sketches, summed over the group like the errors (one per judged slot and branch: three
    judged slots per check here); one branch makes none."""
    for seen in ranks:
        calls = seen["scenarios"][name]["reduce_calls"]
        if name.endswith("-guided"):
            assert calls["dim3"] == 3 * calls["dim2"] > 0
        else:
            assert "dim3" not in calls


def test_summed_shard_sketches_are_one_processes_sketch(ranks):
    """RankGroup.projection: each rank projects its shard with its columns of the projection
    one process draws for the whole sequence (batch 2, so the columns interleave), and the
    sum over the group is one process's sketch, whatever the degree: the guard's guided
    decisions are one GPU's (independent per-rank sketches would be another random draw,
    which switched solvers differently on the reference model)."""
    for seen in ranks:
        assert seen["sketch"]["max_abs_diff"] <= 1e-5 * seen["sketch"]["scale"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_cache_memory_per_rank_is_divided_by_the_degree(ranks, name):
    """Peak bytes of HyCa's cache state on each rank (hyca.bench.memory) against one process."""
    for seen in ranks:
        run = seen["scenarios"][name]
        assert all(b > 0 for b in run["single"]["cache_bytes"])
        assert [2 * b for b in run["parallel"]["cache_bytes"]] == run["single"]["cache_bytes"]


def test_cache_bytes_formula_matches_the_measured_peak(ranks):
    """parallel.cache_bytes_per_rank (the formula behind docs/multi-gpu.md's table) on the
    tiny FLUX case: 4 solvers, histories 3 + 3 + 2 + 1 = 9 tensors of 16 tokens x 32 dims in
    float32, two branches."""
    from hyca.adapters.diffusers.parallel import cache_bytes_per_rank

    measured = ranks[0]["scenarios"]["flux-ulysses-guided"]["parallel"]["cache_bytes"][0]
    assert measured == cache_bytes_per_rank(tokens=16, dim=32, history_terms=9, degree=2, branches=2,
                                            bytes_per_value=4)
    with pytest.raises(ValueError):
        cache_bytes_per_rank(tokens=15, dim=32, history_terms=9, degree=2)


@pytest.mark.parametrize("guided", [False, True], ids=["one-branch", "guided"])
def test_ranks_switch_together_where_only_one_alone_would(ranks, guided):
    """Crafted shards (cp_worker.shards_that_disagree): rank 0's is noise, where extrapolating
    loses to reusing; rank 1's is a gentle trend that taylor-1 forecasts exactly (guided:
    the branches differ by noise on rank 0 only, so only rank 0's shard shows that
    taylor-1 harms cond - uncond). Each rank's engine is pointed at the group by
    parallel.attach, as the hooks do. Alone, rank 0 switches and rank 1 does not; together
    both switch at the same step, as one process holding both shards does. Without the
    reduce the two ranks would differ (rank 1 would keep taylor-1)."""
    key = "guided" if guided else "one-branch"
    zero, one = ranks[0]["shards"][key], ranks[1]["shards"][key]
    assert any(zero["alone"].values()) and not any(one["alone"].values())  # alone, only rank 0 would switch
    assert zero["together"] == one["together"] == zero["whole"] == one["whole"]
    assert all(d == ["taylor-1 -> reuse at step 14"] for d in zero["together"].values())
    assert (zero["group_rank"], one["group_rank"]) == (0, 1)


@pytest.mark.parametrize("name", ["flux-group-block", "wan2.1-model", "qwenimage-group-leaf"])
def test_offloading_composes(ranks, name):
    """Group offloading (block and leaf level) and model CPU offload, applied before, between
    or after enable_parallelism and hyca.enable: one process's HyCa output. (On the CPU the
    weights stay where they are; that part is diffusers' and accelerate's.)"""
    for seen in ranks:
        run = seen["offloading"][name]
        assert run["max_abs_diff"] <= 1e-5 * max(1.0, run["scale"]), run
        assert sum(run["forecast"]) > 0 and not any(run["notes"][0])


def test_a_failure_on_one_rank_makes_every_rank_compute(ranks):
    """Rank 1's forecast raises; if only it computed the step, rank 0 would wait in an
    attention collective it never joins. Both fall back, and say why."""
    zero, one = ranks[0]["failure-on-one-rank"], ranks[1]["failure-on-one-rank"]
    assert zero["forecast"] == one["forecast"] == [0]
    assert "on another context-parallel rank" in zero["notes"][0][0]
    assert "test: out of memory on this rank" in one["notes"][0][0]
    assert zero["output_digest"] == one["output_digest"]


def test_every_rank_uses_the_first_ranks_profile(ranks):
    """Rank 1 was handed another profile. Parallelism first: hyca.enable gives it rank 0's.
    HyCa first: the first run stops on every rank before anything is sampled."""
    for seen in ranks:
        first = seen["different-profiles-cp-first"]
        assert first["engine_digest"] == first["rank0_digest"] and first["error"] is None
        later = seen["different-profiles-hyca-first"]
        assert "ranks hold different HyCa profiles" in later["error"]
    assert ranks[1]["different-profiles-hyca-first"]["engine_digest"] != ranks[1]["different-profiles-hyca-first"]["rank0_digest"]


def test_probing_under_context_parallelism_is_refused_on_every_rank(ranks):
    for seen in ranks:
        assert "probing under context parallelism is not supported" in seen["probe"]["error"]


def test_the_gpu_benchmark_methods_run_under_context_parallelism(ranks):
    """hyca.bench.gpu's loop and every method of ``--gpu --cp-degree 2`` on a tiny FLUX config
    (the CUDA timing and memory around them cannot run here): each gives the same method's
    one-process output."""
    for seen in ranks:
        methods = seen["bench-methods"]
        assert len(methods) == 6 and any(name.startswith("HyCa") for name in methods)
        for name, run in methods.items():
            assert run["max_abs_diff"] <= 1e-5 * max(1.0, run["scale"]), name


def test_the_benchmark_takes_a_context_parallel_degree():
    from hyca.bench.__main__ import default_name, parse_args

    args = parse_args(["--gpu", "--cp-degree", "4"])
    assert args.cp_degree == 4 and default_name(args) == "peers-gpu-cp4"
    assert parse_args(["--gpu"]).cp_degree == 1 and default_name(parse_args(["--gpu"])) == "peers-gpu"


def test_no_context_parallelism_leaves_the_engine_single_process():
    from hyca.adapters.diffusers import parallel

    sys.path.insert(0, str(HERE))
    from tiny import tiny_flux

    import hyca

    model = tiny_flux()
    (engine,) = hyca.enable(model, profile="taylor-1")
    assert parallel.context_parallel(model) is None
    assert parallel.attach(engine, model, [], "hyca_block") is None
    assert engine.reduce is None and engine.sketch_seed == 0
    with parallel.split_hooks_outside([block for block in model.transformer_blocks]):
        pass  # no context-parallel hooks: nothing taken off, nothing put back
    hyca.disable(model)


def _doc_example() -> str:
    text = (ROOT / "docs" / "multi-gpu.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (example,) = [b for b in blocks if "enable_parallelism" in b and "load_pipeline" in b]
    return example


def test_the_documented_torchrun_example_runs_on_cpu(tmp_path):
    """docs/multi-gpu.md's example, as written there, under torchrun with two CPU ranks."""
    script = tmp_path / "cp_example.py"
    script.write_text(_doc_example())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**_environment(), "HYCA_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    out = done.stdout  # the ranks print concurrently: their lines can interleave
    assert "rank 0 of 2: " in out and "rank 1 of 2: " in out and out.count("steps computed") == 2, out
    per_rank = [int(k) for k in re.findall(r"(?<!process: )cache peak (\d+) KiB", out)]
    (alone,) = [int(k) for k in re.findall(r"one process: cache peak (\d+) KiB", out)]
    assert len(per_rank) == 2 and all(2 * k == alone for k in per_rank), out
    (difference,) = re.findall(r"largest pixel difference to the 2 ranks' image: (\S+)", out)
    assert float(difference) < 1e-3, out  # one 8-bit level is 3.9e-3
    assert (tmp_path / "cp_example.png").is_file()
