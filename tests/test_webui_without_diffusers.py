"""The WebUI path, probe included, with ``diffusers`` unimportable: Forge pins an old
diffusers without ``diffusers.hooks``, and its users must still get a probed profile on
their first generation. Runs in a fresh interpreter whose import system refuses
``diffusers`` (a meta-path finder raising ImportError), so nothing already imported by
other tests can hide a dependency."""

import json
import os
import subprocess
import sys
import textwrap

from webui_harness import ROOT, TESTS

SCRIPT = textwrap.dedent('''
    import importlib.abc, json, sys

    class NoDiffusers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffusers" or name.startswith("diffusers."):
                raise ImportError(f"diffusers is blocked for this test ({name})")
            return None

    sys.meta_path.insert(0, NoDiffusers())
    sys.path[:0] = [TESTS]
    try:
        import diffusers  # noqa: F401
        raise SystemExit("diffusers should not be importable here")
    except ImportError:
        pass

    import torch
    from webui_harness import Processing, generate, load_script, standins

    result = {}
    with standins("forge"):
        script = load_script().HyCaScript()
        from webui_harness import model_kinds
        model = model_kinds()["forge_flux"].factory()
        auto = [True, 3, 2, True, True, "automatic", "", True, "model", True]
        first = Processing("forge_flux", model, steps=10)
        generate(first, script, auto)
        second = Processing("forge_flux", model, steps=10)
        generate(second, script, auto)
        result["first"] = {k: str(v) for k, v in first.extra_generation_params.items()}
        result["second"] = {k: str(v) for k, v in second.extra_generation_params.items()}
    result["diffusers_modules"] = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
    print("RESULT " + json.dumps(result))
''')


def test_forge_flux_probes_on_its_first_generation_without_diffusers(tmp_path):
    env = dict(os.environ, HYCA_CACHE=str(tmp_path), HYCA_HUB_REPO="none", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYCA_PROFILES", None)
    code = SCRIPT.replace("TESTS]", repr(str(TESTS)) + "]")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    out = done.stdout
    assert result["diffusers_modules"] == []
    assert "probing Forge FLUX for this pass's settings" in out and "profile ready (probe, saved to" in out
    # the first generation is probed at its first call and cached with the profile; the second finds it
    assert result["first"]["HyCa steps"] == result["second"]["HyCa steps"] == "5 computed, 5 forecast"
    assert out.count("probing Forge FLUX") == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
