"""Developer tool: seconds and cached runs of the default first-use probe, for comparing two
commits' probes on one machine (bench/results/probe_defaults.md quotes it).

    PYTHONPATH=<checkout> HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 HYCA_CACHE=<tmp> \\
        python tools/time_default_probe.py <label>

``hyca.probe`` as ``hyca.enable(pipe, interval=4, warmup=3)`` runs it on a pipeline's first
call at new settings: the reference model's own probe captions, 28 steps, warm-up 3, one CPU
thread, unguided and at guidance 2.5. Prints one ``RESULT`` line of JSON: per guidance the
seconds, the cached runs (a candidate that took an earlier one's run is not a run), the
calls that ran the blocks and all transformer calls (which do not depend on the machine's
load), the probe's own timing and its choice. The ``hyca`` imported is the one on ``PYTHONPATH``: run the
tool from one checkout against another's code, alternating, so both see the same machine.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> int:
    torch.set_num_threads(1)
    import hyca
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    prompt = pipe.hyca_probe_defaults["prompt"]
    out: dict = {"label": sys.argv[1] if len(sys.argv) > 1 else "", "hyca": hyca.__file__}
    for guidance in (1.0, 2.5):
        blocks, calls = [], []  # what does not depend on the machine's load: calls that run the blocks, all calls
        hooks = [pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: blocks.append(1)),
                 pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))]
        started = time.perf_counter()
        try:
            profile = hyca.probe(pipe, prompt=prompt, steps=28, interval=4, warmup=3, guidance_scale=guidance,
                                 progress=False)
        finally:
            for hook in hooks:
                hook.remove()
        trials = profile.metadata["selection"]["closed_loop"]["trials"]
        out[str(guidance)] = {"s": round(time.perf_counter() - started, 2),
                              "runs": sum("same_as" not in t for t in trials),
                              "block_calls": len(blocks), "transformer_calls": len(calls),
                              "timing": profile.metadata["timing"],
                              "chosen": profile.metadata["selection"]["closed_loop"]["chosen"]}
    print("RESULT", json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
