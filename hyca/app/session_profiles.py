"""Which profile an app run uses, per session: the one the session has for the run's
settings, a file or Hub profile the user loaded, one found for these settings, or a probe.

A session's state (``handlers.new_state``) keeps its profiles per model (see
:mod:`hyca.app.handlers`); every function here runs under the model's lock.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from ..adapters.diffusers.fingerprint import fingerprint as diffusers_fingerprint
from ..engine.schedule import Schedule
from ..math.solvers import pool_names
from ..probing import CALIBRATION_SAMPLES
from ..profiles import fingerprint as fpmod
from ..profiles.compare import compare_profiles
from ..profiles.io import ProfileError, save_profile
from ..profiles.names import profile_filename
from ..profiles.profile import Profile
from ..profiles.settings import RunSettings
from ..profiles.sources import resolve_profile
from . import compare
from .models import REFERENCE, LoadedModel

Progress = Callable[[float, str], None]


def session_slot(state: dict[str, Any], key: str) -> dict[str, Any]:
    return state.setdefault("profiles", {}).setdefault(key, {"current": None, "previous": None, "base": None, "lora": {},
                                                             "file": None, "settings": {}, "loaded": None})


def session_dir(state: dict[str, Any]) -> Path:
    if not state.get("dir"):
        state["dir"] = tempfile.mkdtemp(prefix="hyca-app-")
    return Path(state["dir"])


def fits(profile: Profile | None, model: LoadedModel) -> bool:
    if profile is None:
        return False
    fp = profile.metadata.get("fingerprint")
    if fp:
        return fpmod.mismatch(fp, diffusers_fingerprint(model.transformer)) is None
    from ..adapters.diffusers.families import blocks_of, family_of, hidden_size

    t = model.transformer
    return (profile.num_blocks, profile.dim) == (len(blocks_of(t, family_of(t))), hidden_size(t))


def set_current(state: dict[str, Any], model: LoadedModel, profile: Profile, lora: str = "none") -> str:
    """Make ``profile`` the session's current one (the old one becomes ``previous``); save it
    as a file for download and return its path."""
    slot = session_slot(state, model.choice.key)
    if slot["current"] is not None and slot["current"] is not profile:
        slot["previous"] = slot["current"]
    slot["current"] = profile
    if lora in ("none", "", None):
        slot["base"] = profile
    fp = diffusers_fingerprint(model.transformer)
    name = profile_filename(fp, profile.metadata.get("interval"))
    if lora not in ("none", "", None):
        name = name.replace(".safetensors", f"-lora-{lora}.safetensors")
    slot["file"] = str(save_profile(profile, session_dir(state) / name, fp))
    return slot["file"]


def _probe_size(model: LoadedModel) -> tuple[int, int]:
    """Small models are probed at their own size; large ones at the probe's 256x256."""
    return model.size if max(model.size) <= 256 else (256, 256)


def probe_locked(model: LoadedModel, prompt: str | None, steps: int, interval: int, warmup: int, clusters: int,
                 lora: str, progress: Progress | None, target: str | None = None) -> Profile:
    """Run the probe (caller holds the lock) with ``lora`` active; progress per transformer call.
    ``prompt``: None for the probe a plain ``hyca.enable`` call runs (the pipeline's own probe
    captions: the app's automatic profiles are the diffusers path's, and shared with it through
    the cache); a prompt is sampled ``CALIBRATION_SAMPLES`` times, each with its own noise (one
    sample lets one noise decide the profile: bench/results/webui_path.md). ``target``: as the probe's (a LoRA's profile
    keeps its base profile's, so their clusterings compare)."""
    from ..adapters.diffusers.probe import probe

    compare.apply_lora(model, lora)
    height, width = _probe_size(model)
    options: dict[str, Any] = {} if prompt is None else {"prompt": [prompt] * CALIBRATION_SAMPLES}
    if model.choice.key == REFERENCE or "Reference" in type(model.pipe).__name__:
        options["output_type"] = "np"  # the reference pipeline has no latent output
    if model.choice.guidance is not None:
        options["guidance_scale"] = model.choice.guidance
    profile = probe(model.pipe, height=height, width=width, steps=steps, interval=interval,
                    warmup=warmup, clusters=clusters, progress=False, on_progress=progress, target=target, **options)
    profile.metadata.setdefault("probe", {})["lora"] = lora
    return profile


def run_settings(model: LoadedModel, s: compare.Settings) -> RunSettings:
    """What this app run samples with, for choosing (or probing) a profile made for it."""
    from ..adapters.diffusers.settings import guidance_of, schedule_shift

    call = {"guidance_scale": model.choice.guidance} if model.choice.guidance is not None else {}
    return RunSettings(steps=s.steps, guidance_scale=guidance_of(model.pipe, call),
                       shift=schedule_shift(model.pipe.scheduler), interval=s.interval, warmup=s.warmup,
                       compute_last=True, positions="step")


def settings_key(model: LoadedModel, s: compare.Settings) -> tuple:
    """What the session's profiles are kept by: the run's settings and its image size."""
    return run_settings(model, s), s.height, s.width


#: What to do about a profile chosen for other settings, in the app's terms.
IN_APP_REMEDY = ("For a profile made for these settings, press “Run the probe” on the Profile tab with these steps, "
                 "N and warm-up (it replaces the loaded profile).")


def base_profile(state: dict[str, Any], model: LoadedModel, s: compare.Settings,
                  progress: Progress | None) -> tuple[Profile, str]:
    """The profile without LoRA for this run's settings: a file or Hub profile the user
    loaded, at every setting until the next probe on the Profile tab (the run says when it
    was chosen for other settings); else the session's for these settings; else one from the
    files / Hub made for them, or an automatic probe for them."""
    slot = session_slot(state, model.choice.key)
    key = settings_key(model, s)
    loaded = slot["loaded"]
    if fits(loaded, model):  # the user's explicit choice, before anything the session found or probed itself
        # at other settings the run's own note says what differs and which path it takes (report_numbers)
        return loaded, named("the profile you loaded", loaded)
    if fits(slot["settings"].get(key), model):
        return slot["settings"][key], named("session profile", slot["settings"][key])
    resolved = resolve_profile(
        diffusers_fingerprint(model.transformer), run=key[0], probe_if_mismatched=True, own_sigmas=True,
        probe=lambda: probe_locked(model, None, s.steps, s.interval, s.warmup, 4, "none", progress))
    slot["settings"][key] = resolved.profile
    set_current(state, model, resolved.profile)
    where = (f"probed now for these settings, saved to {resolved.path}" if resolved.source == "probe"
             else f"from {resolved.describe()}")
    return resolved.profile, f"profile {where}"


def named(what: str, profile: Profile) -> str:
    """``what`` with the profile's source (a file, the Hub, a probe on the Profile tab)."""
    return f"{what} ({profile.source})" if profile.source else what


def profile_for_run(state: dict[str, Any], model: LoadedModel, s: compare.Settings, lora_reuse: bool,
                     progress: Progress | None) -> tuple[Profile | str | None, str, float | None]:
    """(profile, where it came from, ARI vs the base profile when a LoRA was probed)."""
    if s.method != "HyCa":
        return None, f"{s.method}: one solver ({compare.METHODS[s.method]}) for every dimension", None
    if all(Schedule(s.interval, s.warmup).plan(s.steps)):  # nothing to forecast, so nothing to probe
        return "reuse", (f"nothing to forecast: at {s.steps} steps with warm-up {s.warmup} and N={s.interval} "
                         "every step is computed; use more steps, a smaller warm-up or a smaller N to cache"), None
    base, where = base_profile(state, model, s, progress)
    if s.lora in ("none", "") or lora_reuse:
        note = f" (reused for LoRA '{s.lora}')" if s.lora not in ("none", "") else ""
        return base, where + note, None
    slot = session_slot(state, model.choice.key)
    key = (s.lora, settings_key(model, s))
    lora_profile = slot["lora"].get(key)
    where = named(f"the session's profile for LoRA '{s.lora}'", lora_profile) if fits(lora_profile, model) else None
    if where is None:
        lora_profile = probe_locked(model, None, s.steps, s.interval, s.warmup, base.num_clusters, s.lora,
                                    progress, target=base.metadata.get("target", "residual"))
        slot["lora"][key] = lora_profile
        where = f"probed again with LoRA '{s.lora}'"
    try:
        ari = compare_profiles(base, lora_profile).ari_overall
    except ProfileError as err:  # e.g. one forecasts the blocks' residuals, the other the output head's input
        return lora_profile, f"{where} (no ARI: {err})", None
    return lora_profile, f"{where}{_clusters_moot(base, lora_profile)}", ari


def _clusters_moot(base: Profile, lora: Profile) -> str:
    """A note when both profiles forecast every dimension with one and the same solver: their
    clusters then change nothing, so a low ARI between them says nothing about reuse."""
    used = {pool_names()[int(i)] for p in (base, lora) for i in p.dim_solvers().unique()}
    if len(used) != 1:
        return ""
    return (f" (both profiles forecast every dimension with {used.pop()}: their clusters change nothing, "
            "whatever the ARI)")
