"""Drives the WebUI extension through the stand-ins in tests/standins.

``standins(flavour)`` puts the stand-in roots on ``sys.path`` for the duration of a test
module and removes them and every module imported from them afterwards, so the names
``backend``, ``modules`` and ``launch`` never shadow anything for other tests.

``generate(p, script, args)`` is a reduced stand-in of ``modules/processing.py``
``process_images`` with the hook order of the real one: Forge / Neo
(``process`` -> per batch: ``process_batch``, forge_objects reset,
``process_before_every_sampling``, sampling, hires: ``process_before_every_sampling``
either side of a second reset, ``post_sample``, ``postprocess_batch``, infotext) ->
``postprocess``; A1111 (``process_batch`` before sampling, ``before_hr`` before the hires
pass, the model called directly with cond and uncond in one batch after
``on_cfg_denoiser``). Samplers are k-diffusion's Euler, Heun (two model calls per step,
the second at the next sigma) and DPM2 (the second at a midpoint sigma); an interrupt
raises ``InterruptedException`` from the step callback, which the sampler catches.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch.nn import functional as F

from hyca import Profile
from webui_reference import ReferenceHyCa

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STANDINS = TESTS / "standins"
STANDIN_PACKAGES = ("backend", "modules", "launch", "networks", "standin_layers", "standin_mmdit", "standin_forge_runtime")


def _is_standin_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in STANDIN_PACKAGES) or name.startswith("hyca_webui_script")


@contextlib.contextmanager
def standins(flavour: str):
    """``flavour``: "forge" or "neo" (which ``backend`` package); ``modules`` and ``launch``
    (the WebUI side, A1111's SD3 included) are always there."""
    clash = [n for n in sys.modules if _is_standin_module(n)]
    if clash:
        raise RuntimeError(f"stand-in names already imported from elsewhere: {clash}")
    roots = [str(STANDINS), str(STANDINS / "webui"), str(STANDINS / flavour)]
    sys.path[:0] = roots
    try:
        yield
    finally:
        for root in roots:
            sys.path.remove(root)
        for name in [n for n in sys.modules if _is_standin_module(n)]:
            del sys.modules[name]


def load_script(fresh: bool = True):
    """Import scripts/hyca.py as the WebUI does (by file path) and return the module.
    ``fresh``: start from a clean controller, as a newly started WebUI would."""
    if fresh:
        from hyca.adapters.webui.controller import CONTROLLER

        CONTROLLER.reset()
        CONTROLLER.book.clear()  # profiles resolved by an earlier test's script
        CONTROLLER._said.clear()  # once-per-session console lines: a new WebUI session
    name = "hyca_webui_script"
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "hyca.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- models ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelKind:
    frontend: str                  # "forge" / "neo" (sampled through the unet patcher) or "a1111"
    factory: Callable[[], torch.nn.Module]
    latent: tuple[int, ...]        # per-sample latent shape
    conds: dict[str, tuple]        # per-sample shapes of the extra conditioning
    timestep_multiplier: float = 1.0


#: Model kinds added or replaced by a caller (tools/webui_upstream.py runs the frontends'
#: own model classes through this harness under the stand-in kinds' names).
OVERRIDES: dict[str, ModelKind] = {}


def model_kinds() -> dict[str, ModelKind]:
    """Resolved lazily: the stand-in modules exist only inside ``standins(...)``."""
    return {**_standin_kinds(), **OVERRIDES}


def _standin_kinds() -> dict[str, ModelKind]:

    def make(module: str, cls: str) -> Callable[[], torch.nn.Module]:
        return lambda: getattr(importlib.import_module(module), cls)()

    text = {"c_crossattn": (5, 16)}
    flux = {**text, "y": (12,), "guidance": ()}
    return {
        "forge_flux": ModelKind("forge", make("backend.nn.flux", "IntegratedFluxTransformer2DModel"), (4, 8, 8), flux),
        "forge_chroma": ModelKind("forge", make("backend.nn.chroma", "IntegratedChromaTransformer2DModel"), (4, 8, 8), text),
        "forge_mmditx": ModelKind("forge", make("backend.nn.mmditx", "MMDiTX"), (4, 8, 8), {**text, "y": (12,)}, 1000.0),
        "neo_flux": ModelKind("neo", make("backend.nn.flux", "IntegratedFluxTransformer2DModel"), (4, 8, 8), flux),
        "neo_qwen": ModelKind("neo", make("backend.nn.qwen", "QwenImageTransformer2DModel"), (16, 1, 8, 8), text),
        "neo_wan": ModelKind("neo", make("backend.nn.wan", "WanModel"), (4, 1, 8, 8), text, 1000.0),
        "neo_lumina": ModelKind("neo", make("backend.nn.lumina", "NextDiT"), (4, 8, 8), text),
        "a1111_sd3": ModelKind("a1111", make("modules.models.sd3.mmdit", "MMDiT"), (4, 8, 8), {**text, "y": (12,)}, 1000.0),
    }


def flavour_of(kind: str) -> str:
    return "neo" if kind.startswith("neo") else "forge"


# --- processing stand-in -----------------------------------------------------------------

def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 1.0 / steps, steps)
    return torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1)])


class Sampler:
    """``get_sigmas(p, steps)`` as KDiffusionSampler has it; the schedule is a shifted flow one
    (the shift the model's sampling carries: ``p.shift``)."""

    def __init__(self, name: str):
        self.name = name

    def get_sigmas(self, p, steps):
        return flow_sigmas(steps, p.shift)


@dataclass
class Processing:
    """The attributes of ``StableDiffusionProcessing`` the extension and the loop read."""

    kind: str
    model: torch.nn.Module
    steps: int = 10
    cfg_scale: float = 3.0
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "euler"
    split: bool = False              # Forge: cond and uncond in separate calls
    img2img: bool = False
    denoising_strength: float = 0.6  # img2img strength, or the hires pass's in txt2img (as in the WebUI)
    enable_hr: bool = False
    hr_second_pass_steps: int = 0
    lora_hash: str = ""              # a LoRA file name; "" = no LoRA (see lora_state)
    interrupt_at: int | None = None  # model call after which the user presses Interrupt
    skip_at: int | None = None       # model call (counted over the generation) after which the user presses Skip
    shift: float = 3.0               # the model sampling's flow shift (FLUX's), which sets the sigmas
    extra_generation_params: dict = field(default_factory=dict)
    is_hr_pass: bool = False
    iteration: int = 0

    def __post_init__(self):
        spec = model_kinds()[self.kind]
        self.spec = spec
        if spec.frontend == "a1111":
            self.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=self.model))
        else:
            from standin_forge_runtime import KModel, UnetPatcher

            original = SimpleNamespace(unet=UnetPatcher(KModel(self.model, spec.timestep_multiplier)))
            self.sd_model = SimpleNamespace(forge_objects=copy.copy(original), forge_objects_original=original,
                                            current_lora_hash=str([]))
        if self.img2img:
            self.init_images = ["<image>"]
        self.calls = 0

    def conditioning(self, seed: int) -> tuple[dict, dict]:
        g = torch.Generator().manual_seed(seed)
        make = lambda: {k: torch.randn(self.batch_size, *shape, generator=g) if shape else  # noqa: E731
                        torch.full((self.batch_size,), 3.5) for k, shape in self.spec.conds.items()}
        return make(), make()


def lora_state(p: Processing) -> None:
    """What activating the prompt's LoRA set leaves behind before ``process_batch``: Forge /
    Neo ``sd_model.current_lora_hash = str(compiled_lora_targets)`` (``str([])`` for none,
    sd_forge_lora/networks.py ``load_networks``); A1111 ``networks.loaded_networks``
    (extensions-builtin/Lora/networks.py ``load_networks``)."""
    if p.spec.frontend == "a1111":
        import networks

        networks.load_networks([p.lora_hash] if p.lora_hash else [])
    else:
        targets = [[f"/models/Lora/{p.lora_hash}.safetensors", 1.0, 1.0, False]] if p.lora_hash else []
        p.sd_model.current_lora_hash = str(targets)


def _denoiser(p: Processing, cond: dict, uncond: dict) -> Callable:
    from modules import script_callbacks, shared

    def denoise(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if p.interrupt_at is not None and p.calls >= p.interrupt_at:
            shared.state.interrupted = True
        if p.skip_at is not None and p.calls == p.skip_at:
            shared.state.skipped = True
        sigma_b = torch.full((x.shape[0],), float(sigma))
        p.calls += 1
        if p.spec.frontend != "a1111":
            from standin_forge_runtime import sampling_function

            unet = p.sd_model.forge_objects.unet
            return sampling_function(unet, x, sigma_b, uncond, cond, p.cfg_scale, unet.model_options, split=p.split)
        script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(
            x, None, sigma_b, step, p.steps, cond, uncond))
        model = p.sd_model.model.diffusion_model
        x_in, s_in = torch.cat([x, x]), torch.cat([sigma_b, sigma_b])
        v = model(x_in, s_in * p.spec.timestep_multiplier, y=torch.cat([cond["y"], uncond["y"]]),
                  context=torch.cat([cond["c_crossattn"], uncond["c_crossattn"]])).float()
        denoised = x_in - v * s_in.reshape(-1, 1, 1, 1)
        c, u = denoised.chunk(2)
        return u + (c - u) * p.cfg_scale

    return denoise


def sample(p: Processing, x: torch.Tensor, sigmas: torch.Tensor, denoise: Callable) -> torch.Tensor:
    """k-diffusion samplers over ``sigmas``; an interrupt returns the latent so far."""
    from modules import sd_samplers_common, shared

    def callback(i):
        if shared.state.interrupted or shared.state.skipped:  # sd_samplers_cfg_denoiser.py checks both
            raise sd_samplers_common.InterruptedException

    try:
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            d = (x - denoise(x, s, i)) / s
            if p.sampler_name == "euler" or s_next == 0:
                x = x + d * (s_next - s)
            elif p.sampler_name == "heun":
                x2 = x + d * (s_next - s)
                d2 = (x2 - denoise(x2, s_next, i)) / s_next
                x = x + (d + d2) / 2 * (s_next - s)
            elif p.sampler_name == "dpm2":
                s_mid = math.exp((math.log(s) + math.log(s_next)) / 2)
                x2 = x + d * (s_mid - s)
                d2 = (x2 - denoise(x2, s_mid, i)) / s_mid
                x = x + d2 * (s_next - s)
            elif p.sampler_name == "Euler a":  # k-diffusion sample_euler_ancestral, eta = s_noise = 1 (the
                # WebUIs' "Euler a"; crowsonkb/k-diffusion k_diffusion/sampling.py get_ancestral_step at 21d12c9)
                s_up = min(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
                s_down = (s_next ** 2 - s_up ** 2) ** 0.5
                x = x + d * (s_down - s)
                x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + i)) * s_up
            elif p.sampler_name == "LCM":  # A1111 modules/sd_samplers_lcm.py sample_lcm (at 82a973c): the
                # denoised sample plus fresh noise at the next sigma, the whole noise drawn anew each step
                x = denoise(x, s, i) + torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + i)) * s_next
            callback(i)
    except sd_samplers_common.InterruptedException:
        pass
    return x


def _pass(p: Processing, x0: torch.Tensor | None, noise: torch.Tensor, steps: int, denoise: Callable) -> torch.Tensor:
    from modules import sd_samplers_common

    if x0 is None:
        sigmas = p.sampler.get_sigmas(p, steps)
        return sample(p, noise * sigmas[0], sigmas, denoise)
    total, t_enc = sd_samplers_common.setup_img2img_steps(p, steps if p.is_hr_pass else None)
    sigmas = p.sampler.get_sigmas(p, total)[total - t_enc - 1:]
    return sample(p, x0 + noise * sigmas[0], sigmas, denoise)


def generate(p: Processing, script, args: list) -> SimpleNamespace:
    """One generation; returns the final latents and infotext lines of every batch. Forge
    and Forge Neo sample under ``torch.inference_mode()`` (their ``modules/processing.py``
    ``process_images_inner``), so tensors there carry no version counter; A1111 under
    ``torch.no_grad()``."""
    forge = p.spec.frontend != "a1111"
    with torch.inference_mode() if forge else torch.no_grad():
        return _generate(p, script, args, forge)


def _generate(p: Processing, script, args: list, forge: bool) -> SimpleNamespace:
    from modules import shared
    from modules.infotext_utils import parameters_line

    shared.state.interrupted = shared.state.skipped = False
    latents, infotexts = [], []
    script.process(p, *args)
    for n in range(p.n_iter):
        p.iteration, p.is_hr_pass = n, False
        shared.state.skipped = False  # modules/processing.py process_images_inner: Skip ends one batch
        p.sampler = Sampler(p.sampler_name) if forge else None
        lora_state(p)  # extra_networks.activate, just before process_batch
        script.process_batch(p, *args, batch_number=n, prompts=[], seeds=[], subseeds=[])
        p.sampler = Sampler(p.sampler_name)  # A1111 creates it in sample(), after process_batch
        g = torch.Generator().manual_seed(100 + n)
        noise = torch.randn(p.batch_size, *p.spec.latent, generator=g)
        init = torch.randn(p.batch_size, *p.spec.latent, generator=g) if p.img2img else None
        cond, uncond = p.conditioning(200 + n)
        denoise = _denoiser(p, cond, uncond)
        if forge:
            p.sd_model.forge_objects = copy.copy(p.sd_model.forge_objects_original)
            script.process_before_every_sampling(p, *args, x=noise, noise=noise, c=cond, uc=uncond)
        x = _pass(p, init, noise, p.steps, denoise)
        if p.enable_hr and not shared.state.interrupted:
            p.is_hr_pass = True
            if forge:
                script.process_before_every_sampling(p, *args)
                p.sd_model.forge_objects = copy.copy(p.sd_model.forge_objects_original)
                script.process_before_every_sampling(p, *args)
            else:
                script.before_hr(p, *args)
            dims = x.shape[-2:]
            up = F.interpolate(x.reshape(-1, 1, *dims), scale_factor=2, mode="nearest").reshape(*x.shape[:-2], 2 * dims[0], 2 * dims[1])
            hr_noise = torch.randn(up.shape, generator=g)
            x = _pass(p, up, hr_noise, p.hr_second_pass_steps or p.steps, denoise)
            p.is_hr_pass = False
        script.post_sample(p, SimpleNamespace(samples=x), *args)
        script.postprocess_batch(p, *args, images=x, batch_number=n)
        latents.append(x)
        _check_result_keys(p.extra_generation_params)
        infotexts.append(parameters_line({"Steps": p.steps, **p.extra_generation_params}))
    processed = SimpleNamespace(images=latents, infotexts=infotexts)
    script.postprocess(p, processed, *args)
    return processed


def _check_result_keys(params: dict) -> None:
    """Every HyCa entry of the infotext is a setting (read back on paste) or one of the
    results a new batch clears: an entry missing from ``RESULT_KEYS`` would carry over into
    the next batch's infotext."""
    from hyca.adapters.webui.settings import ENABLED_KEY, INFOTEXT_KEYS, RESULT_KEYS

    known = {ENABLED_KEY, *INFOTEXT_KEYS.values(), *RESULT_KEYS}
    unknown = sorted(k for k in params if k.startswith("HyCa") and k not in known)
    assert not unknown, f"infotext entries neither settings nor in RESULT_KEYS: {unknown}"


def pass_schedule(p: Processing) -> list[float]:
    """The sigmas a pass walks, written out from the WebUI's rules (not read from the
    extension): txt2img the full schedule; img2img ``t_enc = int(strength * steps)`` steps
    from the end; the hires pass ``steps`` steps of a schedule stretched to
    ``int(steps / strength)``."""
    if p.is_hr_pass:
        steps = p.hr_second_pass_steps or p.steps
        total, t_enc = int(steps / min(p.denoising_strength, 0.999)), steps - 1
    elif p.img2img:
        total, t_enc = p.steps, int(min(p.denoising_strength, 0.999) * p.steps)
    else:
        return flow_sigmas(p.steps, p.shift).tolist()
    return flow_sigmas(total, p.shift)[total - t_enc - 1:].tolist()


class ReferenceScript:
    """Plays the script's part for a reference run: starts each pass of the reference."""

    def __init__(self, reference):
        self.reference = reference

    def _start(self, p, *args, **kwargs):
        self.reference.start_pass(pass_schedule(p))

    def process_before_every_sampling(self, p, *args, **kwargs):
        if p.spec.frontend != "a1111":
            self._start(p)

    def process_batch(self, p, *args, **kwargs):
        if p.spec.frontend == "a1111":
            self._start(p)

    def before_hr(self, p, *args):
        self._start(p)

    def process(self, p, *args, **kwargs):
        pass

    post_sample = postprocess_batch = postprocess = process


# --- what the WebUI tests share: script arguments, one frontend's stand-ins, a clean-up check ---

UNIFORM = "TaylorSeer (taylor-2)"


def args(enabled=True, interval=3, warmup=2, compute_last=True, hires=True, profile=UNIFORM, hub_repo="", lora_reuse=True,
         cache_dtype="model", guard=False, speedup=0.0):
    """Script arguments; the guard is off by default here because the references these
    tests compare with are the paper's engine (the guard has tests of its own)."""
    return [enabled, interval, warmup, compute_last, hires, profile, hub_repo, lora_reuse, cache_dtype, guard, speedup]


class Frontend:
    """The stand-ins of one frontend, imported for one test, removed afterwards."""

    def __init__(self, kind):
        self.kind = kind
        self._context = standins(flavour_of(kind))

    def __enter__(self):
        self._context.__enter__()
        self.script_module = load_script()
        self.script = self.script_module.HyCaScript()
        self.spec = model_kinds()[self.kind]
        self.model = self.spec.factory()
        return self

    def __exit__(self, *exc):
        from hyca.adapters.webui.controller import CONTROLLER

        CONTROLLER.reset()
        self._context.__exit__(*exc)

    def run(self, script_args=None, script=None, **settings):
        p = Processing(self.kind, self.model, **settings)
        with torch.no_grad():
            return generate(p, script or self.script, script_args if script_args is not None else args(False)), p

    def reference(self, dim_solvers, interval, warmup, branches=1, compute_last=True, **settings):
        reference = ReferenceHyCa(self.model, self.kind, dim_solvers, interval, warmup, branches,
                                  self.spec.timestep_multiplier, compute_last)
        with reference:
            out, _ = self.run([], ReferenceScript(reference), **settings)
        return out, reference

    def uniform_solvers(self):
        from hyca.adapters.webui.fingerprint import fingerprint
        from hyca.adapters.webui.registry import recognise

        fp = fingerprint(self.model, recognise(self.model))
        return Profile.uniform("taylor-2", sum(fp["blocks"].values()), fp["hidden_size"]).dim_solvers()


def no_hyca_left(model):
    from hyca.adapters.webui import gates
    from hyca.adapters.webui.controller import CONTROLLER

    return CONTROLLER.session is None and not any(gates.is_gated(m) for m in model.modules())
