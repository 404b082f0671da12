"""What each control of the app does, with per-session state.

Every handler takes plain values (what the Gradio components hold) plus the session's
state dict, and returns plain values; ``app.py`` only lays the components out and wires
them here. A session's state (a ``gr.State``, one per browser tab or API client) holds
its profiles per model: ``settings`` (found or probed per run settings: steps, guidance,
shift, N, warm-up, size), ``loaded`` (a file or Hub profile the user chose, used until
the next probe), ``current`` (shown and offered for download), ``previous`` (for the
ARI), ``base`` (without a LoRA) and ``lora`` (per LoRA and settings, reuse switch off). Models are shared between sessions; every use of one
happens under its lock, so HyCa hooks set by one session never touch another's run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..adapters.diffusers.fingerprint import fingerprint as diffusers_fingerprint
from ..engine.cache import UNGUARDED
from ..profiles.compare import compare_profiles
from ..profiles.hub import DEFAULT_HUB_REPO, HubError, hub_offline, pull_profile, push_profile
from ..profiles.io import ProfileError, load_profile
from ..profiles.names import profile_filename
from ..profiles.profile import Profile
from . import compare, profile_view
from .metrics import describe_psnr
from .models import REFERENCE, STORE, LoadedModel, ModelChoice, ModelError, check, choice, custom_choice, size_multiple, \
    size_problem
from .session_profiles import (IN_APP_REMEDY, Progress, fits, probe_locked, profile_for_run, set_current, settings_key,
                               session_slot)

class AppError(RuntimeError):
    """Something the user can fix; the app shows the message (``gr.Error``)."""


USER_ERRORS = (AppError, ModelError, HubError, ProfileError, ValueError, KeyError)


def chosen_model(model_key: str, custom: str | None) -> ModelChoice:
    """The menu entry, or the folder / Hub id typed in the custom box when it is filled."""
    custom = (custom or "").strip()
    return custom_choice(custom) if custom else choice(model_key or REFERENCE)


def model_status(model_key: str, custom: str | None) -> str:
    """The sentence under the model menu: ready, or why not."""
    try:
        verdict = check(chosen_model(model_key, custom))
    except USER_ERRORS as err:  # a KeyError's str() is the quoted key: its message is args[0]
        return f"**Not available:** {err.args[0] if isinstance(err, KeyError) and err.args else err}"
    return ("**Ready:** " if verdict.ok else "**Not available:** ") + verdict.message


# --- session state -------------------------------------------------------------------------

def new_state() -> dict[str, Any]:
    return {"profiles": {}, "dir": None}


# --- running under the model's lock ----------------------------------------------------------

def load_model(c: ModelChoice, progress: Progress | None) -> LoadedModel:
    if progress is not None:
        progress(0.0, f"loading {c.label}")
    try:
        return STORE.get(c)
    except ModelError:
        raise
    except Exception as err:  # any failure while loading is reported, never a crash
        raise ModelError(f"could not load {c.label}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def holding(model: LoadedModel, progress: Progress | None) -> Iterator[None]:
    """The model's lock; says so when another session's run is being waited for."""
    if not model.lock.acquire(blocking=False):
        if progress is not None:
            progress(0.0, "waiting for another session's run on this model")
        model.lock.acquire()
    try:
        yield
    finally:
        model.lock.release()


@contextlib.contextmanager
def out_of_memory_explained(model: LoadedModel) -> Iterator[None]:
    """A run that exhausts GPU memory becomes a message (and frees what it can), not a crash."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise AppError(f"{model.choice.label} ran out of GPU memory during this run; try fewer steps or a "
                       "machine with more GPU memory (the app uses model CPU offload only when the weights "
                       "alone do not fit)") from None


# --- the side-by-side tab -------------------------------------------------------------------

@dataclass
class GenerateResult:
    full: np.ndarray
    fast: np.ndarray
    report: str
    numbers: dict[str, Any]


def _whole(name: str, value: Any, smallest: int = 1) -> int:
    """A whole number from a Gradio box (an int, a float like 28.0, or text), else an
    :class:`AppError` naming the box; an empty box is an error too."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AppError(f"{name} is empty: enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise AppError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise AppError(f"{name} must be a whole number, got {value!r}")
    if number < smallest:
        raise AppError(f"{name} must be at least {smallest}, got {int(number)}")
    return int(number)


def _seed(seed: Any) -> int:
    """A seed torch.Generator takes: an integer from 0 to 2**63 - 1 (an empty box is 0)."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return 0
    try:
        value = int(seed) if isinstance(seed, int) else _whole("the seed", seed, smallest=0)
    except OverflowError:
        raise AppError(f"the seed must be a whole number, got {seed!r}") from None
    if not 0 <= value < 2 ** 63:
        raise AppError(f"the seed must be between 0 and 2**63 - 1, got {value}")
    return value


def _settings(model: LoadedModel, prompt: str, seed: Any, steps: Any, method: str, interval: Any, warmup: Any,
              lora: str) -> compare.Settings:
    if not (prompt or "").strip():
        raise AppError("enter a prompt")
    if method not in compare.METHODS:  # (the UI's radio offers these only; a direct call may not)
        raise AppError(f"method must be one of {', '.join(compare.METHODS)}, got {method!r}")
    steps, interval, warmup = _whole("steps", steps), _whole("N", interval), _whole("warm-up", warmup)
    height, width = model.size
    why = size_problem(height, width, size_multiple(model.pipe))
    if why is not None:
        raise AppError(why)
    return compare.Settings(prompt=prompt.strip(), seed=_seed(seed), steps=steps, height=height,
                            width=width, guidance=model.choice.guidance, method=method, interval=interval,
                            warmup=warmup, lora=lora or "none")


def app_notes(run: Any) -> list[str]:
    """The run's notes (a :class:`~hyca.engine.state.RunStats`) for the app's report: the
    off-settings note (:mod:`hyca.profiles.off_settings`) with what to do about it in the app."""
    off = None if run.off_settings is None else run.off_settings.describe()
    return [f"{n}. {IN_APP_REMEDY}" if n == off else n for n in run.notes]


def report_numbers(r: compare.SideBySide, s: compare.Settings, where: str, ari: float | None) -> dict[str, Any]:
    numbers = {
        "method": s.method, "interval": s.interval, "warmup": s.warmup, "lora": s.lora,
        "full_seconds": r.full_seconds, "fast_seconds": r.fast_seconds, "speedup": r.speedup,
        "full_flops": r.full_flops, "fast_flops": r.fast_flops, "flops_ratio": r.flops_ratio,
        "computed_steps": r.run.computed, "forecast_steps": r.run.forecast,
        "psnr": None if np.isinf(r.psnr) else r.psnr, "ssim": r.ssim, "profile": where,
        "guard": [d.describe() for d in r.run.switches], "notes": app_notes(r.run),
        "off_settings": None if r.run.off_settings is None else r.run.off_settings.short(),
    }
    if ari is not None:
        numbers["ari_vs_base"] = ari
    return numbers


def report_markdown(n: dict[str, Any]) -> str:
    psnr = describe_psnr(float("inf") if n["psnr"] is None else n["psnr"])
    lines = [
        f"| | full compute | {n['method']} (N={n['interval']}, warm-up {n['warmup']}) |",
        "|---|---|---|",
        f"| wall clock | {n['full_seconds']:.2f} s | {n['fast_seconds']:.2f} s |",
        f"| transformer FLOPs | {n['full_flops'] / 1e9:.3g} G | {n['fast_flops'] / 1e9:.3g} G |",
        f"| steps computed | {n['computed_steps'] + n['forecast_steps']} | {n['computed_steps']} "
        f"(+{n['forecast_steps']} forecast) |",
        "",
        (f"**{n['speedup']:.2f}x** faster" if n["speedup"] >= 1 else f"**{1 / n['speedup']:.2f}x** slower")
        + " (wall clock, both runs in this request) · "
        + (f"**{n['flops_ratio']:.2f}x** fewer transformer FLOPs (torch.utils.flop_counter) · " if n["forecast_steps"]
           else "no step forecast: the same transformer FLOPs · ")
        + f"PSNR **{psnr}** · SSIM **{n['ssim']:.4f}** (vs full compute)",
        "",
        f"Profile: {n['profile']}." + (f" Used away from its settings: {n['off_settings']}." if n.get("off_settings")
                                        else ""),
        "",
        ("Guard: off for this profile (its probe chose it without the guard at these settings)." if UNGUARDED in n["notes"]
         else "Guard: " + ("; ".join(n["guard"]) if n["guard"] else "no solver group switched") + " (it checks every "
         "computed step's forecasts and switches a group that forecast worse than a lower order twice in a row)."),
        *(f"\n**Note:** {note}" for note in n["notes"] if note != UNGUARDED),
    ]
    if "ari_vs_base" in n:
        lines.append(f"ARI of the LoRA profile vs the base profile: **{n['ari_vs_base']:.3f}** "
                     "(1 = same clusters; the paper reports > 0.8 between a model and its LoRA variants, which "
                     "is what makes reuse safe; where a profile gives every dimension one solver its clusters "
                     "change nothing it forecasts).")
    return "\n".join(lines)


def generate(state: dict[str, Any], model_key: str, custom: str | None, prompt: str, seed: Any, steps: Any,
             method: str, interval: Any, warmup: Any, lora: str, lora_reuse: bool,
             progress: Progress | None = None) -> GenerateResult:
    model = load_model(chosen_model(model_key, custom), progress)
    s = _settings(model, prompt, seed, steps, method, interval, warmup, lora)
    with holding(model, progress), out_of_memory_explained(model):
        profile, where, ari = profile_for_run(state, model, s, bool(lora_reuse), progress)
        result = compare.side_by_side(model, s, profile, progress)
    numbers = report_numbers(result, s, where, ari)
    return GenerateResult(compare.upscale(result.full), compare.upscale(result.fast), report_markdown(numbers),
                          numbers)


# --- the profile panel ------------------------------------------------------------------------

@dataclass
class ProfileView:
    picture: np.ndarray | None
    legend: str
    table: list[list[Any]]
    summary: str
    file: str | None


def view(state: dict[str, Any], model_key: str, custom: str | None, by: str = "cluster",
         message: str = "") -> ProfileView:
    """The current profile of the chosen model, as picture, table and summary."""
    slot = session_slot(state, chosen_model(model_key, custom).key)
    profile = slot["current"]
    if profile is None:
        return ProfileView(None, "", [], message or "No profile yet: run the probe, or load one.", None)
    text = profile_view.summary(profile) + (f"\n\n{message}" if message else "")
    return ProfileView(profile_view.cluster_image(profile, by), profile_view.legend(profile, by),
                       profile_view.solver_rows(profile), text, slot["file"])


def run_probe(state: dict[str, Any], model_key: str, custom: str | None, prompt: str, steps: Any, interval: Any,
              warmup: Any, clusters: Any, lora: str, progress: Progress | None = None) -> str:
    """Probe the chosen model (with ``lora`` active) and make the result current; returns a message."""
    c = chosen_model(model_key, custom)
    model = load_model(c, progress)
    s = _settings(model, prompt, 0, steps, "HyCa", interval, warmup, lora)
    with holding(model, progress), out_of_memory_explained(model):
        profile = probe_locked(model, s.prompt, s.steps, s.interval, s.warmup, _whole("clusters", clusters), s.lora, progress)
    profile.source = f"probed on the Profile tab with prompt {s.prompt!r}" + (
        f" and LoRA '{s.lora}'" if s.lora != "none" else "")
    slot = session_slot(state, c.key)
    base = slot["base"]
    if s.lora != "none":
        slot["lora"][(s.lora, settings_key(model, s))] = profile
    else:  # what HyCa uses at these settings from now on, in place of a loaded file
        slot["settings"][settings_key(model, s)], slot["loaded"] = profile, None
    set_current(state, model, profile, s.lora)
    message = f"Probed {c.label} with prompt {s.prompt!r}" + (f" and LoRA '{s.lora}'" if s.lora != "none" else "")
    if s.lora != "none" and base is not None and fits(base, model):
        try:
            message += f". ARI vs the profile without LoRA: {compare_profiles(base, profile).ari_overall:.3f}"
        except ProfileError as err:  # the probes chose different targets: the profile stands, the ARI does not
            message += f" (no ARI against the profile without LoRA: {err})"
    return message + "."


def describe_comparison(a: Profile, b: Profile, what: str) -> str:
    """The ARI line for two profiles; :class:`AppError` with the reason when they cannot be
    compared (another target or shape: the probe may choose a model-output profile for one
    prompt and an output-head one for another)."""
    try:
        cmp = compare_profiles(a, b)
    except ProfileError as error:
        raise AppError(f"the current profile and the {what} cannot be compared: {error}") from error
    per_block = ", ".join(f"{v:.2f}" for v in cmp.ari_per_block)
    single = [name for name, p in (("current", a), (what, b)) if len(set(p.solver_names())) == 1]
    caveat = (f" The {' and the '.join(single)} profile{'s give' if len(single) > 1 else ' gives'} every dimension "
              "one solver: its clusters change nothing it forecasts, so the ARI says nothing about it."
              if single else "")
    return (f"ARI current vs {what}: **{cmp.ari_overall:.3f}** (per block: {per_block}); the same solver for "
            f"{cmp.solver_agreement:.0%} of dimensions.{caveat}")


def ari_vs_previous(state: dict[str, Any], model_key: str, custom: str | None) -> str:
    slot = session_slot(state, chosen_model(model_key, custom).key)
    if slot["current"] is None or slot["previous"] is None:
        raise AppError("there is no earlier profile to compare with: probe twice (e.g. with and without a "
                       "LoRA, or another prompt) or load a file")
    return describe_comparison(slot["current"], slot["previous"], "previous profile")


def ari_vs_file(state: dict[str, Any], model_key: str, custom: str | None, path: str | None) -> str:
    slot = session_slot(state, chosen_model(model_key, custom).key)
    if not path:
        raise AppError("choose a profile file (.safetensors) to compare with")
    if slot["current"] is None:
        raise AppError("there is no current profile: run the probe or load one first")
    return describe_comparison(slot["current"], load_profile(path), Path(path).name)


def use_file(state: dict[str, Any], model_key: str, custom: str | None, path: str | None) -> str:
    """Load a profile file as the current profile (checked against the model): HyCa runs use
    it at every setting until the next probe on the Profile tab."""
    if not path:
        raise AppError("choose a profile file (.safetensors) first")
    c = chosen_model(model_key, custom)
    model = load_model(c, None)
    profile = load_profile(path, diffusers_fingerprint(model.transformer))
    session_slot(state, c.key)["loaded"] = profile
    set_current(state, model, profile)
    return f"Loaded {Path(path).name}."


def pull(state: dict[str, Any], model_key: str, custom: str | None, repo: str | None, filename: str | None,
         interval: Any, *, endpoint: str | None = None, token: str | bool | None = None,
         cache_dir: str | None = None) -> str:
    """Download a profile from the Hub (default name: the one ``hyca probe`` gives this model).
    ``endpoint`` / ``token`` / ``cache_dir``: huggingface_hub's, for another Hub than the default."""
    c = chosen_model(model_key, custom)
    model = load_model(c, None)
    repo = (repo or "").strip() or DEFAULT_HUB_REPO
    fp = diffusers_fingerprint(model.transformer)
    filename = (filename or "").strip() or profile_filename(fp, _whole("N", interval))
    path = pull_profile(repo, filename, model=fp, endpoint=endpoint, token=token, cache_dir=cache_dir)
    profile = load_profile(path, fp)
    profile.source = f"{filename} from the Hub repo {repo}"
    session_slot(state, c.key)["loaded"] = profile
    set_current(state, model, profile)
    return f"Loaded {filename} from the Hub repo {repo}."


def push(state: dict[str, Any], model_key: str, custom: str | None, repo: str | None, *,
         endpoint: str | None = None, token: str | bool | None = None) -> str:
    slot = session_slot(state, chosen_model(model_key, custom).key)
    if slot["file"] is None:
        raise AppError("there is no profile to push: run the probe or load one first")
    repo = (repo or "").strip()
    if not repo:
        raise AppError("enter a Hub repo id you can write to, e.g. your-name/hyca-profiles")
    if hub_offline():
        raise AppError("the app is offline (HF_HUB_OFFLINE=1), so nothing can be pushed; download the profile "
                       "file instead and upload it later with `python -m hyca push`")
    url = push_profile(slot["file"], repo, path_in_repo=Path(slot["file"]).name, endpoint=endpoint, token=token)
    return f"Pushed to {url}"
