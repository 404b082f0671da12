"""The model-output target (:data:`hyca.engine.targets.MODEL_OUTPUT`) on a frontend's model call.

A frontend's model call returns the denoised latent (Forge / Neo ``KModel.apply_model``,
ComfyUI ``comfy/model_base.py`` ``BaseModel.apply_model``) or the flow-matching velocity
(A1111's SD3 ``MMDiT.forward``). The engine records and forecasts one quantity for both:
the ODE derivative ``d = (x - denoised) / sigma`` (k-diffusion's ``to_d``). For the
flow-matching models these hosts run (``denoised = x - sigma * v``) that is the
transformer's velocity output, the tensor diffusers' TaylorSeer lite mode and the diffusers
root's model-output target forecast; here it is in the latent's own layout
``(batch, channels, *spatial)``, so a profile's clusters are latent channels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...engine.state import NON_FINITE, NonFiniteForecast
from ...engine.targets import as_tokens, from_tokens

#: What a frontend's model call returns: the denoised latent, or the derivative itself.
OUTPUTS = ("denoised", "velocity")


def sigma_rows(sigma: Any, x: torch.Tensor) -> torch.Tensor | float:
    """``sigma`` broadcastable against ``x``: a per-row tensor ``(batch,)`` as
    ``(batch, 1, ...)``, a scalar as a float. Raises ``ValueError`` for a zero sigma (the
    derivative is undefined there; samplers never call the model at sigma 0)."""
    if isinstance(sigma, torch.Tensor) and sigma.numel() == x.shape[0] and sigma.numel() > 1:
        rows = sigma.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
        if bool((rows == 0).any()):
            raise ValueError("a model call at sigma 0 has no derivative to forecast")
        return rows
    value = float(torch.as_tensor(sigma).flatten()[0])
    if value == 0.0:
        raise ValueError("a model call at sigma 0 has no derivative to forecast")
    return value


def derivative_tokens(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float, output: str) -> torch.Tensor:
    """The call's output as the engine records it: the derivative ``(batch, tokens,
    channels)`` in float32. ``out`` and ``x``: ``(batch, channels, *spatial)``."""
    if output not in OUTPUTS:
        raise ValueError(f"a model call returns one of {OUTPUTS}, got {output!r}")
    d = out.float() if output == "velocity" else (x.float() - out.float()) / sigma
    return as_tokens(d)


def output_from_tokens(tokens: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float, output: str,
                       dtype: torch.dtype) -> torch.Tensor:
    """Undo :func:`derivative_tokens` for a forecast: the model call's output (``x``'s
    shape, ``dtype``) whose derivative is ``tokens``."""
    d = from_tokens(tokens, x.float())
    return (d if output == "velocity" else x.float() - sigma * d).to(dtype)


class ModelOutputs:
    """One session's model-output calls: what its engine records and forecasts, and the
    dtype the model call returns (a forecast call, which runs no model, returns that)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.dtype: torch.dtype | None = None

    def check_width(self, x: torch.Tensor) -> None:
        """``ValueError`` when the profile forecasts another channel count than the call's
        latent ``x`` has (its output has ``x``'s shape): said before the model runs."""
        profile = self.engine.profile
        if profile is not None and x.dim() >= 3 and profile.dim != x.shape[1]:
            raise ValueError(f"the profile forecasts {profile.dim} output channels, the model call gives "
                             f"{x.shape[1]}: make a profile for this model on this frontend")

    def forecasts(self, parts: Sequence[tuple[slice, Any]]) -> dict[int, torch.Tensor | None]:
        """Per forecasting part (by index in ``parts``): the engine's forecast, or None where it
        is not finite (a second-order sampler's call between steps: that call's rows are then
        the model's own; the engine counts it, the stats say so)."""
        found: dict[int, torch.Tensor | None] = {}
        for i, (_, part) in enumerate(parts):
            if part.computing:
                continue
            try:
                found[i] = self.engine.predicted_residual(part.branch.state)
            except NonFiniteForecast:
                found[i] = None
                self.engine.note(part.branch.state, NON_FINITE)
        return found

    def record_and_assemble(self, parts: Sequence[tuple[slice, Any]], x: torch.Tensor, sigma: Any,
                            out: torch.Tensor | None, output: str,
                            forecasts: dict[int, torch.Tensor | None]) -> torch.Tensor | None:
        """``parts``: the rows of the call's batch and each one's branch call (``record``,
        ``computing``, ``branch.state``); ``out``: the model call's output (None: it did not
        run, every part forecasts); ``forecasts``: :meth:`forecasts`. Each recording part's
        rows are recorded as block 0; each forecasting part's rows are its forecast (the
        model's own where it has none). Returns the call's output. The width was checked
        before the model ran (:meth:`check_width`)."""
        rows_sigma = sigma_rows(sigma, x)
        of = lambda rows: rows_sigma[rows] if isinstance(rows_sigma, torch.Tensor) else rows_sigma  # noqa: E731
        for rows, part in parts:
            if part.record:
                self.dtype = out.dtype
                self.engine.record(part.branch.state, 0, derivative_tokens(out[rows], x[rows], of(rows), output))
        if not forecasts:
            return out
        dtype = out.dtype if out is not None else self.dtype or x.dtype
        result = torch.empty_like(x, dtype=dtype) if out is None else out.clone()
        for i, tokens in forecasts.items():
            rows = parts[i][0]
            result[rows] = out[rows].to(dtype) if tokens is None else output_from_tokens(tokens, x[rows], of(rows),
                                                                                         output, dtype)
        return result
