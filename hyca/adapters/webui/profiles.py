""""Give me a Profile for this model and these settings": the one place the WebUI extension
asks for one.

Sources, in the order the user's choice selects them: a uniform method by name, a local
profile file (shipped in the extension's ``profiles/`` folder or in the cache folder),
or "automatic" (optionally with a Hub repo id). A uniform method or a file is known when
the pass starts. "Automatic" is settled at the pass's first model call, once its settings
are known (steps, CFG, sigmas, probe size, N, warm-up, LoRA set): a profile already found
or probed for exactly those settings in this session, else the closest one
``hyca.profiles.sources.resolve_profile`` finds if it was chosen for the same settings,
else a closed-loop probe on the pass itself (:mod:`.probe`), saved to the cache. With
LoRA reuse off, each new LoRA set gets its own probe (kept for the session) and the ARI
of its clusters against the base profile for the same settings is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection

import torch

from ...engine.targets import target_of
from ...profiles import sources
from ...profiles.compare import TARGET_WORDS, compare_profiles
from ...profiles.io import ProfileError, model_class_of
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings
from ..samplers import Renoising, profile_for_renoising
from .adapter import Adapter
from .fingerprint import fingerprint
from .processing import lora_label

AUTOMATIC = "automatic"
#: Choices that need no file: label -> pool solver name.
UNIFORM = {"TaylorSeer (taylor-2)": "taylor-2", "TaylorSeer (taylor-1)": "taylor-1", "FORA (reuse)": "reuse"}


#: How a profile probed for a pass's settings is named at that pass (later passes name the file).
PROBED = "probe, saved to "


@dataclass
class Chosen:
    """A profile, where it came from, and what to tell the user. ``profile`` is ``None``
    when it is settled at the pass's first model call for the pass's settings
    (:meth:`ProfileBook.for_settings`), under ``key`` + those settings."""

    profile: Profile | None
    source: str                       # what to print and write: "uniform taylor-2", a file name, ...
    notes: list[str] = field(default_factory=list)
    lora_ari: float | None = None
    key: tuple = ()
    base: Profile | None = None       # a LoRA set's probe is compared with this profile
    fp: dict | None = None            # the model's fingerprint, for the lookup and the probe
    lora: str = ""                    # a LoRA set probed on its own (LoRA reuse off)


def nothing_forecast(adapter: Adapter, model: torch.nn.Module, why: str = "the schedule forecasts none of the run's "
                     "steps") -> Chosen:
    """For a run that forecasts none of its steps (N=1, a warm-up as long as the run, a sampler
    that replaces the noise): no profile plays a part, so "automatic" probes none (the engine
    says "every step is computed" at the run's first step); plain reuse stands in."""
    profile = Profile.uniform("reuse", len(adapter.blocks(model)), adapter.hidden_size(model))
    return Chosen(profile, f"none ({why})")


def for_sampler(chosen: Chosen, adapter: Adapter, model: torch.nn.Module, reason: Renoising | None,
                say: Callable[[str], None]) -> Chosen:
    """``chosen``, or on a sampler that re-noises every step (``reason``) in place of a profile
    that forecasts the model output or the head's input, plain reuse of the residuals, said
    with ``say`` (:func:`hyca.adapters.samplers.profile_for_renoising`)."""
    if reason is None or chosen.profile is None:
        return chosen
    kept, note = profile_for_renoising(chosen.profile, len(adapter.blocks(model)), adapter.hidden_size(model), reason)
    if note is None:
        return chosen
    say(note)
    return replace(chosen, profile=kept, source=kept.source)


def profile_dirs() -> list[Path]:
    """Where local profiles are listed from: the folders hyca.profiles.sources searches
    (``$HYCA_PROFILES``, the shipped ``profiles/``, the cache)."""
    return [*sources.extra_dirs(), sources.shipped_dir(), sources.default_cache_dir()]


def local_profiles(classes: Collection[str] | None = None) -> dict[str, Path]:
    """The profile files of the profile folders by name (the first folder's wins);
    ``classes``: only those made for one of these model classes (a host's menu leaves out
    the diffusers profiles shipped beside it, and files that are no readable profile)."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                if classes is None or model_class_of(path) in classes:
                    found.setdefault(path.name, path)
    return found


def choices() -> list[str]:
    """The WebUI's profile menu: automatic, the one-solver methods, and the profile files
    made for a model class the WebUI adapters serve."""
    from .registry import ADAPTERS

    return [AUTOMATIC, *UNIFORM, *local_profiles({c for a in ADAPTERS for c in a.classes})]


def menu_label(choice: str) -> str:
    """``choice`` as the menu spells it when it names a menu entry in another case
    (``Automatic``, ``taylorseer (TAYLOR-2)``: an API caller's typing), else unchanged."""
    return next((label for label in (AUTOMATIC, *UNIFORM) if label.casefold() == choice.casefold()), choice)


def _solver_named(choice: str) -> str | None:
    """The pool solver ``choice`` names (``fora``, ``taylor-2``, ...), or None."""
    from ...math.solvers import get_solver

    try:
        return get_solver(choice).name
    except ValueError:
        return None


def adjusted_rand_index(a: Profile, b: Profile) -> float:
    """Mean over blocks of the ARI between two profiles' cluster labels (1 = same
    clustering), :func:`hyca.profiles.compare.compare_profiles`."""
    return float(compare_profiles(a, b).ari_overall)


def settings_key(run: RunSettings, latent: tuple[int, ...]) -> tuple:
    """What a profile in the book is chosen for: the pass's settings (steps, CFG, sigmas,
    N, warm-up, last step) and its probe size class (the probe latent's shape)."""
    return (run, tuple(latent))


class ProfileBook:
    """Profiles resolved (or probed) so far in this WebUI session: files and uniform methods
    by model and choice; automatic ones by model, choice, Hub repo, LoRA set and the
    settings they were chosen for (:func:`settings_key`)."""

    def __init__(self) -> None:
        self._known: dict[tuple, Chosen] = {}

    def clear(self) -> None:
        self._known.clear()

    def choose(self, model: torch.nn.Module, adapter: Adapter, choice: str, hub_repo: str = "",
               interval: int | None = None, lora_key: str = "", lora_reuse: bool = True) -> Chosen:
        """The profile for a pass about to start, or, for "automatic" and for a LoRA set
        probed on its own, a :class:`Chosen` without one, settled at the first model call."""
        fp, choice = fingerprint(model, adapter), menu_label(choice)
        base_key = (fp["config_sha256"], choice, hub_repo, interval)
        base = self._known.get(base_key) or self._resolve(fp, choice, hub_repo, interval, base_key)
        if base.profile is not None:
            self._known[base_key] = base
        own_lora = bool(lora_key) and not lora_reuse
        if base.profile is not None and not own_lora:
            return base
        notes = list(base.notes) if base.profile is None else []
        if own_lora:
            notes.append(f"LoRA set {lora_label(lora_key)}: probing its own profile for this pass's settings")
        return Chosen(None, "automatic", notes, key=base_key + ((lora_key,) if own_lora else ()), base=base.profile,
                      fp=fp, lora=lora_key if own_lora else "")

    def for_settings(self, chosen: Chosen, run: RunSettings, latent: tuple[int, ...],
                     probe: Callable[[], Profile], targets: tuple[str, ...] | None = None,
                     say: Callable[[str], None] | None = None, output_channels: int | None = None) -> Chosen:
        """Settle ``chosen`` (no profile yet) for a pass's settings: the profile this session
        already has for them, else (automatic) the one ``resolve_profile`` finds if it was
        chosen for the same settings and forecasts one of ``targets`` (those the host applies;
        None: any), else ``probe()``'s, saved to the cache; a LoRA set's own probe is kept for
        the session and compared with the base profile. ``say``: told each lookup warning as it
        happens (a profile passed over before the probe it causes); all are in the result's notes.
        ``output_channels``: the model call's output channels (a model-output profile of
        another width is passed over)."""
        key = chosen.key + settings_key(run, latent)
        if key in self._known:  # a later pass: the file it was saved to, not "probe" again
            known = self._known[key]
            probed = known.source.startswith(PROBED)
            return replace(known, source=f"{known.source[len(PROBED):]} (probed earlier this session)") if probed \
                else known
        if chosen.lora:
            profile = probe()
            base = chosen.base
            if base is None:
                known = self._known.get(chosen.key[:-1] + settings_key(run, latent))
                base = known.profile if known is not None else self._saved_base(chosen, run, targets, output_channels)
            if base is not None and target_of(base.metadata) != target_of(profile.metadata):
                learned = Chosen(profile, "probe (LoRA set)", [
                    f"LoRA profile: it forecasts the {TARGET_WORDS[target_of(profile.metadata)]}, the base profile "
                    f"the {TARGET_WORDS[target_of(base.metadata)]}: their clusters are not compared"], key=key)
            elif base is not None:
                ari = adjusted_rand_index(base, profile)
                learned = Chosen(profile, "probe (LoRA set)", [f"LoRA profile: ARI {ari:.3f} against the base profile"],
                                 lora_ari=ari, key=key)
            else:
                learned = Chosen(profile, "probe (LoRA set)", ["LoRA profile: no base profile for these settings yet "
                                                               "to compare its clusters with"], key=key)
        else:
            hub = {"hub_repo": chosen.key[2]} if chosen.key[2] else {}
            resolved = sources.resolve_profile(chosen.fp, interval=run.interval, run=run, probe=probe,
                                               probe_if_mismatched=True, warn=say or False, targets=targets,
                                               output_channels=output_channels, **hub)
            where = f"{PROBED}{resolved.path}" if resolved.source == "probe" and resolved.path else \
                f"{resolved.source} {resolved.path or ''}".strip()
            learned = Chosen(resolved.profile, where, list(resolved.warnings), key=key)
        self._known[key] = learned
        return learned

    @staticmethod
    def _saved_base(chosen: Chosen, run: RunSettings, targets: tuple[str, ...] | None,
                    output_channels: int | None) -> Profile | None:
        """The base model's profile made for ``run``'s settings in the profile folders or the
        cache (another session's, or a graph run earlier with LoRA reuse on), to compare a
        LoRA set's profile with; None when there is none (nothing is probed for it)."""
        if chosen.fp is None:
            return None
        try:
            found = sources.resolve_profile(chosen.fp, interval=run.interval, run=run, warn=False, targets=targets,
                                            output_channels=output_channels, hub_repo=None)
        except ProfileError:
            return None
        return found.profile if not found.differences else None

    def _resolve(self, fp: dict, choice: str, hub_repo: str, interval: int | None, key: tuple) -> Chosen:
        blocks, dim = sum(fp["blocks"].values()), fp["hidden_size"]
        choice = menu_label(choice)
        solver = _solver_named(choice)
        if choice in UNIFORM or solver is not None:  # a label of the menu, or a solver name (fora, taylor-2, ...)
            name = UNIFORM.get(choice, solver)
            return Chosen(Profile.uniform(name, blocks, dim), f"uniform {name}")
        files = local_profiles()
        if choice in files:
            from ...profiles.io import read_profile

            profile, warns = read_profile(files[choice], fp, interval=interval)
            return Chosen(profile, choice, list(warns))
        notes = []
        if choice != AUTOMATIC:  # a typo, or a file named in a pasted infotext that is not on this machine
            notes.append(f"profile {choice!r} is neither a choice of the menu ({', '.join([AUTOMATIC, *UNIFORM])}), "
                         f"a solver name, nor a profile file in {', '.join(str(d) for d in profile_dirs())}; "
                         "using automatic")
        return Chosen(None, AUTOMATIC, notes, key=key)
