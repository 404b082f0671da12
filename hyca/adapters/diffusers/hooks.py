"""HyCa on a diffusers transformer: a root controller plus one hook per block.

The root controller runs before and after every transformer call (torch forward hooks,
which survive anything that rewraps ``forward``: accelerate's CPU offload, cache-dit,
``torch.compile``). It decides which guidance branch and which generation a call belongs
to and whether its blocks run. One diffusers ``ModelHook`` per block either runs the block
and records its residual, or passes its inputs through; on a skip step the first block
adds the forecast of the summed residuals, so the rest of the stack is a chain of cheap
identities and the embeddings and output layers run as usual. (A profile that forecasts the
model output skips the whole forward of a forecast call: :mod:`.outputs`.)

What a call belongs to is read from what the transformer is fed and who calls it, never
from state that can go stale:

- **branch**: ``transformer.cache_context(name)``; outside any context, a repeated call at
  the same timestep with the *same* input is the next guidance branch (Chroma's and
  Lumina2's pipelines run cond then uncond that way), and one with a *different* input is
  a later stage of a higher-order sampler (Heun's second call at the next sigma) in the
  same branch.
- **step count**: the scheduler of the pipeline whose ``__call__`` is running (found on
  the call stack; it holds this transformer), whatever pipeline or scheduler HyCa was
  enabled with; else the cache context's count; else the scheduler given to ``enable``.
- **generation**: a call starts a new one when the schedule object changed (every
  pipeline call sets new timesteps), the previous run reached its last call, the input
  shape changed, or the timestep moved back (against the direction the family's sampler
  moves). So aborted runs, pipelines that never clean up and transformers without
  diffusers' ``CacheMixin`` all start clean. A run that reaches its last call frees its
  cache at once; ``maybe_free_model_hooks`` resets every family's transformer.

Run state lives in scopes (:mod:`.scopes`), one per request: each pipeline call has its
own engine and branch states, so requests sharing the transformer in threads never mix;
calls outside any pipeline call use the transformer's default scope, one thread at a time.
The block hooks are stateful and hold the scopes' router (a ``StateManager``), so
``cache_context`` and ``_reset_stateful_cache`` reach the calling scope through diffusers'
own registry. A call with gradients enabled or the model in training mode passes through
untouched (inference only). Block hooks that something else unwraps (an offloading hook applied before
HyCa and removed later) are found before the blocks run and put back; a call whose blocks
did not all report is never forecast from.

Modules: :mod:`.root` (the controller: per call, runs, resets, scopes), :mod:`.block` (the
block hook), :mod:`.chain` (keeping the hooks in other libraries' chains), :mod:`.runs`
(the step count and the calling pipeline), :mod:`.outputs` (the output-head and
model-output targets), :mod:`.conflicts` (other caches),
:mod:`.scopes` (per-request state), :mod:`.calls` (call arguments), :mod:`.compat` (every
use of diffusers' private hook API). This module registers and finds HyCa on a transformer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .block import BLOCK_HOOK, ROOT_HOOK, HyCaBlockHook
from .chain import ROOT_ATTRIBUTE
from .conflicts import CacheConflict, conflict_message, other_cache
from .families import BlockList, Family
from .root import HyCaRoot, fresh_engine
from .runs import Run, Steps, calling_pipeline, scheduler_run
from .scopes import BranchStates, HostState

__all__ = ["BLOCK_HOOK", "ROOT_HOOK", "ROOT_ATTRIBUTE", "BranchStates", "CacheConflict", "HostState", "HyCaBlockHook",
           "HyCaRoot", "Run", "Steps", "calling_pipeline", "conflict_message", "fresh_engine", "other_cache",
           "register", "root_hook", "scheduler_run", "unregister"]


def register(transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
             engine: Any, family: Family, total_steps: Any = None, run_log_level: int = logging.INFO) -> HyCaRoot:
    """Hook ``engine`` into ``transformer``. ``total_steps``: a :class:`Steps` (what
    ``hyca.enable`` passes), or a callable ``(count_from_cache_context) -> count`` for a
    fixed count (the probe's). ``run_log_level``: the level of the line each finished run
    logs (the probe's candidate runs: ``logging.DEBUG``, the probe logs one summary)."""
    root = HyCaRoot(transformer, blocks, engine, family, total_steps if total_steps is not None else Steps(),
                    run_log_level)
    root.install(transformer)
    return root


def unregister(transformer: torch.nn.Module) -> bool:
    """Remove every HyCa hook; ``True`` when there was one."""
    root = root_hook(transformer)
    if root is None:
        return False
    root.uninstall(_uncompiled(transformer))
    return True


def _uncompiled(transformer: torch.nn.Module) -> torch.nn.Module:
    original = transformer.__dict__.get("_modules", {}).get("_orig_mod")
    return original if isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule) else transformer


def root_hook(transformer: torch.nn.Module) -> HyCaRoot | None:
    """The transformer's HyCa controller (through a ``torch.compile`` wrapper made after
    ``hyca.enable``), or ``None``."""
    transformer = _uncompiled(transformer)
    root = transformer.__dict__.get(ROOT_ATTRIBUTE)
    return root if isinstance(root, HyCaRoot) else None
