"""An independent reference for HyCa in the WebUI stand-ins, built only from plain torch
hooks on an unpatched model and the solver weights (tested on their own).

What it restates, from the issue and docs/design.md: a call belongs to step ``k`` of the pass's
sigma schedule when ``s_k >= sigma > s_{k+1}`` (position ``k`` plus the fraction of the
way to ``s_{k+1}``); each branch (cond / uncond, told apart by the order of calls at one
sigma) keeps every block's residual of the stream that reaches the output, measured
against a copy of the block's input taken before the call (blocks may update their input
in place, as Forge Neo's FLUX blocks do); the first call of a computed step stores them; a
forecast call replaces every block by a pass-through, the first block that runs in the
call adding the per-block forecast (``references.per_block_forecast``); blocks that never
run contribute nothing. Computed steps follow the plan written out in ``expected_plan``.
"""

from __future__ import annotations

from typing import Any

import torch

from references import expected_plan, per_block_forecast

# Per model kind: block lists, and for each list how a block's stream comes in, goes out
# and is handed on when skipped. ``n`` is the image-token count seen at the first list.
LAYOUTS: dict[str, list[tuple[str, Any, Any, Any]]] = {}


FLUX_LIKE = [
    ("double_blocks", lambda a, k, n: k["img"], lambda o, n: o[0], lambda a, k, s, first, n: (s, k["txt"])),
    ("single_blocks", lambda a, k, n: a[0][:, -n:], lambda o, n: o[:, -n:],
     lambda a, k, s, first, n: torch.cat((a[0][:, :-n], s), 1)),  # a[0] may have been written in place
]
JOINT = [("joint_blocks", lambda a, k, n: a[1], lambda o, n: o[1], None)]  # hand-on depends on pre_only
LAYOUTS.update({
    "forge_flux": FLUX_LIKE, "forge_chroma": FLUX_LIKE, "neo_flux": FLUX_LIKE,
    "forge_mmditx": JOINT, "a1111_sd3": JOINT,
    "neo_qwen": [("transformer_blocks", lambda a, k, n: k["hidden_states"], lambda o, n: o[1],
                  lambda a, k, s, first, n: (k["encoder_hidden_states"], s))],
    "neo_wan": [("blocks", lambda a, k, n: a[0], lambda o, n: o, lambda a, k, s, first, n: s)],
    "neo_lumina": [("layers", lambda a, k, n: a[0], lambda o, n: o, lambda a, k, s, first, n: s)],
})


def locate(sigma: float, schedule: list[float]) -> tuple[int, float]:
    for k in range(len(schedule) - 1):
        if abs(sigma - schedule[k]) < 1e-6:
            return k, 0.0
        if schedule[k] > sigma > schedule[k + 1] + 1e-6:
            return k, (schedule[k] - sigma) / (schedule[k] - schedule[k + 1])
    raise AssertionError(f"sigma {sigma} not on the schedule {schedule}")


class ReferenceHyCa:
    def __init__(self, model, kind: str, dim_solvers: torch.Tensor, interval: int, warmup: int,
                 branches: int, timestep_multiplier: float, compute_last: bool = True, depth: int = 4):
        self.model, self.kind, self.dim_solvers = model, kind, dim_solvers
        self.interval, self.warmup, self.compute_last = interval, warmup, compute_last
        self.branches, self.multiplier, self.depth = branches, timestep_multiplier, depth
        self.blocks = [(spec, b) for spec in LAYOUTS[kind] for b in getattr(model, spec[0])]
        self.handles = []
        self.computed_steps: list[int] = []

    def start_pass(self, schedule: list[float]) -> None:
        self.schedule, self.plan = schedule, expected_plan(len(schedule) - 1, self.interval, self.warmup, self.compute_last)
        self.state: dict[int, dict] = {}
        self.sigma, self.ordinal = None, 0

    def __enter__(self):
        self.handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._end, with_kwargs=True))
        for index, (spec, block) in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._block_pre_hook(index, spec), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._block_hook(index, spec, block), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _place(self, args, kwargs) -> tuple[dict, float, bool]:
        """This model call's branch state (its step's decision made on the step's first
        call), its position (step plus fraction) and whether it begins its step."""
        t = args[1] if len(args) > 1 else next(kwargs[k] for k in ("timestep", "timesteps", "t") if k in kwargs)
        sigma = float(t.flatten()[0]) / self.multiplier
        if self.sigma is None or abs(sigma - self.sigma) > 1e-7:
            self.sigma, self.ordinal = sigma, 0
        branch = self.state.setdefault(self.ordinal % self.branches, {"history": [], "began": -1})
        self.ordinal += 1
        k, fraction = locate(sigma, self.schedule)
        first = k > branch["began"]
        if first:
            branch["began"], branch["decision"] = k, self.plan[k] or not branch["history"]
        return branch, k + fraction, first

    def _begin(self, module, args, kwargs):
        branch, position, first = self._place(args, kwargs)
        k = int(position)
        if first and branch["decision"]:
            self.computed_steps.append(k)
        self.call = {"branch": branch, "position": position, "store": first and branch["decision"],
                     "compute": branch["decision"], "residuals": {}, "n": None, "added": False}
        if not self.call["compute"]:
            recent = branch["history"][: self.depth]
            zero = torch.zeros_like(next(iter(recent[0][1].values())))
            per_block = [[res.get(l, zero) for _, res in recent] for l in range(len(self.blocks))]
            self.call["forecast"] = per_block_forecast(self.dim_solvers, per_block, [p for p, _ in recent],
                                                       self.call["position"])

    def _end(self, module, args, kwargs, output):
        call = self.call
        if call["store"]:
            call["branch"]["history"].insert(0, (call["position"], call["residuals"]))

    def _block_pre_hook(self, index, spec):
        stream_in = spec[1]

        def hook(module, args, kwargs):
            call = self.call
            if call["n"] is None:  # the first block that runs in this call
                call["n"] = stream_in(args, kwargs, None).shape[1]
            call["before"] = stream_in(args, kwargs, call["n"]).clone()

        return hook

    def _block_hook(self, index, spec, block):
        _, stream_in, stream_out, hand_on = spec
        pre_only = bool(getattr(getattr(block, "context_block", None), "pre_only", False))

        def hook(module, args, kwargs, output):
            call = self.call
            n, s_in = call["n"], call["before"]
            if call["compute"]:
                call["residuals"][index] = stream_out(output, n) - s_in
                return output
            first = not call["added"]
            call["added"] = True
            s = s_in + call["forecast"].to(s_in.dtype) if first else s_in
            if hand_on is None:  # joint blocks
                return (None if pre_only else args[0], s)
            return hand_on(args, kwargs, s, first, n)

        return hook


class _CallReference:
    """What the one-"block" references share: calls placed on steps and branches as
    :class:`ReferenceHyCa` places them, one history per branch, ``decisions`` per call."""

    def __init__(self, model, dim_solvers: torch.Tensor, interval: int, warmup: int, branches: int,
                 timestep_multiplier: float, compute_last: bool = True, depth: int = 4):
        self.model, self.dim_solvers = model, dim_solvers
        self.interval, self.warmup, self.compute_last = interval, warmup, compute_last
        self.branches, self.multiplier, self.depth = branches, timestep_multiplier, depth
        self.handles = []
        self.decisions: list[bool] = []

    start_pass = ReferenceHyCa.start_pass

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _begin(self, module, args, kwargs):
        branch, position, first = ReferenceHyCa._place(self, args, kwargs)
        self.call = {"branch": branch, "position": position, "store": first and branch["decision"],
                     "compute": branch["decision"]}
        self.decisions.append(branch["decision"])

    def _forecast(self) -> torch.Tensor:
        call = self.call
        recent = call["branch"]["history"][: self.depth]
        return per_block_forecast(self.dim_solvers, [[v for _, v in recent]], [p for p, _ in recent], call["position"])


class HeadReference(_CallReference):
    """The output-head target (``target="output"``) written out with plain torch hooks on an
    unpatched model: the call that begins a computed step stores the head's input (the
    input of the final linear map, ``head``); on a forecast call the head runs on the
    per-dimension forecast of the stored inputs, and the blocks run as they are: on such a
    call nothing the blocks do reaches the output."""

    def __init__(self, model, head, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.head = head

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        self.head.register_forward_pre_hook(self._head)]
        return self

    def _head(self, module, args):
        call, x = self.call, args[0]
        if call["compute"]:
            if call["store"]:
                call["branch"]["history"].insert(0, (call["position"], x.clone()))
            return None
        return (self._forecast().to(x.dtype),)


class ModelOutputReference(_CallReference):
    """The model-output target (``target="model_output"``) written out with plain torch
    hooks on an unpatched diffusion model: the call that begins a computed step stores the
    model's output (the transformer's flow-matching velocity, ``(batch, channels,
    *spatial)``); a forecast call's output is replaced by the per-channel forecast of the
    stored outputs (one "block" whose dimensions are the latent channels)."""

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        self.model.register_forward_hook(self._end)]
        return self

    def _end(self, module, args, output):
        call = self.call
        if call["compute"]:
            if call["store"]:
                channels_last = output.float().reshape(output.shape[0], output.shape[1], -1).transpose(1, 2)
                call["branch"]["history"].insert(0, (call["position"], channels_last.clone()))
            return None
        return self._forecast().transpose(1, 2).reshape(output.shape).to(output.dtype)
