"""``python -m hyca.bench``: HyCa against every peer, side by side, measured the same way in one run.

Every method runs on the same prompts and seeds; each is scored by its FLOPs ratio
(``torch.utils.flop_counter``), its wall-clock ratio against full compute timed in the
same run, the bytes its cache holds, and the fidelity (PSNR, SSIM) of its images against
the full-compute image of the same prompt and seed. See ``docs/bench.md``.
"""
