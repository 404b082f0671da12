"""What the hosts read off a sampler's name (WebUI, ComfyUI) or a diffusers scheduler: whether
it adds fresh noise at every step (k-diffusion's ancestral and SDE samplers, LCM, DDPM, Restart,
SEEDS, SA-Solver; diffusers' ancestral / SDE / LCM / DDPM schedulers, ``stochastic_sampling``).

A profile is chosen on a deterministic path (the probe's Euler walk over the run's sigmas).
A re-noising sampler moves the model input by new noise at each step, which extrapolating
solvers read as motion: such a run takes the off-settings path (start from plain reuse, the
guard gives a group its profile's solver back where that solver wins its checks on this run).
A sampler that replaces the noise at every step (LCM, ``stochastic_sampling``) computes every
step: no forecast follows it.
Names: ``comfy/k_diffusion/sampling.py`` (``sample_<name>``) and the WebUIs' sampler labels
(``modules/sd_samplers_kdiffusion.py``: "Euler a", "DPM++ 2M SDE", ...).
"""

from __future__ import annotations

import re

from ..engine.cache import HybridCache
from ..engine.targets import RESIDUAL, TARGET_WORDS, target_of
from ..profiles.off_settings import OffSettings
from ..profiles.profile import Profile
from ..profiles.settings import RunSettings

#: Where the robust path starts on such a run: plain reuse (FORA), which fresh noise does not
#: mislead; measured on the reference model in ComfyUI: bench/results/renoising.md.
RENOISING_START = "reuse"

_RENOISING = re.compile(r"ancestral|sde|lcm|ddpm|seeds|restart|sa_solver|stochastic| a$")
#: Samplers whose every step *replaces* the sample's noise (``x = (1 - s) x0 + s * noise``):
#: k-diffusion's and diffusers' LCM, flow-matching Euler with ``stochastic_sampling``. No
#: forecast follows such a run: FORA at N=4 lands further from the full image than a sample
#: with other noise (bench/results/renoising.md), so these runs compute every step.
_REPLACING = re.compile(r"lcm|stochastic_sampling")

#: What such a run says (after the sampler's name).
COMPUTED_EVERY_STEP = ("replaces the sample's noise at every step, which no forecast can follow: HyCa computes every "
                       "step of this run (no speed-up; the image is the uncached one)")


class Renoising(str):
    """The off-settings reason for a sampler that adds fresh noise at every step: the phrase
    :func:`hyca.profiles.off_settings.decide` lists with the settings that differ (a ``str``,
    as the hosts pass it on), and what was read off the sampler's name: ``label`` (as the
    user knows it) and ``replaces`` (it replaces the noise at every step: :func:`replaces_noise`)."""

    label: str
    replaces: bool

    def __new__(cls, label: str) -> "Renoising":
        reason = super().__new__(cls, f"sampler: {label} adds fresh noise every step (the profile was chosen without)")
        reason.label, reason.replaces = label, bool(_REPLACING.search(label.lower()))
        return reason

    def __getnewargs__(self) -> tuple[str]:  # copies are made from the label, not the phrase
        return (self.label,)


def renoising(name: str | None) -> Renoising | None:
    """The :class:`Renoising` reason for a sampler that adds fresh noise at every step, or None
    for a deterministic one or an unknown name."""
    if not name:
        return None
    label = str(name).strip()
    if not _RENOISING.search(label.lower()):
        return None
    return Renoising(label.removeprefix("sample_"))


def scheduler_renoising(scheduler: object) -> Renoising | None:
    """:func:`renoising` for a diffusers scheduler: its class name (``EulerAncestralDiscreteScheduler``,
    ``DPMSolverSDEScheduler``, ``LCMScheduler``, ``DDPMScheduler``) or its config
    (``stochastic_sampling=True``; an SDE ``algorithm_type``)."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    if get("stochastic_sampling", False):
        name += " (stochastic_sampling=True)"
    elif "sde" in str(get("algorithm_type", "") or "").lower():
        name += f" ({get('algorithm_type')})"
    return renoising(name)


def profile_for_renoising(profile: Profile, num_blocks: int, dim: int,
                          reason: Renoising) -> tuple[Profile, str | None]:
    """The profile a re-noising run (``reason``: :func:`renoising`'s) forecasts with, and the
    note when it is not ``profile``. A residual profile stays (the run takes the robust path
    from :data:`RENOISING_START`). One that forecasts the model output or the output head's
    input is set aside for plain reuse of the blocks' residuals (FORA): a skipped step still
    runs the embeddings and the head on the freshly noised input, where a forecast output
    cannot follow the new noise (measured in bench/results/renoising.md)."""
    target = target_of(profile.metadata)
    if target == RESIDUAL or replaces_noise(reason):  # (the latter forecasts nothing: expect_renoising)
        return profile, None
    fora = Profile.uniform(RENOISING_START, num_blocks, dim)
    fora.metadata["renoising"] = True  # put in by HyCa, not asked for: its run still says why (plain_reuse)
    fora.source = f"plain reuse of the blocks' residuals (FORA), in place of {profile.source or 'the profile'}"
    return fora, (f"{reason}; a forecast of the {TARGET_WORDS[target]} cannot follow that noise, so this run "
                  f"forecasts the blocks' residuals with plain reuse (FORA) instead of its profile")


def expect_renoising(engine: HybridCache, run: RunSettings, reason: Renoising | None) -> OffSettings | None:
    """:meth:`HybridCache.expect` for a host that knows its sampler: a re-noising one
    (``reason``) makes the run differ from its profile's settings and start from
    :data:`RENOISING_START`, unless the profile is plain reuse the user asked for; one that
    replaces the noise every step (:func:`replaces_noise`) computes every step, said once."""
    if replaces_noise(reason):
        engine.expect(run, compute_all=f"sampler: {reason.label} {COMPUTED_EVERY_STEP}")
        return None
    noisy = reason if reason is not None and not plain_reuse(engine.profile) else None
    return engine.expect(run, extra=(noisy,) if noisy else (), start=RENOISING_START if noisy else None)


def replaces_noise(reason: Renoising | None) -> bool:
    """Whether :func:`renoising`'s ``reason`` names a sampler that replaces the noise at every step."""
    return reason is not None and reason.replaces


def plain_reuse(profile: Profile) -> bool:
    """Whether ``profile`` is plain reuse of every residual (FORA) as the user asked for it:
    a re-noising run then has nothing to change, and nothing to say (the one
    :func:`profile_for_renoising` puts in still takes the off-settings path, said in the run's stats)."""
    return (target_of(profile.metadata) == RESIDUAL and set(profile.solver_names()) == {RENOISING_START}
            and not profile.metadata.get("renoising"))
