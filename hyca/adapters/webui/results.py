"""What a WebUI pass did (:class:`PassStats`, made by ``PassSession.stats``), and a batch's
passes as the infotext's entries (:data:`~.settings.RESULT_KEYS`).

A generation with a hires fix runs two passes; the infotext sums them and, where an entry
comes from one pass, names it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...engine.guard import Switch, describe_switches
from ...engine.state import LAST_FORECAST, RunStats
from ...profiles.off_settings import OffSettings


@dataclass
class PassStats:
    steps: RunStats = field(default_factory=RunStats)
    calls_computed: int = 0
    calls_forecast: int = 0
    #: ``(branch, switch)`` for every solver group the guard switched in this pass
    switches: list[tuple[str, Switch]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the pass ran its profile away from the settings it was chosen for (the engine's decision)
    off_settings: OffSettings | None = None
    #: why HyCa stopped caching part-way (its later calls ran uncached and are not counted above)
    stopped: str | None = None
    #: the user stopped the pass before its last step: ``"Interrupt after 6 of 10 steps"``
    interrupted: str | None = None

    def describe_switches(self) -> str:
        """``taylor-2 -> taylor-1 at step 6 (images 1-4, cond), ...``
        (:func:`hyca.engine.guard.describe_switches`); the branch is named only when the pass
        had several."""
        return describe_switches(self.switches, branches=len({branch for branch, _ in self.switches}) > 1)

    @property
    def flops_saving(self) -> float:
        """Fraction of block-stack evaluations skipped (embeddings and output layers run
        on every call and are not counted)."""
        total = self.calls_computed + self.calls_forecast
        return self.calls_forecast / total if total else 0.0



_BRANCHES = {0: "cond", 1: "uncond"}  # the frontends' cond_or_uncond values


def branch_name(key: tuple) -> str:
    """``cond``, ``uncond``, ``cond+uncond`` (one batched call) or ``call k`` (unnamed calls)."""
    (hint, *_), slot = key
    if hint:
        return "+".join(_BRANCHES.get(h, str(h)) for h in hint)
    return "batch" if slot == 0 else f"call {slot + 1}"


def of_image(key: tuple, items: int | None, switch: Switch, halves_of: int | None = None) -> tuple[str, Switch]:
    """A switch with its branch, and, in a call that batches several branches (chunks of
    the batch, in the order of the call's ``cond_or_uncond``; an unnamed call of twice
    ``halves_of`` rows: cond then uncond, A1111's order), the chunk's branch and the image
    within it: the engine counts the call's batch rows, which are not the images."""
    (hint, *_), _slot = key
    if not hint and halves_of and items == 2 * halves_of:
        hint = (0, 1)
    if not hint or len(hint) < 2 or switch.item is None or not items or items % len(hint):
        return branch_name(key), switch
    per_chunk = items // len(hint)
    chunk, image = divmod(switch.item, per_chunk)
    return _BRANCHES.get(hint[chunk], str(hint[chunk])), replace(switch, item=image if per_chunk > 1 else None)


def totals(passes: list[tuple[str, PassStats]]) -> PassStats | None:
    """The passes' stats summed (``None`` for no pass); switches, a stop and an interruption
    are labelled with their pass when there are several."""
    if not passes:
        return None
    total = PassStats()
    several = len(passes) > 1
    for label, stats in passes:
        total.steps.computed += stats.steps.computed
        total.steps.forecast += stats.steps.forecast
        total.calls_computed += stats.calls_computed
        total.calls_forecast += stats.calls_forecast
        total.switches += [(f"{label}, {branch}" if several else branch, d) for branch, d in stats.switches]
        total.off_settings = total.off_settings or stats.off_settings
        if stats.stopped is not None and total.stopped is None:
            total.stopped = f"{label}: {stats.stopped}" if several else stats.stopped
        if stats.interrupted is not None and total.interrupted is None:
            total.interrupted = f"{label}: {stats.interrupted}" if several else stats.interrupted
    return total


def infotext(passes: list[tuple[str, PassStats]], lora_ari: float | None) -> dict[str, str]:
    """Infotext entries for ``passes`` (keys: :data:`~.settings.RESULT_KEYS`); ``lora_ari``:
    how far the LoRA set's profile is from the base one, when the pass probed with a LoRA."""
    total = totals(passes)
    if total is None:
        return {}
    out = {"HyCa steps": f"{total.steps.computed} computed, {total.steps.forecast} forecast",
           "HyCa saving": f"{total.flops_saving:.0%}"} if total.steps.total else {}
    if lora_ari is not None:
        out["HyCa LoRA ARI"] = f"{lora_ari:.3f}"
    if total.off_settings is not None:  # the profile ran away from its settings: the path it took
        out["HyCa off-settings"] = total.off_settings.short()
    if total.switches:
        out["HyCa guard switches"] = total.describe_switches()
    if any(LAST_FORECAST in stats.notes for _, stats in passes):  # "HyCa last step" is what was asked
        out["HyCa last step ran"] = "forecast (the profile was chosen so: TaylorSeer lite's end)"
    if total.stopped is not None:  # the steps above are those before it: the rest ran uncached
        out["HyCa stopped"] = f"{total.stopped}; the rest sampled uncached"
    if total.interrupted is not None:  # the frontend keeps the latent so far: the steps above are all it had
        out["HyCa interrupted"] = total.interrupted
    return out
