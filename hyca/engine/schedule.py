"""Which sampling steps run the transformer and which are forecast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Warm-up steps ``0 .. warmup-1`` are computed; after them one step in every
    ``interval`` is computed, counting the last warm-up step as the first of a cycle:
    computed steps are ``{0 .. W-1} U {W-1 + k*N}``. With ``compute_last`` the final
    step is computed too, because structure errors on it cannot be corrected later.

    ``interval=1`` computes every step (caching off, a useful baseline).
    """

    interval: int = 5
    warmup: int = 3
    compute_last: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = compute every step), got {self.interval!r}")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(
                f"warmup must be an integer >= 1: the first step has no history to forecast from, got {self.warmup!r}"
            )

    def computes(self, step: int, total_steps: int | None = None) -> bool:
        if step < self.warmup:
            return True
        if self.compute_last and total_steps is not None and step >= total_steps - 1:
            return True
        return (step - (self.warmup - 1)) % self.interval == 0

    def plan(self, total_steps: int) -> list[bool]:
        """``True`` for each computed step of a run of ``total_steps``."""
        return [self.computes(step, total_steps) for step in range(total_steps)]

    def computed_fraction(self, total_steps: int) -> float:
        """Fraction of transformer passes that run: the FLOPs ratio, up to the cheap
        embedding and output layers that run on every step."""
        return sum(self.plan(total_steps)) / total_steps
