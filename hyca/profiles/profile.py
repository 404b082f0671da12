"""A profile: for every block, a cluster label per hidden dimension and a solver per cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..math.solvers import get_solver, pool, pool_names


@dataclass
class Profile:
    """What the engine needs to forecast, and nothing it does not.

    ``labels``: ``(blocks, dim)`` integer cluster of each hidden dimension in each block.
    ``solvers``: ``(blocks, clusters)`` index into :func:`hyca.math.solvers.pool` of the
    solver each cluster uses. ``metadata``: JSON-able facts (model fingerprint, probe
    settings, ...); the engine reads what the closed loop chose besides the solvers
    (``target``, ``first_interval``, ``skip_last``, ``guard``) and ``chosen_for``. ``source``: where the profile
    came from, in words (a file path, the shipped folder, the Hub, a probe), set by whoever
    read or made it and reported with each run (:attr:`hyca.engine.state.RunStats.profile`);
    not saved in the file and not compared.
    """

    labels: torch.Tensor
    solvers: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).cpu()
        self.solvers = torch.as_tensor(self.solvers, dtype=torch.int64).cpu()
        if self.labels.ndim != 2 or self.solvers.ndim != 2:
            raise ValueError(
                f"profile tensors must be 2-D: labels (blocks, dim), solvers (blocks, clusters); "
                f"got {tuple(self.labels.shape)} and {tuple(self.solvers.shape)}"
            )
        if self.labels.shape[0] != self.solvers.shape[0]:
            raise ValueError(
                f"labels cover {self.labels.shape[0]} blocks but solvers cover {self.solvers.shape[0]}"
            )
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= self.solvers.shape[1]):
            raise ValueError(f"cluster labels must lie in [0, {self.solvers.shape[1]}), one solver per cluster")
        if self.solvers.numel() and (self.solvers.min() < 0 or self.solvers.max() >= len(pool())):
            raise ValueError(f"solver ids must lie in [0, {len(pool())}): the pool is {', '.join(pool_names())}")

    @classmethod
    def uniform(cls, solver: str, num_blocks: int, dim: int) -> "Profile":
        """One cluster, one solver: ``reuse`` is FORA, ``taylor-k`` is TaylorSeer."""
        index = pool_names().index(get_solver(solver).name)
        return cls(
            labels=torch.zeros(num_blocks, dim, dtype=torch.int64),
            solvers=torch.full((num_blocks, 1), index, dtype=torch.int64),
            metadata={"method": get_solver(solver).name},
            source=f"solver {get_solver(solver).name!r} for every dimension (no profile file)",
        )

    @property
    def num_blocks(self) -> int:
        return self.labels.shape[0]

    @property
    def dim(self) -> int:
        return self.labels.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.solvers.shape[1]

    def dim_solvers(self) -> torch.Tensor:
        """``(blocks, dim)`` pool index of the solver every dimension uses."""
        return torch.gather(self.solvers, 1, self.labels)

    def solver_names(self) -> list[str]:
        """Names of the solvers the profile uses, in pool order."""
        used = torch.unique(self.solvers).tolist()
        return [pool()[i].name for i in used]

    def check_fits(self, num_blocks: int, dim: int, model: str = "the model") -> None:
        if (self.num_blocks, self.dim) != (num_blocks, dim):
            raise ValueError(
                f"profile is for {self.num_blocks} blocks x {self.dim} dims, but {model} has "
                f"{num_blocks} blocks x {dim} dims: make a profile for this model (python -m hyca probe)"
            )
