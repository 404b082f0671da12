"""What a skip step costs, and what the cache holds (issue 2's figures).

    python -m hyca.bench.engine_overhead

1. FLOPs of a skip step as a fraction of a full step, for FLUX.1-dev's shape (hidden 3072,
   19 double + 38 single blocks, 4096 image + 512 text tokens = 1024x1024) and for a tiny
   model run for real through HyCa's hooks. FLOPs are counted with
   ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and attention;
   the forecast kernel is elementwise, so its FLOPs (one multiply and one add per cached
   element it reads) are added by formula and shown separately.
   FLUX.1-dev itself runs on the ``meta`` device (shapes only, no weights, no memory); its
   skip step is the same model with both block lists emptied, which is what HyCa's hooks
   leave of a skip step. The tiny model checks that claim: its skip step measured through
   the real hooks must equal its empty-block-list count.
2. Cache bytes of the aggregated per-solver history (docs/design.md, section 4) against a per-block history,
   for 57 blocks and a profile that uses 4 solvers, measured with the engine's own
   ``history_bytes`` on meta tensors.
3. The runtime guard's cost at a computed step (hyca/engine/guard.py): per solver slot it
   forecasts the step with its solver and the lower orders (elementwise, by formula), and
   with two guidance branches it sketches each candidate's error (``SKETCH_ROWS`` x tokens
   x dim matrix products, counted by ``FlopCounterMode`` on a tiny guided run and checked
   against the formula); and the history values it keeps until the step ends.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

import hyca
from hyca.engine import HybridCache, Schedule
from hyca.math.solvers import pool_names
from hyca.profiles import Profile

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6),
)
FOUR_SOLVERS = ("reuse", "taylor-1", "taylor-2", "lagrange-3")


def flux_inputs(config: dict, image_tokens: int, text_tokens: int, device: str) -> dict:
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(image_tokens, 3, device=device)
    if device != "meta":
        img_ids[:, 1] = torch.arange(image_tokens) // side
        img_ids[:, 2] = torch.arange(image_tokens) % side
    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.empty(*s, device="meta")) if device == "meta" else (lambda *s: torch.randn(*s, generator=g))
    inputs = dict(
        hidden_states=make(1, image_tokens, config["in_channels"]),
        encoder_hidden_states=make(1, text_tokens, config["joint_attention_dim"]),
        pooled_projections=make(1, config["pooled_projection_dim"]),
        timestep=torch.full((1,), 0.5, device=device),
        img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3, device=device), return_dict=False,
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), 3.5, device=device)
    return inputs


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function()
    return counter.get_total_flops()


@contextlib.contextmanager
def without_blocks(model: FluxTransformer2DModel):
    """The model as a skip step leaves it: embeddings and output layers only."""
    saved = model.transformer_blocks, model.single_transformer_blocks
    model.transformer_blocks, model.single_transformer_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
    try:
        yield model
    finally:
        model.transformer_blocks, model.single_transformer_blocks = saved


def mixed_profile(blocks: int, dim: int, solvers=FOUR_SOLVERS) -> Profile:
    """Every block splits its dimensions into one cluster per solver (the worst case for memory)."""
    labels = (torch.arange(dim) * len(solvers) // dim).expand(blocks, dim)
    ids = torch.tensor([pool_names().index(s) for s in solvers]).expand(blocks, len(solvers))
    return Profile(labels=labels, solvers=ids)


def kernel_flops(profile: Profile, residual_numel: int) -> int:
    """Multiply-add per element for every history term the forecast reads."""
    engine = HybridCache(profile, Schedule())
    terms = sum(s.history for s in engine.solvers)
    return 2 * terms * residual_numel


def skip_fraction_flux_dev(image_tokens: int = 4096, text_tokens: int = 512) -> dict:
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV).eval()
    inputs = flux_inputs(FLUX_DEV, image_tokens, text_tokens, "meta")
    full = count_flops(lambda: model(**inputs))
    with without_blocks(model):
        rest = count_flops(lambda: model(**inputs))
    dim = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    blocks = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    kernel = kernel_flops(mixed_profile(blocks, dim), image_tokens * dim)
    return dict(full=full, rest=rest, kernel=kernel, fraction=(rest + kernel) / full)


def skip_fraction_tiny(steps: int = 12, interval: int = 4, warmup: int = 2) -> dict:
    """Per-call FLOPs of a real hooked run: computed steps vs forecast steps."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY).eval()
    inputs = flux_inputs(TINY, 64, 8, "cpu")
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    blocks = TINY["num_layers"] + TINY["num_single_layers"]
    full = count_flops(lambda: model(**inputs))
    with without_blocks(model):
        rest = count_flops(lambda: model(**inputs))
    profile = mixed_profile(blocks, dim)
    (engine,) = hyca.enable(model, profile=profile, interval=interval, warmup=warmup)
    per_call = []
    for step in range(steps):
        inputs["timestep"] = torch.full((1,), 1.0 - step / steps)
        per_call.append(count_flops(lambda: model(**inputs)))
    stats = hyca.stats(model)[0]
    hyca.disable(model)
    skip_calls = [f for f in per_call if f < full]
    return dict(full=full, rest=rest, kernel=kernel_flops(profile, 64 * dim), per_call=per_call,
                skip_measured=skip_calls[0] if skip_calls else None, stats=stats.describe(),
                run_ratio=sum(per_call) / (full * steps))


def cache_bytes(blocks: int, tokens: int, dim: int, dtype=torch.bfloat16) -> dict:
    """Fill an engine's history on meta tensors; compare with a per-block history."""
    profile = mixed_profile(blocks, dim)
    engine = HybridCache(profile, Schedule(interval=5, warmup=4), cache_dtype=dtype)
    state = engine.new_state()
    residual = torch.empty(1, tokens, dim, device="meta", dtype=dtype)
    for step in range(4):  # enough computed steps to fill the longest history
        engine.begin_step(state, None, tuple(residual.shape), 50)
        for block in range(blocks):
            engine.record(state, block, residual)
        engine.end_step(state)
    aggregated = engine.history_bytes(state)
    # A per-block history keeps, for every block, as many residuals as its longest solver needs.
    per_block_terms = sum(max(engine.solvers[s].history for s in range(len(engine.solvers)) if one_hot[s].any())
                          for one_hot in engine._one_hot)
    per_block = per_block_terms * residual.numel() * residual.element_size()
    return dict(aggregated=aggregated, per_block=per_block, ratio=aggregated / per_block)


def guard_candidates(solvers=FOUR_SOLVERS) -> int:
    """Forecasts one check makes over the slots: a slot's solver and the lower orders below
    it (taylor-1, reuse); a reuse slot has nothing lower and is not checked."""
    return sum({"reuse": 0, "taylor-1": 2}.get(s, 3) for s in solvers)


def guard_cost_formula(tokens: int, dim: int, guided: bool, terms: int = 3, solvers=FOUR_SOLVERS) -> dict:
    """FLOPs of one guard check: forecasts (multiply-add per history term and element, at
    most ``terms`` terms) and, guided, the sketches (2 x rows x tokens x dim per forecast)."""
    from hyca.engine.guard import SKETCH_ROWS

    candidates = guard_candidates(solvers)
    forecast = 2 * terms * candidates * tokens * dim
    sketch = 2 * SKETCH_ROWS * tokens * dim * candidates if guided else 0
    return dict(forecast=forecast, sketch=sketch, candidates=candidates)


def guard_sketch_flops_tiny(steps: int = 12, interval: int = 3, warmup: int = 2) -> dict:
    """Counted matrix-product FLOPs a guided tiny run adds with the guard on: only the
    sketches are matrix products, so the difference must equal their formula."""
    from hyca.engine.guard import steady

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY).eval()
    inputs = flux_inputs(TINY, 64, 8, "cpu")
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    blocks = TINY["num_layers"] + TINY["num_single_layers"]
    totals = {}
    for guard in (False, True):
        (engine,) = hyca.enable(model, profile=mixed_profile(blocks, dim), interval=interval, warmup=warmup,
                                guard=guard, scheduler=None)
        total = 0
        for step in range(steps):
            inputs["timestep"] = torch.full((1,), 1.0 - step / steps)
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, num_inference_steps=steps):
                    total += count_flops(lambda: model(**inputs))
        totals[guard] = total
        hyca.disable(model)
    plan = Schedule(interval, warmup).plan(steps)
    done = [k for k, c in enumerate(plan) if c]
    checks = sum(steady([k, *reversed(done[:i])], interval) for i, k in enumerate(done))
    per_check = guard_cost_formula(64, dim, guided=True)["sketch"]
    return dict(added=totals[True] - totals[False], expected=2 * checks * per_check, checks=checks)


def main() -> None:
    print(f"hyca {hyca.__version__}, torch {torch.__version__}")
    print("\n## Skip-step FLOPs (FlopCounterMode; forecast kernel by formula)\n")
    dev = skip_fraction_flux_dev()
    print("FLUX.1-dev shape (1024x1024: 4096 image + 512 text tokens, 57 blocks, 4 solvers):")
    print(f"  full step           {dev['full'] / 1e12:10.2f} TFLOPs")
    print(f"  skip step, layers   {dev['rest'] / 1e9:10.2f} GFLOPs (embeddings, norm_out, proj_out)")
    print(f"  skip step, forecast {dev['kernel'] / 1e9:10.2f} GFLOPs (9 history terms x 4096 x 3072 x 2)")
    print(f"  skip / full         {dev['fraction']:10.3%}   (target < 2%)")
    tiny = skip_fraction_tiny()
    print("\nTiny FLUX (6 blocks x 64 dims, 64 image + 8 text tokens), run through HyCa's hooks:")
    print(f"  full step {tiny['full']} FLOPs; skip step measured {tiny['skip_measured']} FLOPs "
          f"(empty-block-list count {tiny['rest']}, equal: {tiny['skip_measured'] == tiny['rest']})")
    print(f"  skip / full incl. forecast kernel {(tiny['rest'] + tiny['kernel']) / tiny['full']:.3%}")
    print(f"  run of 12 steps, N=4, W=2: {tiny['stats']}; counted FLOPs {tiny['run_ratio']:.3f} of full")
    print("\n## Cache bytes, aggregated per-solver history vs per-block history (bf16)\n")
    for label, blocks, tokens, dim in (("FLUX.1-dev 1024x1024", 57, 4096, 3072),
                                       ("FLUX.1-dev 1024x1024 incl. text tokens", 57, 4608, 3072),
                                       ("tiny", 6, 64, 64)):
        b = cache_bytes(blocks, tokens, dim)
        print(f"  {label:40s} aggregated {b['aggregated'] / 2**20:9.1f} MiB, per-block "
              f"{b['per_block'] / 2**20:9.1f} MiB, ratio {b['ratio']:.4f} = 1/{1 / b['ratio']:.1f}  (target < 1/8)")
    print("\n## The guard at a computed step\n")
    full = dev["full"]
    for guided in (False, True):
        g = guard_cost_formula(tokens=4096, dim=3072, guided=guided)
        print(f"  FLUX.1-dev 1024x1024, 4 solver slots ({g['candidates']} forecasts), "
              f"{'two guidance branches' if guided else 'one branch'}: "
              f"forecasts {g['forecast'] / 1e9:.2f} GFLOPs + sketches {g['sketch'] / 1e9:.2f} GFLOPs per branch "
              f"= {(g['forecast'] + g['sketch']) / full:.4%} of a full step")
    tiny_guard = guard_sketch_flops_tiny()
    print(f"  tiny guided run (12 steps, N=3, W=2, {tiny_guard['checks']} steady checks per branch): matrix-product "
          f"FLOPs added by the guard {tiny_guard['added']}, sketch formula {tiny_guard['expected']} "
          f"(equal: {tiny_guard['added'] == tiny_guard['expected']})")
    held = 4 * 4096 * 3072 * 2
    print(f"  memory: the oldest history value of each slot is kept until the check at the step's end "
          f"(one per slot: {held / 2**20:.0f} MiB for FLUX.1-dev 1024x1024, 4 slots, bf16), instead of being "
          "recycled for the step's sums")


if __name__ == "__main__":
    main()
