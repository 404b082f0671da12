"""The engine's part of HyCa's wall-clock on the reference model (issue 20 item 8), and an
output to compare between two engine versions.

    python -m hyca.bench.hot_path [--save out.safetensors]
    PYTHONPATH=<other checkout> python -m hyca.bench.hot_path --save other.safetensors

Per-call medians (hyca.bench.overhead.decompose: a computed call, a skip call, the block-less
transformer, full compute) at 50 steps, N=4 and N=7, the shipped reference profile, guard
on (the default), one torch thread. ``--save``: the N=4 image of prompt 0 (seed 0), for a
bit-for-bit comparison of two engines.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

import hyca
from hyca.bench.overhead import decompose
from hyca.bench.workload import Case, generate
from hyca.reference import load_pipeline

CASE = Case(prompt="a large red circle at the center on a white background", seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline()
    print(f"hyca from {hyca.__file__}, torch {torch.__version__}, 1 thread")
    for interval in (4, 7):
        d = decompose(pipe, CASE, 50, interval, "auto", repeats=args.repeats)
        print(f"N={interval}: full call {d['full_call_ms']:.3f} ms, "
              f"HyCa computed call {d['hyca_compute_call_ms']:.3f} ms "
              f"(+{d['hyca_compute_call_ms'] - d['full_call_ms']:.3f}), skip call {d['hyca_skip_call_ms']:.3f} ms, "
              f"block-less {d['blockless_call_ms']:.3f} ms (+{d['hyca_skip_call_ms'] - d['blockless_call_ms']:.3f}); "
              f"speed-up modelled {d['modelled_hyca_speedup']:.2f}x, measured {d['measured_hyca_speedup']:.2f}x, "
              f"FLOPs {d['steps_ratio']:.2f}x")
    if args.save:
        hyca.enable(pipe, interval=4, warmup=3)
        save_file({"image": generate(pipe, CASE, 50).contiguous()}, args.save)
        print("saved the N=4 image to", args.save, "|", hyca.stats(pipe)[0].describe())


if __name__ == "__main__":
    main()
