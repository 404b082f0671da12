"""Developer tool: the WebUI extension against the frontends' own sources.

Not a WebUI script (every ``.py`` in ``scripts/`` is loaded by the WebUI; this lives in
``tools/``). It needs local checkouts of the frontends, which this repository never
contains; point it at them::

    python tools/webui_upstream.py conformance --forge PATH --neo PATH --a1111 PATH
    python tools/webui_upstream.py run --forge PATH --neo PATH --a1111 PATH [--python PY]

``conformance`` compares, without importing anything from the checkouts, what the
stand-ins in ``tests/standins`` assume (tests/standins/CONFORMANCE.md) with the upstream
files: signatures of the model and block ``forward``s, block-list attributes, the
``patches_replace["dit"]`` keys and the ``block_wrap`` argument names, whether blocks
update their input in place, and the infotext / LoRA contracts the script relies on.
Run it before any adapter change; it prints a Markdown table and exits 1 on a mismatch.

``run`` imports each frontend's model classes from its checkout (one fresh interpreter
per frontend, since Forge and Neo both call their package ``backend``), builds them with
tiny configs and seeded random weights, and drives them through the extension exactly as
the tests drive the stand-ins (tests/webui_harness.py: the script's hooks, the Forge
unet-patcher / sampling-function stand-in, Euler on a shifted flow schedule, cond and
uncond batched), comparing with the independent reference (tests/webui_reference.py):
FORA (reuse) and TaylorSeer-2 forecasts, disabled = unpatched bit for bit, and the
automatic probe on the first generation. The interpreter given by ``--python`` must be
able to import the checkouts' model files (einops, psutil, gguf, comfy-kitchen for Neo;
torch and hyca). A1111's ``modules/models/sd3/other_impls.py`` imports
``modules.sd_hijack`` (the whole WebUI); only that module is replaced by a stub, since
MMDiT does not use it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
STANDINS = TESTS / "standins"

# --- conformance -------------------------------------------------------------------------

#: (frontend, upstream file, class, method, stand-in file, stand-in class)
SIGNATURES = [
    ("forge", "backend/nn/flux.py", "IntegratedFluxTransformer2DModel", "forward", "forge/backend/nn/flux.py", None),
    ("forge", "backend/nn/flux.py", "IntegratedFluxTransformer2DModel", "inner_forward", "forge/backend/nn/flux.py", None),
    ("forge", "backend/nn/flux.py", "DoubleStreamBlock", "forward", "forge/backend/nn/flux.py", None),
    ("forge", "backend/nn/flux.py", "SingleStreamBlock", "forward", "forge/backend/nn/flux.py", None),
    ("forge", "backend/nn/chroma.py", "IntegratedChromaTransformer2DModel", "forward", "forge/backend/nn/chroma.py", None),
    ("forge", "backend/nn/chroma.py", "IntegratedChromaTransformer2DModel", "inner_forward", "forge/backend/nn/chroma.py", None),
    ("forge", "backend/nn/chroma.py", "DoubleStreamBlock", "forward", "forge/backend/nn/chroma.py", None),
    ("forge", "backend/nn/chroma.py", "SingleStreamBlock", "forward", "forge/backend/nn/chroma.py", None),
    ("forge", "backend/nn/mmditx.py", "MMDiTX", "forward", "forge/backend/nn/mmditx.py", None),
    ("forge", "backend/nn/mmditx.py", "MMDiTX", "forward_core_with_concat", "forge/backend/nn/mmditx.py", None),
    ("neo", "backend/nn/flux.py", "IntegratedFluxTransformer2DModel", "forward", "neo/backend/nn/flux.py", None),
    ("neo", "backend/nn/flux.py", "IntegratedFluxTransformer2DModel", "forward_orig", "neo/backend/nn/flux.py", None),
    ("neo", "backend/nn/flux.py", "DoubleStreamBlock", "forward", "neo/backend/nn/flux.py", None),
    ("neo", "backend/nn/flux.py", "SingleStreamBlock", "forward", "neo/backend/nn/flux.py", None),
    ("neo", "backend/nn/qwen.py", "QwenImageTransformer2DModel", "forward", "neo/backend/nn/qwen.py", None),
    ("neo", "backend/nn/qwen.py", "QwenImageTransformerBlock", "forward", "neo/backend/nn/qwen.py", None),
    ("neo", "backend/nn/wan.py", "WanModel", "forward", "neo/backend/nn/wan.py", None),
    ("neo", "backend/nn/wan.py", "WanAttentionBlock", "forward", "neo/backend/nn/wan.py", None),
    ("neo", "backend/nn/lumina.py", "NextDiT", "forward", "neo/backend/nn/lumina.py", None),
    ("neo", "backend/nn/lumina.py", "JointTransformerBlock", "forward", "neo/backend/nn/lumina.py", None),
    ("a1111", "modules/models/sd3/mmdit.py", "MMDiT", "forward", "webui/modules/models/sd3/mmdit.py", None),
    ("a1111", "modules/models/sd3/mmdit.py", "MMDiT", "forward_core_with_concat", "standin_mmdit.py", "MMDiTLayout"),
    ("a1111", "modules/models/sd3/mmdit.py", "JointBlock", "forward", "standin_mmdit.py", None),
]

#: (frontend, upstream file, class, method): blocks whose stream HyCa reads; "in place"
#: means the method writes its first tensor argument with an augmented assignment.
IN_PLACE = [
    ("forge", "backend/nn/flux.py", "DoubleStreamBlock", "forward", "forge/backend/nn/flux.py"),
    ("forge", "backend/nn/flux.py", "SingleStreamBlock", "forward", "forge/backend/nn/flux.py"),
    ("forge", "backend/nn/chroma.py", "DoubleStreamBlock", "forward", "forge/backend/nn/chroma.py"),
    ("forge", "backend/nn/chroma.py", "SingleStreamBlock", "forward", "forge/backend/nn/chroma.py"),
    ("neo", "backend/nn/flux.py", "DoubleStreamBlock", "forward", "neo/backend/nn/flux.py"),
    ("neo", "backend/nn/flux.py", "SingleStreamBlock", "forward", "neo/backend/nn/flux.py"),
    ("neo", "backend/nn/qwen.py", "QwenImageTransformerBlock", "forward", "neo/backend/nn/qwen.py"),
    ("neo", "backend/nn/wan.py", "WanAttentionBlock", "forward", "neo/backend/nn/wan.py"),
    ("neo", "backend/nn/lumina.py", "JointTransformerBlock", "forward", "neo/backend/nn/lumina.py"),
]

#: (frontend, upstream file, needles that must all appear on some line) -- the contracts
#: read by the adapters and the script, with what they mean.
CONTRACTS = [
    ("forge", "backend/nn/mmditx.py", ['transformer_options.get("skip_layers"'], "SD3.5 skip list read from transformer_options"),
    ("forge", "backend/nn/mmditx.py", ["if i in skip_layers"], "skipped joint blocks are not called"),
    ("neo", "backend/nn/flux.py", ['("double_block", i) in blocks_replace'], "Neo FLUX double-block replace key"),
    ("neo", "backend/nn/flux.py", ['("single_block", i) in blocks_replace'], "Neo FLUX single-block replace key"),
    ("neo", "backend/nn/flux.py", ['out["img"], out["txt"] = block(img=args["img"]'], "double block_wrap: img/txt by name"),
    ("neo", "backend/nn/flux.py", ['out["img"] = block(args["img"]'], "single block_wrap: img positional"),
    ("neo", "backend/nn/qwen.py", ['("double_block", i) in blocks_replace'], "Qwen-Image replace key"),
    ("neo", "backend/nn/qwen.py", ['out["txt"], out["img"] = block('], "Qwen-Image block returns (txt, img)"),
    ("neo", "backend/nn/wan.py", ['("double_block", i) in blocks_replace'], "Wan replace key"),
    ("neo", "backend/nn/lumina.py", ["for layer in self.layers"], "Lumina2 layers looped, no replace hook"),
    # output heads (registry ``head``): the final layer is called last, and applies its ``linear`` last
    ("forge", "backend/nn/flux.py", ["img = self.final_layer(img, vec)"], "FLUX: final_layer called last"),
    ("forge", "backend/nn/flux.py", ["x = self.linear(x)"], "FLUX LastLayer: head = final_layer.linear"),
    ("forge", "backend/nn/chroma.py", ["img = self.final_layer(img, final_mod)"], "Chroma: final_layer called last"),
    ("forge", "backend/nn/chroma.py", ["x = self.linear(x)"], "Chroma LastLayer: head = final_layer.linear"),
    ("forge", "backend/nn/mmditx.py", ["x = self.final_layer(x, c_mod)"], "SD3.5: final_layer called last"),
    ("forge", "backend/nn/mmditx.py", ["x = self.linear(x)"], "SD3.5 FinalLayer: head = final_layer.linear"),
    ("neo", "backend/nn/flux.py", ["return self.final_layer(img, vec_orig)"], "Neo FLUX: final_layer called last"),
    ("neo", "backend/nn/flux.py", ["x = self.linear(x)"], "Neo FLUX LastLayer: head = final_layer.linear"),
    ("neo", "backend/nn/qwen.py", ["hidden_states = self.proj_out(hidden_states)"], "Qwen-Image: head = proj_out"),
    ("neo", "backend/nn/wan.py", ["x = self.head(x, e)"], "Wan: the Head module called last"),
    ("neo", "backend/nn/wan.py", ["x = self.head(self.norm(x)"], "Wan Head: head = head.head"),
    ("neo", "backend/nn/lumina.py", ["x = self.final_layer(x, adaln_input)"], "Lumina2: final_layer called last"),
    ("neo", "backend/nn/lumina.py", ["x = self.linear(x)"], "Lumina2 FinalLayer: head = final_layer.linear"),
    ("a1111", "modules/models/sd3/mmdit.py", ["x = self.final_layer(x, c_mod)"], "SD3: final_layer called last"),
    ("a1111", "modules/models/sd3/mmdit.py", ["x = self.linear(x)"], "SD3 FinalLayer: head = final_layer.linear"),
    ("forge", "backend/diffusion_engine/base.py", ["self.current_lora_hash = str([])"], "no LoRA = '[]'"),
    ("neo", "backend/diffusion_engine/base.py", ["self.current_lora_hash = str([])"], "no LoRA = '[]'"),
    ("forge", "extensions-builtin/sd_forge_lora/networks.py", ["compiled_lora_targets_hash = str(compiled_lora_targets)"], "LoRA hash = str(targets)"),
    ("a1111", "extensions-builtin/Lora/networks.py", ["loaded_networks = []"], "A1111 LoRA set: networks.loaded_networks"),
    ("a1111", "extensions-builtin/Lora/networks.py", ["wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim)"], "A1111 keys applied LoRA weights by (name, te, unet, dyn_dim)"),
    ("a1111", "modules/infotext_utils.py", ["name in paste_field_names"], "Send-to matches paste fields by name"),
    ("a1111", "modules/infotext_utils.py", ["if callable(key)"], "pasting calls callable targets"),
    ("a1111", "modules/infotext_utils.py", ['valtype == bool and v == "False"'], "string targets converted by the control's type"),
    ("a1111", "modules/api/api.py", ["field.function(params) if field.function else params.get(field.label)"], "API infotext: function first"),
    ("forge", "modules/infotext_utils.py", ["name in paste_field_names"], "Send-to matches paste fields by name"),
    ("forge", "modules/infotext_utils.py", ["if callable(key)"], "pasting calls callable targets"),
    ("neo", "modules/infotext_utils.py", ["name in paste_field_names"], "Send-to matches paste fields by name"),
    ("neo", "modules/infotext_utils.py", ["if not callable(key)"], "pasting calls callable targets"),
    ("forge", "modules/processing.py", ["with torch.inference_mode():"], "sampling under inference_mode (no version counters)"),
    ("neo", "modules/processing.py", ["with torch.inference_mode():"], "sampling under inference_mode (no version counters)"),
    ("a1111", "modules/processing.py", ["with torch.no_grad()"], "sampling under no_grad"),
]


def _find(tree: ast.Module, cls: str, method: str) -> ast.FunctionDef | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return item
    return None


def _params(fn: ast.FunctionDef) -> list[str]:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return names


def _writes_first_argument(fn: ast.FunctionDef) -> bool:
    params = [a.arg for a in fn.args.args][1:2]
    for node in ast.walk(fn):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in params:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("StreamBlockInPlace",):
            return True
    return False


def _standin_in_place(fn: ast.FunctionDef) -> bool:
    """A stand-in block writes in place when it says so (``in_place=True``) or does ``x += ...``."""
    for node in ast.walk(fn):
        if isinstance(node, ast.keyword) and node.arg == "in_place" and isinstance(node.value, ast.Constant):
            return bool(node.value.value)
    return _writes_first_argument(fn)


def _parse(path: Path) -> tuple[ast.Module | None, list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, []
    return ast.parse(text), text.splitlines()


def _line(fn: ast.FunctionDef | None) -> str:
    return str(fn.lineno) if fn is not None else "-"


def conformance(roots: dict[str, Path]) -> tuple[list[str], bool]:
    rows = ["| frontend | upstream file:line | what | upstream | stand-in | ok |", "|---|---|---|---|---|---|"]
    ok_all = True

    def row(frontend, where, what, upstream, standin, ok):
        nonlocal ok_all
        ok_all &= ok
        rows.append(f"| {frontend} | `{where}` | {what} | {upstream} | {standin} | {'yes' if ok else '**NO**'} |")

    for frontend, file, cls, method, standin_file, standin_cls in SIGNATURES:
        if frontend not in roots:
            continue
        tree, _ = _parse(roots[frontend] / file)
        up = _find(tree, cls, method) if tree else None
        st_tree, _ = _parse(STANDINS / standin_file)
        st = _find(st_tree, standin_cls or cls, method) if st_tree else None
        if up is None:
            row(frontend, f"{file}", f"`{cls}.{method}`", "missing", "", False)
            continue
        up_p, st_p = _params(up), _params(st) if st else []
        # the stand-in must accept every upstream parameter name the frontend passes
        missing = [p for p in up_p if p.lstrip("*") not in {q.lstrip("*") for q in st_p}
                   and not any(q.startswith("**") for q in st_p)]
        named = [p for p in up_p if not p.startswith("*") and p in st_p]
        in_order = [p for p in st_p if p in named] == named  # positional calls land on the same names
        row(frontend, f"{file}:{up.lineno}", f"`{cls}.{method}` parameters", ", ".join(up_p),
            ", ".join(st_p) if st else "missing", st is not None and not missing and in_order)
    for frontend, file, cls, method, standin_file in IN_PLACE:
        if frontend not in roots:
            continue
        tree, _ = _parse(roots[frontend] / file)
        up = _find(tree, cls, method) if tree else None
        st_tree, _ = _parse(STANDINS / standin_file)
        st = _find(st_tree, cls, method) if st_tree else None
        if up is None or st is None:
            row(frontend, file, f"`{cls}.{method}` writes its input in place", "missing" if up is None else "",
                "missing" if st is None else "", False)
            continue
        a, b = _writes_first_argument(up), _standin_in_place(st)
        row(frontend, f"{file}:{up.lineno}", f"`{cls}.{method}` writes its input in place", "yes" if a else "no",
            "yes" if b else "no", a == b)
    for frontend, file, needles, what in CONTRACTS:
        if frontend not in roots:
            continue
        _, lines = _parse(roots[frontend] / file) if file.endswith(".py") else (None, [])
        hits = [i + 1 for i, line in enumerate(lines) if all(n in line for n in needles)]
        row(frontend, f"{file}:{hits[0] if hits else '-'}", what, "found" if hits else "not found", "relied on", bool(hits))
    return rows, ok_all


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"


# --- run ------------------------------------------------------------------------------------

RUNNER = r'''
import json, sys, types, importlib.util
import torch
ROOT, STANDINS, TESTS, FRONTEND, UPSTREAM = sys.argv[1:6]
sys.path[:0] = [STANDINS, STANDINS + "/webui", TESTS]
if FRONTEND in ("forge", "neo"):
    sys.path.insert(3, UPSTREAM)  # the checkout's backend package
    sys.argv = ["webui", "--always-cpu" if FRONTEND == "forge" else "--cpu"]  # their arg parsers pick the device
    import modules  # the WebUI side is the stand-ins'; modules they lack (devices) come from the checkout
    modules.__path__.append(UPSTREAM + "/modules")
else:
    stub = types.ModuleType("modules.sd_hijack")  # other_impls imports it for the CLIP embeddings only
    stub.TextualInversionEmbeddings = None
    sys.modules["modules.sd_hijack"] = stub
    import modules.models.sd3  # noqa: F401 - the stand-in package the upstream files are put under
    for name in ("other_impls", "mmdit"):
        spec = importlib.util.spec_from_file_location(f"modules.models.sd3.{name}", f"{UPSTREAM}/modules/models/sd3/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
import webui_harness as H
from webui_reference import HeadReference, ReferenceHyCa
from hyca import Profile

def init(model, seed=0, std=0.08):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.ndim > 1 else std / 2))
    return model.eval()

def kinds():
    text = {"c_crossattn": (5, 16)}
    if FRONTEND == "forge":
        from backend.nn.flux import IntegratedFluxTransformer2DModel as Flux
        from backend.nn.chroma import IntegratedChromaTransformer2DModel as Chroma
        from backend.nn.mmditx import MMDiTX
        flux = dict(in_channels=4, vec_in_dim=12, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
                    depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True)
        return {
            "forge_flux": H.ModelKind("forge", lambda: init(Flux(**flux, guidance_embed=True)), (4, 8, 8), {**text, "y": (12,), "guidance": ()}),
            "forge_chroma": H.ModelKind("forge", lambda: init(Chroma(**flux, guidance_out_dim=32, guidance_hidden_dim=16, guidance_n_layers=2)), (4, 8, 8), text),
            "forge_mmditx": H.ModelKind("forge", lambda: init(MMDiTX(input_size=None, patch_size=2, in_channels=16, depth=2, adm_in_channels=12, pos_embed_max_size=8, num_patches=64,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}})), (16, 8, 8), {**text, "y": (12,)}, 1000.0),  # out_channels is hard-coded 16 upstream
        }
    if FRONTEND == "neo":
        from backend.nn.flux import IntegratedFluxTransformer2DModel as Flux
        from backend.nn.qwen import QwenImageTransformer2DModel as Qwen
        from backend.nn.wan import WanModel
        from backend.nn.lumina import NextDiT
        return {
            "neo_flux": H.ModelKind("neo", lambda: init(Flux(in_channels=4, out_channels=4, vec_in_dim=12, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2,
                depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)), (4, 8, 8),
                {**text, "y": (12,), "guidance": ()}, 1000.0),
            "neo_qwen": H.ModelKind("neo", lambda: init(Qwen(patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=16, axes_dims_rope=(4, 6, 6))), (16, 1, 8, 8), text, 1000.0),
            "neo_wan": H.ModelKind("neo", lambda: init(WanModel(in_dim=4, dim=32, ffn_dim=64, text_dim=16, out_dim=4, num_heads=2, num_layers=3)), (4, 1, 8, 8), text, 1000.0),
            "neo_lumina": H.ModelKind("neo", lambda: init(NextDiT(patch_size=2, in_channels=4, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                multiple_of=16, ffn_dim_multiplier=2.0, cap_feat_dim=16, axes_dims=(4, 6, 6), axes_lens=(1, 64, 64))), (4, 8, 8), text),
        }
    from modules.models.sd3.mmdit import MMDiT
    return {"a1111_sd3": H.ModelKind("a1111", lambda: init(MMDiT(input_size=None, patch_size=2, in_channels=4, depth=2, adm_in_channels=12, pos_embed_max_size=8,
        num_patches=64, context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}})), (4, 8, 8), {**text, "y": (12,)}, 1000.0)}

def rel(a, b):
    return float((a - b).norm() / b.norm())

class NoReference:
    def start_pass(self, schedule):
        pass

H.OVERRIDES.update(kinds())
script_module = H.load_script()
results = []
for kind, spec in H.OVERRIDES.items():
    row = {"kind": kind}
    try:
        model = spec.factory()
        from hyca.adapters.webui.fingerprint import fingerprint
        from hyca.adapters.webui.registry import recognise
        adapter = recognise(model)
        row["adapter"] = adapter.name if adapter else None
        fp = fingerprint(model, adapter)
        blocks, dim = sum(fp["blocks"].values()), fp["hidden_size"]
        script = script_module.HyCaScript()
        def run(args, scr=None, install=None, **kw):
            p = H.Processing(kind, model, **kw)
            if install is not None:
                install(p)
            return H.generate(p, scr or script, args), p
        off = [False, 3, 2, True, True, "FORA (reuse)", "", True, "model", False]
        unpatched, _ = run([], H.ReferenceScript(NoReference()), steps=10)
        plain, _ = run(off, steps=10)
        row["disabled_bit_identical"] = bool(torch.equal(plain.images[0], unpatched.images[0]))
        row["finite"] = bool(torch.isfinite(plain.images[0]).all())
        for label, solver in (("fora", "reuse"), ("taylor2", "taylor-2")):
            ref = ReferenceHyCa(model, kind, Profile.uniform(solver, blocks, dim).dim_solvers(), 3, 2, 1, spec.timestep_multiplier)
            with ref:
                want, _ = run([], H.ReferenceScript(ref), steps=10)
            profile = "FORA (reuse)" if solver == "reuse" else "TaylorSeer (taylor-2)"
            got, p = run([True, 3, 2, True, True, profile, "", True, "model", False], steps=10)
            row[f"{label}_rel_error"] = rel(got.images[0], want.images[0])
            row[f"{label}_vs_uncached"] = rel(got.images[0], plain.images[0])
            row[f"{label}_steps"] = p.extra_generation_params.get("HyCa steps")
            row["reference_computed_steps"] = ref.computed_steps
        if kind == "forge_mmditx":  # Forge's skip list leaves block 0 out: the forecast must not depend on it
            def skip0(p):
                p.sd_model.forge_objects_original.unet.model_options["transformer_options"]["skip_layers"] = [0]
            ref = ReferenceHyCa(model, kind, Profile.uniform("taylor-2", blocks, dim).dim_solvers(), 3, 2, 1, spec.timestep_multiplier)
            with ref:
                want, _ = run([], H.ReferenceScript(ref), install=skip0, steps=10)
            got, _ = run([True, 3, 2, True, True, "TaylorSeer (taylor-2)", "", True, "model", False], install=skip0, steps=10)
            skipped_plain, _ = run(off, install=skip0, steps=10)
            row["skip0_rel_error"] = rel(got.images[0], want.images[0])
            row["skip0_vs_uncached"] = rel(got.images[0], skipped_plain.images[0])
        import os
        os.environ["HYCA_HUB_REPO"] = "none"
        head = adapter.head_module(model)  # the output head: an output-head profile file, against HeadReference
        row["head"] = adapter.head if head is not None else None
        if head is not None:
            from hyca.profiles.io import save_profile
            os.environ["HYCA_PROFILES"] = os.getcwd()
            out_profile = Profile.uniform("taylor-2", 1, dim)
            out_profile.metadata["target"] = "output"
            save_profile(out_profile, "head.safetensors", fp)
            ref = HeadReference(model, head, out_profile.dim_solvers(), 3, 2, 1, spec.timestep_multiplier)
            with ref:
                want, _ = run([], H.ReferenceScript(ref), steps=10)
            got, p = run([True, 3, 2, True, True, "head.safetensors", "", True, "model", False], steps=10)
            row["head_rel_error"] = rel(got.images[0], want.images[0])
            row["head_vs_uncached"] = rel(got.images[0], plain.images[0])
            row["head_steps"] = p.extra_generation_params.get("HyCa steps")
            del os.environ["HYCA_PROFILES"]
        auto = [True, 3, 2, True, True, "automatic", "", True, "model", False]
        first, p1 = run(auto, steps=10)
        second, p2 = run(auto, steps=10)
        row["probe_first_generation_uncached"] = bool(torch.equal(first.images[0], plain.images[0])) and "HyCa steps" not in p1.extra_generation_params
        row["probed_then_cached_steps"] = p2.extra_generation_params.get("HyCa steps")
        from hyca.adapters.webui.controller import CONTROLLER
        probed = [c.profile for key, c in CONTROLLER.book._known.items() if key[1] == "automatic" and c.profile is not None]
        if probed:
            output = probed[-1].metadata.get("target") == "output"
            ref = (HeadReference(model, head, probed[-1].dim_solvers(), 3, 2, 1, spec.timestep_multiplier) if output else
                   ReferenceHyCa(model, kind, probed[-1].dim_solvers(), 3, 2, 1, spec.timestep_multiplier))
            with ref:
                want, _ = run([], H.ReferenceScript(ref), steps=10)
            row["probed_rel_error"] = rel(second.images[0], want.images[0])
            row["probed_solvers"] = probed[-1].solver_names()
            # a shorter first interval (start2) is a schedule the references here do not follow
            row["probed_target"] = probed[-1].metadata.get("target", "residual")
            row["probed_first_interval"] = probed[-1].metadata.get("first_interval")
        CONTROLLER.book.clear()
    except Exception as error:  # noqa: BLE001 - reported per model
        import traceback
        row["error"] = f"{type(error).__name__}: {error}"
        row["trace"] = traceback.format_exc()[-1500:]
    results.append(row)
print("RESULTS " + json.dumps(results))
'''


def run(roots: dict[str, Path], python: str) -> list[dict]:
    rows = []
    for frontend, root in roots.items():
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, HYCA_CACHE=cache, HF_HUB_OFFLINE="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            env.pop("HYCA_PROFILES", None)
            done = subprocess.run([python, "-c", RUNNER, str(ROOT), str(STANDINS), str(TESTS), frontend, str(root)],
                                  cwd=cache, env=env, capture_output=True, text=True, timeout=1800)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
        if line is None:
            rows.append({"kind": frontend, "error": (done.stderr or done.stdout)[-3000:]})
            continue
        rows += json.loads(line[8:])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("conformance", "run"))
    parser.add_argument("--forge", type=Path, help="a checkout of lllyasviel/stable-diffusion-webui-forge")
    parser.add_argument("--neo", type=Path, help="a checkout of Forge Neo (Haoming02/sd-webui-forge-classic, neo)")
    parser.add_argument("--a1111", type=Path, help="a checkout of AUTOMATIC1111/stable-diffusion-webui")
    parser.add_argument("--python", default=sys.executable, help="interpreter for `run` (needs the checkouts' deps)")
    args = parser.parse_args(argv)
    roots = {k: getattr(args, k).resolve() for k in ("forge", "neo", "a1111") if getattr(args, k) is not None}
    if not roots:
        parser.error("give at least one of --forge, --neo, --a1111")
    for frontend, root in roots.items():
        print(f"{frontend}: {root} @ {git_commit(root)}")
    if args.command == "conformance":
        rows, ok = conformance(roots)
        print("\n".join(rows))
        return 0 if ok else 1
    results = run(roots, args.python)
    print(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
