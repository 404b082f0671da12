"""``--gpu``: latency and memory on the real FLUX.1-dev architecture, for machines with CUDA.

FluxTransformer2DModel built from FLUX.1-dev's config with random weights in bfloat16
(nothing is downloaded), 1024x1024 (4096 image + 512 text tokens), a plain flow-matching
Euler loop at 28 and 50 steps. Random weights make images meaningless, so only latency
and memory are measured, and only for fixed-schedule methods (a threshold method's skip
decisions on random weights would say nothing about its speed on the real model).
HyCa's profile is probed on the same random model at 256x256-equivalent cost: its
solvers and cluster sizes shape the cache, and that is what the memory column shows.

``--cp-degree K`` (under ``torchrun --nproc_per_node K``, one GPU per process): diffusers'
context parallelism, Ulysses over K GPUs, every method on every rank; seconds are rank 0's
(all ranks start together), memory is the largest rank's. Profiles are probed on each
GPU's whole sequence before parallelism is enabled (probing under it is not supported).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
IMAGE_SIDE = 64  # tokens per side: 1024 px / 8 (VAE) / 2 (patch)
TEXT_TOKENS = 512
INTERVAL, WARMUP = 5, 3
REPEATS = 2


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "--gpu needs a CUDA device and none is visible here (torch.cuda.is_available() is False). "
            "It builds FLUX.1-dev's transformer (12B parameters, bf16, about 24 GB) on the GPU; run it on a "
            "machine with one, or drop --gpu for the CPU benchmark on the reference model.")


class Loop:
    """Euler flow-matching sampling with FLUX.1-dev's scheduler settings, one branch."""

    def __init__(self, model: torch.nn.Module, seed: int = 0, device: str = "cuda", config: dict = FLUX_DEV,
                 side: int = IMAGE_SIDE, text_tokens: int = TEXT_TOKENS) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model, self.device = model, device
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        g = torch.Generator(device=device).manual_seed(seed)
        tokens = side * side
        dtype = next(model.parameters()).dtype
        make = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        self.noise = make(1, tokens, config["in_channels"])
        self.text = make(1, text_tokens, config["joint_attention_dim"])
        self.pooled = make(1, config["pooled_projection_dim"])
        ids = torch.zeros(tokens, 3, device=device)
        ids[:, 1] = torch.arange(tokens, device=device) // side
        ids[:, 2] = torch.arange(tokens, device=device) % side
        self.img_ids, self.txt_ids = ids, torch.zeros(text_tokens, 3, device=device)
        self.guidance = torch.full((1,), 3.5, device=device) if config.get("guidance_embeds") else None

    @torch.no_grad()
    def __call__(self, steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=self.device)
        x = self.noise.clone()
        for t in self.scheduler.timesteps:
            with self.model.cache_context("cond"):
                v = self.model(hidden_states=x, encoder_hidden_states=self.text, pooled_projections=self.pooled,
                               timestep=(t / 1000).expand(1).to(x.dtype), img_ids=self.img_ids,
                               txt_ids=self.txt_ids, guidance=self.guidance, return_dict=False)[0]
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        if hasattr(self.model, "_diffusers_hook"):
            self.model._diffusers_hook.reset_stateful_hooks()
        return x


def build() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 48 GB fp32 detour
    try:
        with torch.device("cuda"):
            return FluxTransformer2DModel(**FLUX_DEV).eval()
    finally:
        torch.set_default_dtype(previous)


def probe(loop: Loop, steps: int) -> Any:
    """HyCa's profile for ``steps`` on ``loop``'s model (one fully computed run, recorded)."""
    from ..adapters.diffusers.probe import probe_transformer

    return probe_transformer(loop.model, lambda: loop(steps), steps, interval=INTERVAL, warmup=WARMUP, progress=False)


def methods(loop: Loop, steps: int, profile: Any = None) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, enable, disable) for the fixed-schedule methods at interval 5, warm-up 3
    (HyCa's profile probed on ``loop`` first unless given)."""
    import hyca
    from diffusers import TaylorSeerCacheConfig

    model = loop.model
    profile = probe(loop, steps) if profile is None else profile

    def ours(name: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: hyca.enable(model, profile=name, interval=INTERVAL, warmup=WARMUP, scheduler=loop.scheduler),
                lambda: hyca.disable(model))

    def diffusers_taylor(order: int) -> tuple[Callable[[], None], Callable[[], None]]:
        config = TaylorSeerCacheConfig(cache_interval=INTERVAL, disable_cache_before_step=WARMUP, max_order=order,
                                       taylor_factors_dtype=torch.bfloat16, use_lite_mode=True)
        return lambda: model.enable_cache(config), model.disable_cache

    return [("full compute", lambda: None, lambda: None), ("HyCa (probed)", *ours(profile)),
            ("FORA (ours)", *ours("fora")), ("TaylorSeer-2 (ours)", *ours("taylor-2")),
            ("diffusers TaylorSeer order 1, lite", *diffusers_taylor(1)),
            ("diffusers TaylorSeer order 2, lite", *diffusers_taylor(2))]


def _together() -> None:
    """Under context parallelism, wait for every rank (so rank 0's clock times them all)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _largest(value: int) -> int:
    """The largest ``value`` over the ranks (the value itself in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def measure(loop: Loop, steps: int, enable: Callable[[], None], disable: Callable[[], None]) -> dict:
    enable()
    try:
        loop(steps)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(REPEATS):
            torch.cuda.synchronize()
            _together()
            started = time.perf_counter()
            loop(steps)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return {"seconds": min(times), "peak_extra_bytes": _largest(torch.cuda.max_memory_allocated() - base)}
    finally:
        disable()


def context_parallel(degree: int) -> int:
    """Join the ``torchrun`` job as one of ``degree`` ranks, one GPU each; this rank's index."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != degree:
        raise SystemExit(f"--cp-degree {degree} runs as {degree} processes, one per GPU: "
                         f"torchrun --nproc_per_node {degree} -m hyca.bench --gpu --cp-degree {degree} "
                         f"(this is one of {world})")
    if torch.cuda.device_count() < degree:
        raise SystemExit(f"--cp-degree {degree} needs {degree} GPUs; {torch.cuda.device_count()} are visible")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    return dist.get_rank()


def run(steps_list: tuple[int, ...] = (28, 50), cp_degree: int = 1) -> dict:
    """``cp_degree`` > 1: diffusers' context parallelism (Ulysses) over that many GPUs, run
    under ``torchrun``; only rank 0 prints, and its result has ``writer`` True."""
    require_cuda()
    rank = context_parallel(cp_degree) if cp_degree > 1 else 0
    model = build()
    loop = Loop(model)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [],
                              "cp_degree": cp_degree, "writer": rank == 0}
    profiles = {steps: probe(loop, steps) for steps in steps_list}  # on the whole sequence, before parallelism
    if cp_degree > 1:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp_degree))
    for steps in steps_list:
        full_seconds = None
        for name, enable, disable in methods(loop, steps, profiles[steps]):
            row = {"method": name, "steps": steps, **measure(loop, steps, enable, disable)}
            full_seconds = full_seconds or row["seconds"]
            row["speedup"] = full_seconds / row["seconds"]
            result["rows"].append(row)
            if rank == 0:
                print(f"{steps} steps  {name:40s} {row['seconds']:7.2f} s  {row['speedup']:5.2f}x  "
                      f"peak extra {row['peak_extra_bytes'] / 2 ** 30:6.2f} GiB", flush=True)
    return result


def markdown(result: dict, command: str) -> str:
    lines = ["# HyCa and peers on FLUX.1-dev's architecture (random weights): latency and memory", "",
             f"Command: `{command}`", "", f"Device: {result['device']}, torch {result['torch']}; bf16, 1024x1024, "
             f"interval {INTERVAL}, warm-up {WARMUP}; best of {REPEATS} runs after a warm-up run.", "",
             "| steps | method | seconds | speed-up | peak memory above the model (GiB) |", "|---|---|---|---|---|"]
    degree = result.get("cp_degree", 1)
    if degree > 1:
        lines[4] += (f" Context parallelism: Ulysses over {degree} GPUs (diffusers); seconds on rank 0, memory "
                     "on the rank that used the most.")
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['method']} | {r['seconds']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['peak_extra_bytes'] / 2 ** 30:.2f} |")
    return "\n".join(lines) + "\n"
