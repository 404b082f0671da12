"""Which guidance branches make up the run in progress: the engine's run-lifetime state.

A host keeps one :class:`~hyca.engine.state.BranchState` per guidance branch and calls the
engine for each in turn; the engine sees branches only as the states that begin each step.
Two states beginning the same step are the cond and uncond branch of one guided run; the
guard pairs them to judge forecasts on their difference (:mod:`hyca.engine.guard`). This
object keeps that bookkeeping for one run and is reset at the run's end (or when a new run
finds an earlier one's left over)."""

from __future__ import annotations

from .guard import Check
from .state import BranchState


class RunBranches:
    """The branch states that began each recent step, and the latest guard check (for the
    branch checking the same step next)."""

    def __init__(self) -> None:
        self._begun: dict[int, set[int]] = {}  # step -> ids of the branch states that began it (recent steps)
        self.last_check: tuple[BranchState, Check] | None = None

    def reset(self) -> None:
        self._begun.clear()
        self.last_check = None

    def began(self, state: BranchState) -> None:
        """``state`` begins its current step; steps more than two away are forgotten."""
        self._begun.setdefault(state.step, set()).add(id(state))
        for old in [k for k in self._begun if k < state.step - 2 or k > state.step + 2]:
            del self._begun[old]

    def at(self, step: int) -> int:
        """How many branch states began ``step``."""
        return len(self._begun.get(step, ()))

    def left_over(self, state: BranchState) -> bool:
        """Whether ``state``, beginning its step 0, finds an earlier run's bookkeeping: it
        is already counted at step 0 (it began there before). A guided run cancelled early
        would otherwise leave its uncond branch counted in the next run's step 0."""
        return id(state) in self._begun.get(0, ())

    def peer_of(self, state: BranchState) -> tuple[BranchState, Check] | None:
        """The other branch that checked this same step just before (it has moved on by one),
        while the run has two branches at this step and the one before (see
        :mod:`hyca.engine.guard`: with three, which two pair is not known)."""
        if self.last_check is None:
            return None
        other, check = self.last_check
        if other is state or check.step != state.step or other.step != state.step + 1:
            return None
        if self.at(state.step - 1) > 2 or self.at(state.step) > 2:
            return None  # a third branch (a conditioning that joined part-way): which two pair is not known
        return other, check


def share(state: BranchState, other: BranchState) -> None:
    """The branch that checked first (``other``) adopts the decisions of the second
    (``state``), which also saw the difference of the two, item by item."""
    if len(state.active) != len(other.active):
        return  # batches of different sizes: their items do not pair
    for row in range(len(state.active)):
        if other.active[row] != state.active[row]:
            other.switch(row, state.active[row], state.step)
        other.strikes[row] = state.strikes[row]
