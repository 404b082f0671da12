"""The runtime and the lab apart: ``import hyca`` and a cached generation load none of the
extras (the app's gradio, the benchmark's matplotlib and cache-dit) nor the app, benchmark
or trainer modules; each extra, when missing, is named with the pip command that installs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNTIME_ONLY = """
import json, sys
import torch
import hyca
from hyca.reference import tiny_components
pipe = tiny_components(seed=0)
hyca.enable(pipe, "fora", interval=2, warmup=1)
pipe("a small red circle at the top left on a white background", num_inference_steps=4,
     generator=torch.Generator().manual_seed(0))
hyca.disable(pipe)
print(json.dumps(sorted(sys.modules)))
"""


def test_a_cached_generation_loads_no_extra_and_no_lab_module(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYCA_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not loaded & {"gradio", "matplotlib", "cache_dit", "hyca.app", "hyca.bench", "hyca.reference.train"}


def test_the_app_without_gradio_names_the_app_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` does when it is not installed
    spec = importlib.util.spec_from_file_location("app_without_gradio", ROOT / "app.py")
    with pytest.raises(ImportError, match=r'pip install "hyca\[app\]"'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_benchmark_without_matplotlib_or_cache_dit_names_the_bench_extra(monkeypatch):
    from hyca.bench import methods, report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    with pytest.raises(SystemExit, match=r'pip install "hyca\[bench\]".*--no-plot'):
        report.pyplot()
    assert 'pip install "hyca[bench]"' in methods.cache_dit_available()
