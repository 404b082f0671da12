"""Straightforward reference implementations the engine is checked against.

They share nothing with the engine but the solver weights (tested on their own in
test_solvers.py): residuals are captured with plain torch forward hooks on an unpatched
model, kept per block, and a skip step is rebuilt from FLUX's own layers.
"""

from __future__ import annotations

import math

import torch

from hyca.math.solvers import pool


def flux_blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def capture_residuals(model, call):
    """Run ``call()`` on an unpatched FLUX model; return its output and each block's
    image-stream residual (output minus input)."""
    residuals, handles = [], []

    def hook(module, args, kwargs, output):
        residuals.append(output[1] - kwargs["hidden_states"])

    for block in flux_blocks(model):
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        out = call()
    finally:
        for h in handles:
            h.remove()
    return out, residuals


def flux_output_with_residual(model, inputs, x, sigma, total_residual):
    """FLUX's forward with the block stack replaced by ``h_in + total_residual``."""
    hidden = model.x_embedder(x)
    timestep = sigma.expand(inputs.batch).to(hidden.dtype) * 1000
    temb = model.time_text_embed(timestep, inputs.pooled)
    return model.proj_out(model.norm_out(hidden + total_residual, temb))


class TaylorSeerFactors:
    """TaylorSeer's per-module factor update and prediction, on tensors."""

    def __init__(self, order):
        self.order, self.factors, self.last = order, {}, None

    def update(self, feature, position):
        new = {0: feature}
        if self.last is not None:
            for i in range(self.order):
                if i not in self.factors:
                    break
                new[i + 1] = (new[i] - self.factors[i]) / (position - self.last)
        self.factors, self.last = new, position

    def predict(self, position):
        offset = position - self.last
        return sum(f * offset**i / math.factorial(i) for i, f in self.factors.items())


def expected_plan(steps: int, interval: int, warmup: int, compute_last: bool = True) -> list[bool]:
    """Which of ``steps`` steps (or calls) compute, written out rather than taken from
    ``Schedule``: ``warmup`` steps first, the last of them opening a cycle of ``interval``,
    and the final step unless ``compute_last`` is off."""
    computed = set(range(warmup)) | set(range(warmup - 1, steps, interval)) | ({steps - 1} if compute_last else set())
    return [i in computed for i in range(steps)]


def per_block_forecast(dim_solvers, histories, positions, target):
    """Forecast every block's residual with its own history and per-dimension weights,
    then sum: the form the aggregated engine must equal (docs/design.md, section 4)."""
    total = 0
    for block_solvers, history in zip(dim_solvers, histories):
        depth = len(history)
        weights = torch.zeros(depth, block_solvers.shape[0])
        for d, s in enumerate(block_solvers.tolist()):
            w = pool()[s].weights(positions[:depth], target)
            weights[: len(w), d] = torch.tensor(w, dtype=torch.float32)
        total = total + sum(weights[j] * history[j] for j in range(depth))
    return total


def block_step_mean_error(residuals, solver_id, plan, axis):
    """Relative error per (block, target step), averaged with the probe's weight
    target / steps for each step."""
    solver, values, weights = pool()[solver_id], [], []
    for target in range(len(plan)):
        if plan[target]:
            continue
        used = [k for k in range(target) if plan[k]][::-1][: solver.history]
        w = solver.weights([axis[k] for k in used], axis[target])
        forecast = sum(wj * residuals[k] for wj, k in zip(w, used))
        values.append(((forecast - residuals[target]) ** 2).sum((1, 2)) / (residuals[target] ** 2).sum((1, 2)))
        weights.append(target / len(plan))
    weights = torch.tensor(weights, dtype=values[0].dtype).unsqueeze(1)
    return float((torch.stack(values) * weights).sum() / (weights.sum() * values[0].numel()))
