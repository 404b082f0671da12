"""HyCa under diffusers' context parallelism (Ulysses and ring attention).

After ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` every rank runs
the whole sampling loop on a shard of the token sequence: diffusers splits the sequence
before the first block (at the transformer's input for FLUX, at the first block's input
for Wan and Qwen-Image) and gathers it again after ``proj_out``. HyCa then runs one engine
per rank on that rank's shard, so each rank caches ``1 / degree`` of the residuals.

Ranks must never decide differently: a rank that computes a step while another forecasts
it would wait in an attention collective the other never enters. What keeps them together:

- **schedule**: compute or forecast depends on step indices only, and a failure that
  makes one rank compute the rest of a run (a forecast or a recording that raised) is
  agreed first (:meth:`RankGroup.any`), so every rank falls back together;
- **guard**: its squared errors are sums over tokens, so summing them over ranks
  (``engine.reduce``) gives one process's numbers; for its random sketches of the
  guidance difference each rank projects its shard with its columns of the projection one
  process draws for the whole sequence (:meth:`RankGroup.projection`), so the summed
  sketches are one process's too. The guard then decides as on one GPU, at any degree
  (independent per-rank sketches would agree across ranks but not with one GPU, and
  switched solvers differently: 0.2 largest pixel difference on the reference model);
- **profile**: one for all ranks. Under context parallelism ``hyca.enable`` resolves it
  on the group's first rank and broadcasts it; when parallelism is enabled after
  ``hyca.enable``, the first run checks that every rank holds the same one.

The reduction is resolved per call from ``transformer._parallel_config``, so parallelism
may be enabled before or after ``hyca.enable``. HyCa's block hook must run on the shard,
i.e. inside diffusers' split hook on the first block: ``hyca.enable`` nests it there when
parallelism came first (:func:`split_hooks_outside`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from ...engine.cache import HybridCache
from . import compat

#: Name prefixes of diffusers' context-parallel hooks (``diffusers/hooks/context_parallel.py``).
SPLIT_HOOK, GATHER_HOOK = "cp_input---", "cp_output---"


def context_parallel(transformer: torch.nn.Module) -> Any:
    """The transformer's ``ContextParallelConfig`` once diffusers set it up, else ``None``."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    return cp if cp is not None and getattr(cp, "_flattened_mesh", None) is not None else None


class RankGroup:
    """The ranks that hold shards of one sequence (diffusers' flattened ring x Ulysses mesh).

    Callable as the engine's ``reduce``: sums a small tensor over the group and hands it
    back where it came from (float64 on the CPU from the guard; moved to the group's
    device first where the backend needs it, e.g. NCCL)."""

    def __init__(self, cp: Any) -> None:
        import torch.distributed as dist

        self.config = cp
        self.group = cp._flattened_mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        backend = str(dist.get_backend(self.group)).lower()
        on_cpu = cp._flattened_mesh.device_type == "cpu" or backend == "gloo" or "cpu:gloo" in backend
        self.device = torch.device("cpu") if on_cpu else torch.device(cp._device)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        summed = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        return summed.to(tensor.device)

    def projection(self, shape: tuple[int, ...], rows: int, seed: int, like: torch.Tensor) -> torch.Tensor:
        """The guard's sketch projection for this rank's shard (``shape``: ``(batch, its
        tokens, dim)``): this rank's columns of the projection that one process draws for the
        whole sequence, so the sketches summed over the group are one process's sketch (and
        its decisions), whatever the degree. Every rank draws the whole matrix on the CPU, as
        one process does, and keeps its columns."""
        from ...engine.guard import _projection

        batch, tokens = shape[0], math.prod(shape[1:-1])
        sizes = self._token_counts(tokens)
        total, offset = sum(sizes), sum(sizes[:self.rank])
        whole = _projection(batch * total, rows, seed, torch.empty(0))  # on the CPU, as one process draws it
        columns = (torch.arange(batch)[:, None] * total + offset + torch.arange(tokens)[None, :]).reshape(-1)
        return whole[:, columns].to(like.device)

    def _token_counts(self, tokens: int) -> list[int]:
        """Every rank's share of the sequence: equal parts, except in diffusers' "anything"
        modes (uneven splits), where the ranks say theirs."""
        if not (getattr(self.config, "ulysses_anything", False) or getattr(self.config, "ring_anything", False)):
            return [tokens] * self.size
        import torch.distributed as dist

        counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        counts[self.rank] = tokens
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        return counts.tolist()

    def _max(self, values: Sequence[int]) -> list[int]:
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank of the group (every rank gets the same answer)."""
        return bool(self._max([int(flag)])[0])

    def same(self, value: int) -> bool:
        """Whether every rank passed the same ``value`` (a 63-bit integer)."""
        high, low = self._max([value, -value])
        return high == -low

    def broadcast_profile(self, profile: Any | None, error: str | None) -> Any:
        """The group's first rank's profile (or its error, raised on every rank), on every rank.
        Sent as tensors and JSON, never pickled."""
        import torch.distributed as dist

        from ...profiles.profile import Profile

        first = self.rank == 0
        sent = {"metadata": profile.metadata, "source": profile.source} if first and profile is not None else {}
        meta = json.dumps(sent, default=str).encode()  # the source too: every rank's stats name the profile
        message = (error or "").encode() if first else b""
        blocks, dim = (tuple(profile.labels.shape) if first and profile is not None else (0, 0))
        clusters = profile.solvers.shape[1] if first and profile is not None else 0
        sizes = torch.tensor([len(message), blocks, dim, clusters, len(meta)] if first else [0] * 5,
                             dtype=torch.int64, device=self.device)
        dist.broadcast(sizes, group=self.group, group_src=0)
        failed, blocks, dim, clusters, meta_len = sizes.tolist()
        if failed:
            text = self._bytes(message, failed).decode()
            if first:
                return None  # the caller raises its own error
            raise RuntimeError(f"HyCa: the first rank of the context-parallel group found no profile: {text}")
        labels = profile.labels if first else torch.zeros(blocks, dim, dtype=torch.int64)
        solvers = profile.solvers if first else torch.zeros(blocks, clusters, dtype=torch.int64)
        labels, solvers = (self._send(t) for t in (labels, solvers))
        meta = json.loads(self._bytes(meta, meta_len).decode())
        return Profile(labels, solvers, meta.get("metadata", {}), source=meta.get("source"))

    def _send(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        moved = tensor.contiguous().to(self.device, copy=True)
        dist.broadcast(moved, group=self.group, group_src=0)
        return moved.cpu()

    def _bytes(self, data: bytes, length: int) -> bytes:
        if not length:
            return b""
        buffer = torch.tensor(list(data), dtype=torch.uint8) if self.rank == 0 else torch.zeros(length, dtype=torch.uint8)
        return bytes(self._send(buffer).tolist())


def group_of(transformer: torch.nn.Module) -> RankGroup | None:
    cp = context_parallel(transformer)
    return None if cp is None else RankGroup(cp)


def profile_digest(profile: Any) -> int:
    """A 60-bit digest of what the engine forecasts with: the solver of every dimension."""
    solvers = profile.dim_solvers().contiguous()
    digest = hashlib.sha256(f"{tuple(solvers.shape)};".encode() + solvers.numpy().tobytes())
    return int(digest.hexdigest()[:15], 16)


def agree_profile(transformer: torch.nn.Module, resolve: Callable[[], Any]) -> Any:
    """``resolve()`` the profile; under context parallelism only on the group's first rank,
    whose profile (or failure) every rank then receives: ranks may see different local
    caches, and a probe on a shard would differ per rank."""
    group = group_of(transformer)
    if group is None:
        return resolve()
    profile, error = None, None
    if group.rank == 0:
        try:
            profile = resolve()
        except Exception as exc:  # every rank must hear it, or the others wait in the broadcast
            error = exc
    agreed = group.broadcast_profile(profile, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    return agreed


def attach(engine: Any, transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module], hook_name: str) -> RankGroup | None:
    """Before a transformer call: point the engine's ``reduce`` at the transformer's
    context-parallel group, or back at a single process. The first call under a group
    checks that HyCa's hooks see shards and that every rank holds the same profile."""
    cp = context_parallel(transformer)
    if not isinstance(engine, HybridCache):  # the probe's recorder
        if cp is not None:
            raise RuntimeError("HyCa: probing under context parallelism is not supported (each rank sees a shard "
                               "of the sequence); probe before enable_parallelism, or on one GPU")
        return None
    current = engine.reduce if isinstance(engine.reduce, RankGroup) else None
    if cp is None:
        if current is not None:
            engine.reduce = None
        return None
    if current is not None and current.config is cp:
        return current
    group = RankGroup(cp)
    misplaced = [i for i, block in enumerate(blocks) if _split_inside(block, hook_name)]
    same = group.same(profile_digest(engine.profile))
    if misplaced or not same:
        why = (f"diffusers' context-parallel split hook runs inside HyCa's on block(s) {misplaced}, so HyCa would "
               "see the whole sequence" if misplaced else "the ranks hold different HyCa profiles")
        raise RuntimeError(f"HyCa: {why}. Call hyca.enable(pipe, ...) again after enable_parallelism: it nests its "
                           "hooks inside diffusers' and gives every rank the first rank's profile")
    engine.reduce = group
    return group


def _split_inside(block: torch.nn.Module, hook_name: str) -> bool:
    order = compat.hook_order(compat.registry_of(block))
    if hook_name not in order:
        return False
    ours = order.index(hook_name)
    return any(name.startswith(SPLIT_HOOK) for name in order[:ours])


@contextlib.contextmanager
def split_hooks_outside(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Take diffusers' context-parallel hooks off the blocks while HyCa registers its own,
    then put them back on top: HyCa's block hook then runs inside the split, on the shard
    (diffusers' hooks registered later wrap earlier ones)."""
    taken: list[tuple[Any, list[tuple[str, Any]]]] = []
    for block in blocks:
        registry = compat.registry_of(block)
        names = [n for n in compat.hook_order(registry) if n.startswith((SPLIT_HOOK, GATHER_HOOK))]
        if names:
            kept = [(n, registry.hooks[n]) for n in names]
            for name in reversed(names):
                registry.remove_hook(name, recurse=False)
            taken.append((registry, kept))
    try:
        yield
    finally:
        for registry, kept in taken:
            for name, hook in kept:
                registry.register_hook(hook, name)


def cache_bytes_per_rank(tokens: int, dim: int, history_terms: int, degree: int = 1, branches: int = 1,
                         bytes_per_value: int = 2) -> int:
    """Most bytes HyCa's cache holds on one rank: ``history_terms`` (the summed history
    lengths of the solvers a profile uses: reuse 1, taylor-1 2, taylor-2 3, ...) tensors of
    the rank's ``tokens / degree`` tokens by ``dim``, per guidance branch."""
    if tokens % degree:
        raise ValueError(f"{tokens} tokens do not split evenly over {degree} ranks")
    return history_terms * (tokens // degree) * dim * bytes_per_value * branches
