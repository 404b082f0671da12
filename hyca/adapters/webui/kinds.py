"""The WebUI and ComfyUI hook function for each block layout (:mod:`hyca.layouts`): how a
block of that layout is called and what it returns, where the stream that reaches the
output comes in and goes out, and what a skipped block hands on: its inputs as they
came (``passthrough(None)``), or, for the first block that runs in a forecast call, its
stream with the forecast added (``passthrough(stream)``).

Two hook styles: ``gate_*`` functions wrap a block's own ``forward`` (see gates.py);
``patch_*`` functions are ComfyUI-style ``patches_replace["dit"]`` entries,
``fn(args: dict, extra: {"original_block": fn}) -> dict``, chained with any patch that
was already there. Both ask ``session_of()`` for the pass in progress and stay out of
the way when there is none. :data:`GATES` and :data:`PATCHES` at the end are the one
place a layout meets its hook function.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ... import layouts
from ...layouts import Layout
from .session import HyCaFailure, PassSession

SessionOf = Callable[[], "PassSession | None"]


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else args[position]


def _image_tokens(call: Any, index: int) -> int:
    tokens = call.image_tokens
    if tokens is None:
        raise HyCaFailure(f"block {index} found no image-stream length (no dual-stream block ran first)")
    return tokens


# --- gates: wrappers of a block's forward ----------------------------------------------

def gate_img_txt(session_of: SessionOf, index: int, block: torch.nn.Module) -> Callable[..., Any]:
    """``img, txt = block(img=, txt=, ...)`` (Forge FLUX / Chroma double blocks)."""

    def gate(original, *args, **kwargs):
        session = session_of()
        if session is None or session.active is None:
            return original(*args, **kwargs)
        img, txt = _arg(args, kwargs, "img", 0), _arg(args, kwargs, "txt", 1)
        session.active.image_tokens = img.shape[1]
        return session.block(index, img, lambda: original(*args, **kwargs), lambda out: out[0],
                             lambda stream: (img if stream is None else stream, txt))

    return gate


def gate_concat_tail(session_of: SessionOf, index: int, block: torch.nn.Module) -> Callable[..., Any]:
    """``x = block(cat(txt, img), ...)`` (FLUX / Chroma single blocks): only the image
    tokens at the tail reach the output, so only their residual is kept."""

    def gate(original, *args, **kwargs):
        session = session_of()
        if session is None or session.active is None:
            return original(*args, **kwargs)
        x = _arg(args, kwargs, "img", 0) if ("img" in kwargs or args) else kwargs["x"]
        n = _image_tokens(session.active, index)
        return session.block(index, x[:, -n:], lambda: original(*args, **kwargs), lambda out: out[:, -n:],
                             lambda stream: x if stream is None else torch.cat((x[:, :-n], stream), 1))

    return gate


def gate_joint(session_of: SessionOf, index: int, block: torch.nn.Module) -> Callable[..., Any]:
    """``context, x = block(context, x, c=)`` (SD3 / SD3.5 joint blocks; the last one is
    ``pre_only`` and hands back no context)."""
    pre_only = layouts.text_dropped(layouts.JOINT, block)

    def gate(original, *args, **kwargs):
        session = session_of()
        if session is None or session.active is None:
            return original(*args, **kwargs)
        context, x = _arg(args, kwargs, "context", 0), _arg(args, kwargs, "x", 1)
        return session.block(index, x, lambda: original(*args, **kwargs), lambda out: out[1],
                             lambda stream: (None if pre_only else context, x if stream is None else stream))

    return gate


def gate_single(session_of: SessionOf, index: int, block: torch.nn.Module) -> Callable[..., Any]:
    """``x = layer(x, ...)`` over one joint token stream (Lumina2 / Z-Image layers)."""

    def gate(original, *args, **kwargs):
        session = session_of()
        if session is None or session.active is None:
            return original(*args, **kwargs)
        x = _arg(args, kwargs, "x", 0)
        return session.block(index, x, lambda: original(*args, **kwargs), lambda out: out,
                             lambda stream: x if stream is None else stream)

    return gate


def gate_head(session_of: SessionOf) -> Callable[..., Any]:
    """The output head, ``out = head(x)`` (a linear map; the adapter's ``head``): on a pass
    whose engine forecasts the head's input, ``x`` is recorded on a computed call and
    replaced by the forecast on a forecast call (:meth:`PassSession.head_input`); on any
    other pass the head runs as it is. Upstream calls it positionally (``self.linear(x)``,
    ``self.proj_out(hidden_states)``, ``self.head(...)``); torch's ``Linear`` names the
    argument ``input``, Forge's ``ForgeOperations.Linear`` ``x``."""

    def gate(original, *args, **kwargs):
        session = session_of()
        if session is None or session.active is None:
            return original(*args, **kwargs)
        name = None if args else next((n for n in ("input", "x") if n in kwargs), None)
        if not args and name is None:  # an unknown calling convention: the head is left alone, and a
            return original(*args, **kwargs)  # recording or forecast call then fails in end_call, said once
        forecast = session.head_input(args[0] if args else kwargs[name])
        if forecast is None:
            return original(*args, **kwargs)
        return original(forecast, *args[1:], **kwargs) if args else original(**{**kwargs, name: forecast})

    return gate


# --- replace patches: patches_replace["dit"] entries -------------------------------------

def _patch(session_of: SessionOf, index: int, previous: Callable | None, stream_of: Callable[[dict, Any], torch.Tensor],
           out_stream: Callable[[dict, Any], torch.Tensor], passthrough: Callable[[dict, torch.Tensor | None], dict],
           on_call: Callable[[dict, Any], None] | None = None) -> Callable[[dict, dict], dict]:
    def run(args: dict, extra: dict) -> dict:
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def patch(args: dict, extra: dict) -> dict:
        session = session_of()
        if session is None or session.active is None:
            return run(args, extra)
        call = session.active
        if on_call is not None:
            on_call(args, call)
        return session.block(index, stream_of(args, call), lambda: run(args, extra),
                             lambda out: out_stream(out, call), lambda stream: passthrough(args, stream))

    return patch


def _note_tokens(args: dict, call: Any) -> None:
    call.image_tokens = args["img"].shape[1]


def patch_img_txt(session_of: SessionOf, index: int, previous: Callable | None) -> Callable[[dict, dict], dict]:
    """``{"img", "txt", ...} -> {"img", "txt"}`` (Neo FLUX double blocks, Qwen-Image)."""
    return _patch(session_of, index, previous, lambda a, c: a["img"], lambda o, c: o["img"],
                  lambda a, s: {"img": a["img"] if s is None else s, "txt": a["txt"]}, _note_tokens)


def patch_img(session_of: SessionOf, index: int, previous: Callable | None) -> Callable[[dict, dict], dict]:
    """``{"img", ...} -> {"img"}`` over the image stream alone (Wan blocks)."""
    return _patch(session_of, index, previous, lambda a, c: a["img"], lambda o, c: o["img"],
                  lambda a, s: {"img": a["img"] if s is None else s})


def patch_concat_tail(session_of: SessionOf, index: int, previous: Callable | None) -> Callable[[dict, dict], dict]:
    """``{"img": cat(txt, img), ...} -> {"img"}`` (Neo FLUX single blocks)."""

    def passthrough(args: dict, stream: torch.Tensor | None) -> dict:
        x = args["img"]
        return {"img": x if stream is None else torch.cat((x[:, :-stream.shape[1]], stream), 1)}

    return _patch(session_of, index, previous, lambda a, c: a["img"][:, -_image_tokens(c, index):],
                  lambda o, c: o["img"][:, -_image_tokens(c, index):], passthrough)


def patch_concat_head(session_of: SessionOf, index: int, previous: Callable | None) -> Callable[[dict, dict], dict]:
    """``{"img": cat(img, txt), ...} -> {"img"}`` (ComfyUI HunyuanVideo single blocks): only
    the image tokens at the head reach the output, so only their residual is kept. The image
    length is the double blocks' image stream (noted by :func:`patch_img_txt`)."""

    def passthrough(args: dict, stream: torch.Tensor | None) -> dict:
        x = args["img"]
        return {"img": x if stream is None else torch.cat((stream, x[:, stream.shape[1]:]), 1)}

    return _patch(session_of, index, previous, lambda a, c: a["img"][:, :_image_tokens(c, index)],
                  lambda o, c: o["img"][:, :_image_tokens(c, index)], passthrough)


# --- the one place a layout meets its hook function ---------------------------------------

#: Style "gate": ``GATES[layout](session_of, index, block)`` wraps that block's forward.
GATES: dict[Layout, Callable[[SessionOf, int, torch.nn.Module], Callable[..., Any]]] = {
    layouts.IMG_TXT: gate_img_txt, layouts.CONCAT_TAIL: gate_concat_tail, layouts.JOINT: gate_joint,
    layouts.SINGLE: gate_single,
}
#: Style "replace": ``PATCHES[layout](session_of, index, previous)`` is the block's
#: ``patches_replace["dit"]`` entry, chained with ``previous``.
PATCHES: dict[Layout, Callable[[SessionOf, int, Callable | None], Callable[[dict, dict], dict]]] = {
    layouts.IMG_TXT: patch_img_txt, layouts.CONCAT_TAIL: patch_concat_tail, layouts.CONCAT_HEAD: patch_concat_head,
    layouts.IMG: patch_img,
}
