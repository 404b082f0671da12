"""Developer tool: the measurements docs/comfyui.md and bench/results quote, on the reference
model in ComfyUI's own ``Flux`` class (tests/comfy_harness.py ``reference_in_comfy``; ComfyUI
0.3.75's classes, as tests/test_comfyui_reference.py runs them).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python tools/comfyui_reference.py
        the grid: diffusers' HyCa against the ComfyUI node's, per cell and caption
        (bench/results/comfyui_reference.md)
    ... python tools/comfyui_reference.py --one-call-per-chunk
        the guarded guided cells on ComfyUI's low-memory path (cond and uncond in separate
        calls, uncond first: the model reports more memory needed than is free)
    ... python tools/comfyui_reference.py --renoising
        a model-output profile (am2) against FORA per sampler (bench/results/renoising.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from test_comfyui_reference import (CAPTIONS, STEPS, HyCaPatch, OneBook, Profile, Settings, _grid_cell,  # noqa: E402
                                    harness, load_pipeline, psnr, recognise)


def main() -> None:
    pipe = load_pipeline()
    shared = (pipe, *harness.reference_in_comfy(pipe))
    if "--renoising" in sys.argv:  # bench/results/renoising.md: a model-output profile (am2) against FORA per sampler
        _, patcher, to_latent, to_image = shared
        model = patcher.model.diffusion_model
        adapter = recognise(model)
        channels = to_latent(torch.zeros(1, 3, 32, 32)).shape[1]  # the model call's output: the latent's
        output = Profile(labels=torch.zeros(1, channels, dtype=torch.int64),
                         solvers=torch.tensor([[5]]), metadata={"target": "model_output"})
        fora = Profile.uniform("reuse", len(adapter.blocks(model)), adapter.hidden_size(model))
        empty = pipe.encode_prompt([""])
        for sampler in ("euler", "euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde"):
            scores: dict[str, list[float]] = {"output": [], "fora": []}
            for seed in range(4):
                for caption in CAPTIONS:
                    hidden, pooled = pipe.encode_prompt([caption])
                    noise = to_latent(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))

                    def image(m):
                        out = harness.sample(m, [[hidden, {"pooled_output": pooled}]],
                                             [[empty[0], {"pooled_output": empty[1]}]], noise, steps=STEPS,
                                             sampler=sampler)
                        return (to_image(m.model.process_latent_in(out)).clamp(-1, 1) + 1) / 2

                    full = image(patcher)
                    for name, profile in (("output", output), ("fora", fora)):
                        patched = HyCaPatch(Settings(enabled=True, interval=4, warmup=3, guard=True), adapter,
                                            OneBook(profile, name)).install(patcher)
                        scores[name].append(psnr(image(patched), full))
            print(f"| {sampler} | {sum(scores['output']) / 8:.2f} | {sum(scores['fora']) / 8:.2f} |")
        return
    apart = "--one-call-per-chunk" in sys.argv
    if apart:
        shared[1].model.memory_required = lambda *args, **kwargs: float("inf")
    for guard in (True,) if apart else (False, True):
        for n in (3, 5):
            for scale in (2.5,) if apart else (1.0, 2.5):
                for index, (diffusers_db, comfy_db, diff) in enumerate(_grid_cell(shared, scale, n, guard)):
                    print(f"| {'on' if guard else 'off'} | {n} | {scale:g} | {index} | {diffusers_db:.2f} "
                          f"| {comfy_db:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
