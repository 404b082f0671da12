"""The engine's part of HyCa's wall-clock on the reference model (issue 20 item 8), and an
output to compare between two engine versions.

    python -m hyca.bench.hot_path [--save out.safetensors]
    PYTHONPATH=<other checkout> python -m hyca.bench.hot_path --save other.safetensors --no-timing

Per-call medians (hyca.bench.overhead.decompose: a computed call, a skip call, the block-less
transformer, full compute) at 50 steps, N=4 and N=7, the shipped reference profile, guard
on (the default), one torch thread. ``--save``: the images of :data:`SAVED` (shipped
profiles and plain solvers; guided, batched, sigma axis), for a bit-for-bit comparison of
two engines (``torch.equal`` per entry). ``--peers``: per-call medians of HyCa's plain call
(the shipped profile with its own guard setting, then with the guard forced on and off),
FORA in HyCa's engine and diffusers' TaylorSeer lite (order 1) against full compute, their
runs interleaved in one process (:func:`hyca.bench.overhead.compare_calls`): where a cache's
time goes, computed calls against skip calls.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from safetensors.torch import save_file

import hyca
from hyca.bench import methods
from hyca.bench.overhead import compare_calls, decompose
from hyca.bench.workload import Case
from hyca.profiles.sources import shipped_dir
from hyca.reference import load_pipeline

CASE = Case(prompt="a large red circle at the center on a white background", seed=0)
PROMPTS = ["a red circle on white", "a small blue square at the top left on a black background"]
#: name -> (hyca.enable arguments, pipeline call arguments; "batch": both prompts at once). A
#: profile given as an int is the shipped reference profile for that N.
SAVED = {
    "n4_50": (dict(profile=4, interval=4), dict(num_inference_steps=50)),
    "n7_28_guided": (dict(profile=7, interval=7), dict(num_inference_steps=28, guidance_scale=2.5)),
    "n4_28_batch_guided": (dict(profile=4, interval=4), dict(num_inference_steps=28, guidance_scale=2.5, batch=True)),
    "n6_50_batch": (dict(profile=6, interval=6), dict(num_inference_steps=50, batch=True)),
    "reuse_n4_28": (dict(profile="reuse", interval=4), dict(num_inference_steps=28)),
    "taylor1_n7_50_guided": (dict(profile="taylor-1", interval=7), dict(num_inference_steps=50, guidance_scale=2.5)),
    "n5_30_sigma": (dict(profile=5, interval=5, positions="sigma"), dict(num_inference_steps=30)),
}


def shipped(interval: int) -> str:
    return str(next(shipped_dir().glob(f"*-n{interval}.safetensors")))


def save_images(path: str) -> None:
    """Every :data:`SAVED` run on a fresh reference pipeline, its images to ``path``."""
    images = {}
    for name, (enable, call) in SAVED.items():
        pipe = load_pipeline()
        enable = {**enable, "profile": shipped(enable["profile"]) if isinstance(enable["profile"], int)
                  else enable["profile"]}
        hyca.enable(pipe, warmup=3, **enable)
        call = dict(call)
        prompts = PROMPTS if call.pop("batch", False) else PROMPTS[0]
        out = pipe(prompts, generator=torch.Generator().manual_seed(3), output_type="pt", **call).images
        images[name] = torch.as_tensor(out).contiguous()
        print(name, "|", "; ".join(s.describe() for s in hyca.stats(pipe)))
    save_file(images, path)
    print("saved", len(images), "runs to", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-timing", action="store_true", help="only --save")
    parser.add_argument("--peers", action="store_true", help="per-call times of HyCa, FORA and TaylorSeer lite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"hyca from {hyca.__file__}, torch {torch.__version__}, 1 thread")
    if args.save:
        save_images(args.save)
    if args.no_timing:
        return
    pipe = load_pipeline()
    if args.peers:
        for interval in (4, 7):
            print_peers(pipe, interval, max(args.repeats, 8))
        return
    for interval in (4, 7):
        d = decompose(pipe, CASE, 50, interval, "auto", repeats=args.repeats)
        print(f"N={interval}: full call {d['full_call_ms']:.3f} ms, "
              f"HyCa computed call {d['hyca_compute_call_ms']:.3f} ms "
              f"(+{d['hyca_compute_call_ms'] - d['full_call_ms']:.3f}), skip call {d['hyca_skip_call_ms']:.3f} ms, "
              f"block-less {d['blockless_call_ms']:.3f} ms (+{d['hyca_skip_call_ms'] - d['blockless_call_ms']:.3f}); "
              f"speed-up modelled {d['modelled_hyca_speedup']:.2f}x, measured {d['measured_hyca_speedup']:.2f}x, "
              f"FLOPs {d['steps_ratio']:.2f}x")


def print_peers(pipe, interval: int, repeats: int) -> None:
    def plain(name: str, **kwargs: bool) -> methods.Method:
        def enable(p: Any) -> None:
            hyca.enable(p, interval=interval, warmup=methods.WARMUP, **kwargs)

        return methods.Method(name, f"N={interval}", enable, hyca.disable)

    # the shipped profile with the guard forced on and off: what the guard's check costs per computed call
    rows = compare_calls(pipe, CASE, 50, [methods.full(), plain("HyCa plain call"), plain("HyCa, guard on", guard=True),
                                          plain("HyCa, guard off", guard=False), methods.fora(interval),
                                          methods.diffusers_taylorseer(interval, 1)], repeats)
    full = rows[0]["computed_call_ms"]
    print(f"50 steps, N={interval}, {repeats} interleaved runs each; medians")
    print("| method | computed calls | computed call ms (vs full) | skip calls | skip call ms | run ms | outside ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        skip = f"{r['skip_call_ms']:.3f}" if r["skip_call_ms"] is not None else "-"
        print(f"| {r['method']} | {r['computed_calls']:g} | {r['computed_call_ms']:.3f} "
              f"({r['computed_call_ms'] - full:+.3f}) | {r['skip_calls']:g} | {skip} | {r['run_ms']:.1f} | "
              f"{r['outside_ms']:.1f} |")


if __name__ == "__main__":
    main()
