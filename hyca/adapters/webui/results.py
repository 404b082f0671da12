"""What a WebUI batch's passes did, as the infotext's entries (:data:`~.settings.RESULT_KEYS`).

A generation with a hires fix runs two passes; the infotext sums them and, where an entry
comes from one pass, names it."""

from __future__ import annotations

from ...engine.state import LAST_FORECAST
from .session import PassStats


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
