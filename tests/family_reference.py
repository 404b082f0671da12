"""A per-block reference of HyCa for any family, and an observer of which steps run.

Both use plain torch hooks on an unpatched pipeline and share nothing with HyCa's
hooks or table: the block streams come from each test case's own description
(tests/tiny_families.py), the forecast from per-block histories (references.py).

At a computed step every block runs and its output-stream residual is kept, per block.
At a skip step every block still runs (so text streams are really computed), but its
output stream is replaced by ``input + forecast of that block's residual``. The final
output then equals HyCa's (first block adds the summed forecast, the rest pass through)
exactly when nothing but the output stream reaches the output: the claim under test.

Branches: the k-th call at the same timestep is branch k (cond, uncond), per transformer.
A call with ``skip_layers`` set (SD3 skip-layer guidance) is left alone.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from references import per_block_forecast


def _timestep_of(args, kwargs) -> float:
    named = [kwargs[k] for k in ("timestep", "timesteps", "t") if k in kwargs]  # HiDream: timesteps
    timestep = named[0] if named else args[1]  # Z-Image's pipeline passes (x, t, cap_feats) positionally
    return float(torch.as_tensor(timestep).flatten()[0])


def _stream_in(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class _Calls:
    """Per transformer: which branch and step each call is; removable torch hooks."""

    def __init__(self):
        self.handles = []
        self.last_position, self.repeat = None, 0
        self.steps = defaultdict(int)  # branch -> calls so far
        self.branch, self.bypass = 0, False

    def begin(self, args, kwargs) -> None:
        self.bypass = kwargs.get("skip_layers") is not None
        if self.bypass:
            return
        position = _timestep_of(args, kwargs)
        self.repeat = self.repeat + 1 if position == self.last_position else 0
        self.last_position, self.branch = position, self.repeat
        self.timestep = position

    def end(self) -> None:
        if not self.bypass:
            self.steps[self.branch] += 1

    @property
    def step(self) -> int:
        return self.steps[self.branch]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _watch(transformer, calls: _Calls) -> None:
    calls.handles.append(transformer.register_forward_pre_hook(lambda m, a, k: calls.begin(a, k), with_kwargs=True))
    calls.handles.append(transformer.register_forward_hook(lambda m, a, o: calls.end()))


def observe_computed(case, pipe, run) -> dict[tuple[str, int], list[bool]]:
    """Run ``run()``; for each (transformer, branch), whether each call ran its first
    block (any of that block's submodules executing counts)."""
    found, watchers = defaultdict(list), []
    for expert in case.experts:
        transformer, calls = getattr(pipe, expert), _Calls()
        _watch(transformer, calls)
        first_block = getattr(transformer, case.streams[0][0])[0]
        ran = [False]
        calls.handles.append(transformer.register_forward_pre_hook(lambda m, a, k, r=ran: r.__setitem__(0, False),
                                                                   with_kwargs=True))

        def record(m, a, o, calls=calls, ran=ran, expert=expert):
            if not calls.bypass:
                found[(expert, calls.branch)].append(ran[0])

        calls.handles.append(transformer.register_forward_hook(record))
        for child in first_block.children():
            calls.handles.append(child.register_forward_hook(lambda m, a, o, r=ran: r.__setitem__(0, True)))
        watchers.append(calls)
    try:
        run()
    finally:
        for calls in watchers:
            calls.remove()
    return dict(found)


class Reference:
    """Install on an unpatched pipeline with :meth:`attach`; ``plans[(expert, branch)]``
    says which calls compute; ``profiles[expert]`` gives the per-dimension solvers."""

    def __init__(self, case, profiles: dict, plans: dict[tuple[str, int], list[bool]],
                 position_of=None):
        """``position_of(timestep)``: the solvers' axis; by default the call's step index."""
        self.case, self.profiles, self.plans, self.position_of = case, profiles, plans, position_of
        self.watchers: list[_Calls] = []

    def attach(self, pipe) -> None:
        for expert in self.case.experts:
            self._attach_one(expert, getattr(pipe, expert))

    def detach(self) -> None:
        for calls in self.watchers:
            calls.remove()

    def _attach_one(self, expert: str, transformer) -> None:
        calls = _Calls()
        self.watchers.append(calls)
        history = defaultdict(list)  # branch -> [(position, [residual per block])], newest first
        current: dict = {}
        dim_solvers = self.profiles[expert].dim_solvers()
        blocks = [(index, tail, block) for attribute, index, tail in self.case.streams
                  for block in getattr(transformer, attribute)]

        def begin(module, args, kwargs):
            calls.begin(args, kwargs)
            if not calls.bypass:
                current.update(computing=self.plans[(expert, calls.branch)][calls.step], residuals=[])

        def position() -> float:
            return float(calls.step) if self.position_of is None else self.position_of(calls.timestep)

        def end(module, args, output):
            if not calls.bypass and current["computing"]:
                history[calls.branch].insert(0, (position(), current["residuals"]))
            calls.end()

        def block_hook(l, index, tail):
            def hook(module, args, kwargs, output):
                if calls.bypass:
                    return None
                stream_in = _stream_in(args, kwargs)
                if l == 0:
                    current["tokens"] = stream_in.shape[1]
                out = output if index is None else output[index]
                part = {False: slice(None), True: slice(out.shape[1] - current["tokens"], None),
                        "head": slice(0, current["tokens"])}[tail]
                if current["computing"]:
                    current["residuals"].append((out - stream_in)[:, part])
                    return None
                past = history[calls.branch]
                predicted = per_block_forecast(dim_solvers[l:l + 1], [[r[l] for _, r in past]],
                                               [p for p, _ in past], position())
                replaced = out.clone()
                replaced[:, part] = stream_in[:, part] + predicted
                if index is None:
                    return replaced
                return tuple(replaced if i == index else o for i, o in enumerate(output))
            return hook

        calls.handles.append(transformer.register_forward_pre_hook(begin, with_kwargs=True))
        calls.handles.append(transformer.register_forward_hook(end))
        for l, (index, tail, block) in enumerate(blocks):
            calls.handles.append(block.register_forward_hook(block_hook(l, index, tail), with_kwargs=True))


def count_calls(case, pipe, run) -> dict[tuple[str, int], int]:
    """Calls per (transformer, branch) in ``run()``."""
    return {key: len(flags) for key, flags in observe_computed(case, pipe, run).items()}
