"""Two CPU ranks over gloo running HyCa under diffusers' context parallelism, for
``tests/test_context_parallel.py``.

    python tests/cp_worker.py RESULTS.json

spawns two processes (``torch.multiprocessing``), runs every scenario below on both and
writes what each rank saw to ``RESULTS.json``; the tests only read that file. One session
for all scenarios keeps the cost of starting two interpreters that import diffusers to
once per test run.

CPU test shims (in :func:`cpu_test_shims`, nowhere else):

- ``torch.accelerator.device_count()`` returns 1: diffusers builds its device mesh only
  when it is > 0 (it places rank ``r`` on device ``r % count``); on a CPU build it is 0.
- ring attention needs each partial attention's log-sum-exp, which only diffusers' GPU
  backends (flash, cuDNN, ...) return; the native backend's op is given one that computes
  it with plain torch when asked (``return_lse=True``), and is left alone otherwise, so
  Ulysses runs diffusers' native path unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_families, tiny
RANKS = 2
STEPS, INTERVAL, WARMUP = 12, 2, 1
TEXT = 6  # text tokens: FLUX and Qwen-Image split them over the ranks too, so even
PROFILE_SOLVERS = ("taylor-2", "lagrange-3", "taylor-1", "reuse")


# --- CPU test shims ------------------------------------------------------------------------


def cpu_test_shims() -> None:
    """See the module doc. Both are test shims for a CPU-only machine, not part of HyCa."""
    torch.accelerator.device_count = lambda: 1  # CPU test shim: diffusers builds its mesh only when > 0

    from diffusers.models import attention_dispatch

    native = attention_dispatch._native_attention_forward_op

    def native_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                          _save_ctx, _parallel_config)
        if attn_mask is not None or is_causal or dropout_p:
            raise NotImplementedError("CPU test shim: plain attention only")
        q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))  # (B, H, S, D)
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, S)
        out = torch.softmax(scores, dim=-1) @ v
        return out.permute(0, 2, 1, 3).to(query.dtype), lse.permute(0, 2, 1)  # (B, S, H, D), (B, S, H)

    attention_dispatch._native_attention_forward_op = native_with_lse


# --- tiny pipelines with an even number of text tokens -------------------------------------


def _embeds(dim: int, seed: int, tokens: int = TEXT) -> torch.Tensor:
    return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _flux_call(pipe, steps, guided=True):
    negative = dict(negative_prompt_embeds=_embeds(32, 7), negative_pooled_prompt_embeds=torch.ones(1, 24),
                    true_cfg_scale=3.0) if guided else {}
    return pipe(prompt_embeds=_embeds(32, 3), pooled_prompt_embeds=torch.zeros(1, 24), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1),
                **negative).images


def _wan_call(pipe, steps, guided=True):
    scale = 3.0 if guided else 1.0
    extra = {"guidance_scale_2": scale} if pipe.transformer_2 is not None else {}
    if guided:
        extra["negative_prompt_embeds"] = _embeds(16, 7)
    return pipe(prompt_embeds=_embeds(16, 3), guidance_scale=scale, height=32, width=32, num_frames=5,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1),
                **extra).frames


def _qwen_call(pipe, steps, guided=True):
    negative = dict(negative_prompt_embeds=_embeds(16, 7), negative_prompt_embeds_mask=torch.ones(1, TEXT),
                    true_cfg_scale=3.0) if guided else {}
    return pipe(prompt_embeds=_embeds(16, 3), prompt_embeds_mask=torch.ones(1, TEXT), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1),
                **negative).images


CALLS = {"flux": _flux_call, "wan2.1": _wan_call, "wan2.2": _wan_call, "qwenimage": _qwen_call}

#: (name, family, attention, order, guided): every family with a context-parallel plan in
#: diffusers 0.42.1, both attention kinds, both orders of enable_parallelism and
#: hyca.enable; guided runs (two branches: the guard's difference sketches) and one-branch
#: runs (the guard's decisions rest on summed errors alone, so they are one process's).
SCENARIOS = [
    ("flux-ulysses-guided", "flux", "ulysses", "hyca-first", True),
    ("flux-ring", "flux", "ring", "cp-first", False),
    ("wan2.1-ulysses-guided", "wan2.1", "ulysses", "cp-first", True),
    ("wan2.1-ring", "wan2.1", "ring", "hyca-first", False),
    ("wan2.2-ulysses-guided", "wan2.2", "ulysses", "cp-first", True),
    ("qwenimage-ulysses-guided", "qwenimage", "ulysses", "cp-first", True),
    ("qwenimage-ring", "qwenimage", "ring", "hyca-first", False),
]


def profile_for(transformer, seed: int = 0):
    """Four clusters per block with four different solvers (the guard has four groups to judge)."""
    from hyca.adapters.diffusers.families import blocks_of, family_of, hidden_size
    from hyca.math.solvers import pool_names
    from hyca.profiles.profile import Profile

    blocks, dim = len(blocks_of(transformer, family_of(transformer))), hidden_size(transformer)
    labels = torch.randint(0, len(PROFILE_SOLVERS), (blocks, dim), generator=torch.Generator().manual_seed(seed))
    solvers = torch.tensor([[pool_names().index(s) for s in PROFILE_SOLVERS]] * blocks)
    return Profile(labels, solvers, {"method": "test"})


def _cp_config(kind: str):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=RANKS) if kind == "ulysses" else ContextParallelConfig(ring_degree=RANKS)


def _profiles(pipe, experts, seed: int = 0):
    return {e: profile_for(getattr(pipe, e), seed) for e in experts}


class Counted:
    """Counts what the engines hand to the context-parallel reduce (by tensor rank)."""

    calls: dict[str, int] = {}

    @classmethod
    def install(cls) -> None:
        from hyca.adapters.diffusers import parallel

        original = parallel.RankGroup.__call__

        def counted(self, tensor):
            key = f"dim{tensor.dim()}"
            cls.calls[key] = cls.calls.get(key, 0) + 1
            return original(self, tensor)

        parallel.RankGroup.__call__ = counted


def _engine_facts(pipe, experts) -> list[dict]:
    from hyca.adapters.diffusers.hooks import root_hook

    out = []
    for e in experts:
        engine = root_hook(getattr(pipe, e)).latest().engine  # the engine of this thread's latest pipeline call
        out.append({"reduce": type(engine.reduce).__name__, "seed": engine.sketch_seed})
    return out


def _run(pipe, call, experts, guided=True):
    """Run once; the stats and the peak cache bytes (on this rank) per transformer."""
    import hyca
    from hyca.bench.memory import PeakCacheBytes

    meters = [PeakCacheBytes() for _ in experts]
    with torch.no_grad():
        with contextlib.ExitStack() as stack:
            for meter, e in zip(meters, experts):
                stack.enter_context(meter.attached(getattr(pipe, e)))
            output = call(pipe, STEPS, guided)
    stats = hyca.stats(pipe)
    return output, {
        "stats": [s.describe() for s in stats],
        "switches": [[d.describe() for d in s.switches] for s in stats],
        "notes": [list(s.notes) for s in stats],
        "forecast": [s.forecast for s in stats],
        "cache_bytes": [m.peak for m in meters],
    }


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def scenario(family: str, kind: str, order: str, guided: bool) -> dict:
    import hyca
    from tiny_families import CASES

    case, call = CASES[family], CALLS[family]
    experts = case.experts
    settings = dict(interval=INTERVAL, warmup=WARMUP, guard=True)

    reference = case.build()  # one process, the whole sequence
    hyca.enable(reference, profile=_profiles(reference, experts), **settings)
    want, single = _run(reference, call, experts, guided)

    pipe = case.build()  # the same weights
    if order == "cp-first":
        for e in experts:
            getattr(pipe, e).enable_parallelism(config=_cp_config(kind))
        hyca.enable(pipe, profile=_profiles(pipe, experts), **settings)
    else:
        hyca.enable(pipe, profile=_profiles(pipe, experts), **settings)
        for e in experts:
            getattr(pipe, e).enable_parallelism(config=_cp_config(kind))
    Counted.calls = {}
    got, parallel = _run(pipe, call, experts, guided)
    return {"single": single, "parallel": parallel, "reduce_calls": dict(Counted.calls),
            "engines": _engine_facts(pipe, experts), "max_abs_diff": float((got - want).abs().max()),
            "scale": float(want.abs().max()), "output_digest": _digest(got)}


#: (name, family, offloading, order): offloading with context parallelism and HyCa, applied
#: first, between or last (the execution device is the CPU here: weights do not move).
OFFLOADING = [
    ("flux-group-block", "flux", "group-block", "offload, cp, hyca"),
    ("wan2.1-model", "wan2.1", "model", "cp, hyca, offload"),
    ("qwenimage-group-leaf", "qwenimage", "group-leaf", "hyca, cp, offload"),
]


def offloaded(family: str, how: str, order: str) -> dict:
    import hyca
    from tiny_families import CASES

    case, call, settings = CASES[family], CALLS[family], dict(interval=INTERVAL, warmup=WARMUP)
    reference = case.build()
    hyca.enable(reference, profile=_profiles(reference, case.experts), **settings)
    want, _ = _run(reference, call, case.experts)
    pipe = case.build()
    cpu = torch.device("cpu")

    def offload():
        if how == "model":
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, num_blocks_per_group=1,
                                                  offload_type="block_level" if how == "group-block" else "leaf_level")

    steps = {"offload": offload, "cp": lambda: pipe.transformer.enable_parallelism(config=_cp_config("ulysses")),
             "hyca": lambda: hyca.enable(pipe, profile=_profiles(pipe, case.experts), **settings)}
    for name in order.split(", "):
        steps[name]()
    got, run = _run(pipe, call, case.experts)
    return {"max_abs_diff": float((got - want).abs().max()), "scale": float(want.abs().max()), **run}


def bench_methods() -> dict:
    """``python -m hyca.bench --gpu --cp-degree 2``'s loop and methods (hyca.bench.gpu) on a tiny
    FLUX config on the CPU: profiles probed before parallelism, every method then run on both
    ranks, against the same method in one process."""
    from hyca.bench import gpu
    from tiny import TINY_FLUX, tiny_flux

    out = {}
    single, parallel = (gpu.Loop(tiny_flux(), device="cpu", config=TINY_FLUX, side=4, text_tokens=TEXT) for _ in "ab")
    profile = gpu.probe(parallel, 8)
    parallel.model.enable_parallelism(config=_cp_config("ulysses"))
    for (name, enable, disable), (_, enable_p, disable_p) in zip(gpu.methods(single, 8, profile),
                                                                  gpu.methods(parallel, 8, profile)):
        outputs = []
        for on, off, loop in ((enable, disable, single), (enable_p, disable_p, parallel)):
            on()
            try:
                outputs.append(loop(8))
            finally:
                off()
        out[name] = {"max_abs_diff": float((outputs[0] - outputs[1]).abs().max()),
                     "scale": float(outputs[0].abs().max())}
    return out


def probe_under_parallelism() -> dict:
    """The probe records shards under context parallelism, which would give each rank its own
    profile: it is refused, on every rank, before anything runs."""
    from hyca.bench import gpu
    from tiny import TINY_FLUX, tiny_flux

    loop = gpu.Loop(tiny_flux(), device="cpu", config=TINY_FLUX, side=4, text_tokens=TEXT)
    loop.model.enable_parallelism(config=_cp_config("ulysses"))
    try:
        gpu.probe(loop, 8)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def different_profiles(order: str) -> dict:
    """Rank 1 is handed another profile than rank 0."""
    import torch.distributed as dist

    import hyca
    from hyca.adapters.diffusers.hooks import root_hook
    from hyca.adapters.diffusers.parallel import profile_digest
    from tiny_families import CASES

    case = CASES["flux"]
    pipe = case.build()
    mine = {"transformer": profile_for(pipe.transformer, seed=dist.get_rank())}
    if order == "cp-first":
        pipe.transformer.enable_parallelism(config=_cp_config("ulysses"))
    hyca.enable(pipe, profile=mine, interval=INTERVAL, warmup=WARMUP)
    if order == "hyca-first":
        pipe.transformer.enable_parallelism(config=_cp_config("ulysses"))
    engine = root_hook(pipe.transformer).engine
    result = {"engine_digest": profile_digest(engine.profile), "rank0_digest": profile_digest(
        profile_for(pipe.transformer, seed=0)), "error": None}
    try:
        with torch.no_grad():
            _flux_call(pipe, STEPS)
    except RuntimeError as error:
        result["error"] = str(error)
    return result


def failure_on_one_rank() -> dict:
    """Rank 1's forecast raises at its first forecast step; rank 0's never does."""
    import torch.distributed as dist

    import hyca
    from hyca.engine.cache import HybridCache
    from tiny_families import CASES

    pipe = CASES["flux"].build()
    pipe.transformer.enable_parallelism(config=_cp_config("ulysses"))
    hyca.enable(pipe, profile="taylor-1", interval=INTERVAL, warmup=WARMUP)
    working = HybridCache.predicted_residual
    if dist.get_rank() == 1:  # every engine of this rank: each pipeline call has its own
        def broken(self, state):
            raise MemoryError("test: out of memory on this rank")
        HybridCache.predicted_residual = broken
    try:
        output, run = _run(pipe, _flux_call, ("transformer",))
    finally:
        HybridCache.predicted_residual = working
    return {**run, "output_digest": _digest(output)}


# --- the guard on crafted shards -----------------------------------------------------------

TOKENS, DIM = 8, 4  # per rank


def _shard(rank: int, branch: str, step: int, guided: bool) -> torch.Tensor:
    """Rank 0's shard is noise (extrapolating it misses by more than reusing it); rank 1's
    is a gentle linear trend (taylor-1 is exact, reuse is off a little). Guided: both
    branches share a strong linear trend; on rank 0 they differ by noise, on rank 1 not at
    all, so only rank 0's shard shows that taylor-1 harms cond - uncond."""
    g = torch.Generator().manual_seed(100 + rank)
    a, b = torch.randn(TOKENS, DIM, generator=g), torch.randn(TOKENS, DIM, generator=g)
    noise = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(1000 * (rank + 1) + step))
    if not guided:
        value = noise if rank == 0 else a + 0.01 * step * b
    else:
        trend = 50.0 * (a + 0.1 * step * b)
        sign = 1.0 if branch == "cond" else -1.0
        value = trend + sign * noise if rank == 0 else trend
    return value.unsqueeze(0)


def _drive(engine, rank_of_shard, guided: bool, steps: int = 30) -> dict[str, list[str]]:
    """The engine's own interface, as the hooks drive it; ``rank_of_shard``: which shards this
    engine sees (a list of ranks, concatenated along the token axis)."""
    branches = ("cond", "uncond") if guided else ("cond",)
    states = {b: engine.new_state() for b in branches}
    for step in range(steps):
        for branch in branches:
            state = states[branch]
            tokens = TOKENS * len(rank_of_shard)
            if engine.begin_step(state, float(steps - step), (1, tokens, DIM), steps):
                engine.record(state, 0, torch.cat([_shard(r, branch, step, guided) for r in rank_of_shard], dim=1))
            else:
                engine.predicted_residual(state)
            engine.end_step(state)
    return {b: [d.describe() for d in states[b].stats.switches] for b in branches}


def sketch_of_shards() -> dict:
    """Each rank sketches its shard of a (2, 16, 4) tensor with RankGroup.projection; the sum
    over the group against one process's sketch of the whole (guard._projection)."""
    import torch.distributed as dist

    from hyca.adapters.diffusers import parallel
    from hyca.engine.guard import SKETCH_ROWS, _projection
    from tiny_families import CASES

    holder = CASES["flux"].transformer(0)
    holder.enable_parallelism(config=_cp_config("ulysses"))
    group = parallel.group_of(holder)
    whole = torch.randn(2, TOKENS * RANKS, DIM, generator=torch.Generator().manual_seed(7))
    shard = whole[:, dist.get_rank() * TOKENS:(dist.get_rank() + 1) * TOKENS]
    mine = group.projection(tuple(shard.shape), SKETCH_ROWS, 0, shard) @ shard.reshape(-1, DIM)
    summed = group(mine.double())
    one = _projection(whole.shape[0] * whole.shape[1], SKETCH_ROWS, 0, whole) @ whole.reshape(-1, DIM)
    return {"max_abs_diff": float((summed - one.double()).abs().max()), "scale": float(one.abs().max())}


def shards_that_disagree() -> dict:
    """Each rank drives an engine over its own shard; the engine is pointed at the group by
    ``parallel.attach``, exactly as the hooks do before every call. ``whole``: one process
    holding both shards; ``alone``: the same engine without the group."""
    import torch.distributed as dist

    from hyca.adapters.diffusers import parallel
    from hyca.engine.cache import HybridCache
    from hyca.engine.schedule import Schedule
    from hyca.profiles.profile import Profile
    from tiny_families import CASES

    rank = dist.get_rank()
    holder = CASES["flux"].transformer(0)  # a real transformer whose _parallel_config diffusers set up
    holder.enable_parallelism(config=_cp_config("ulysses"))
    out = {}
    for guided in (False, True):
        key = "guided" if guided else "one-branch"
        make = lambda: HybridCache(Profile.uniform("taylor-1", 1, DIM), Schedule(4, 3), guard=True)  # noqa: E731
        together = make()
        group = parallel.attach(together, holder, [], "hyca_block")
        alone = make()
        out[key] = {"together": _drive(together, [rank], guided), "alone": _drive(alone, [rank], guided),
                    "whole": _drive(make(), list(range(RANKS)), guided),  # one process, both shards
                    "seed": together.sketch_seed, "group_rank": group.rank}
    return out


# --- the session -----------------------------------------------------------------------------


def run_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    cpu_test_shims()
    import logging

    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    logging.getLogger("hyca").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS,
                            timeout=datetime.timedelta(seconds=120))
    Counted.install()
    results: dict = {"scenarios": {}}
    for name, family, kind, order, guided in SCENARIOS:
        results["scenarios"][name] = {"family": family, "attention": kind, "order": order, "guided": guided,
                                      **scenario(family, kind, order, guided)}
    for order in ("cp-first", "hyca-first"):
        results[f"different-profiles-{order}"] = different_profiles(order)
    results["offloading"] = {}
    for name, family, how, order in OFFLOADING:
        results["offloading"][name] = {"order": order, **offloaded(family, how, order)}
    results["failure-on-one-rank"] = failure_on_one_rank()
    results["bench-methods"] = bench_methods()
    results["probe"] = probe_under_parallelism()
    results["sketch"] = sketch_of_shards()
    results["shards"] = shards_that_disagree()
    gathered = [None] * RANKS
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank: int, store: str, out: str) -> None:
    try:
        run_rank(rank, store, out)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


def main(out: str) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_entry, args=(os.path.join(folder, "store"), out), nprocs=RANKS, join=True)


if __name__ == "__main__":
    main(sys.argv[1])
