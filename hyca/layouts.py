"""How a transformer block's inputs and outputs are laid out: the one vocabulary every host
(diffusers, the WebUIs, ComfyUI) describes its block lists in. Pure data, no host import.

A :class:`Layout` answers three questions about one kind of block: which input is the
stream that reaches the transformer's output (its residual is what HyCa caches), where
that stream's image tokens sit in the sequence the block sees (all of it, or the tail /
head of a concatenated text-and-image sequence), and what the block returns (one tensor,
or a tuple naming, per position, the input it updates). Argument names are the host's own
(diffusers' ``hidden_states``, the ComfyUI-lineage ``img`` / ``txt``); a host maps each
layout it uses to its hook function in one place (the diffusers block hook reads the
layout directly; :data:`hyca.adapters.webui.kinds.GATES` / ``PATCHES`` for the WebUIs and
ComfyUI). A new model is one row of a host's table naming a layout from here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Where the output stream's tokens sit in the sequence a block sees.
ALL, TAIL, HEAD = "all", "tail", "head"


@dataclass(frozen=True)
class Layout:
    """``returns``: for each output position of a block, the name of the input argument it
    updates (a plain string when the block returns one tensor). ``stream``: the input that
    reaches the output; its residual is what HyCa caches.

    ``stream_tokens``: :data:`TAIL` when the block sees text and image tokens concatenated
    ``[text, image]`` and only the last tokens, as many as the first block's stream has,
    reach the output (FLUX.2 / Chroma single blocks); :data:`HEAD` the same with
    ``[image, text]`` (HiDream / HunyuanVideo single blocks); :data:`ALL` otherwise.
    ``text_dropped_if``: a block attribute (a dotted path) which, when true, makes every
    output but the stream ``None`` (SD3's last joint block, ``pre_only``)."""

    returns: tuple[str, ...] | str
    stream: str
    stream_tokens: str = ALL
    text_dropped_if: str | None = None


@dataclass(frozen=True)
class BlockList:
    """One list of blocks in a host's table: ``attribute``, the ``nn.ModuleList`` on the
    model (run in table order), and the :class:`Layout` of its blocks. ``dit_key``: the
    ``patches_replace["dit"]`` key the list answers to where the host offers one (ComfyUI,
    Forge Neo; ``("double_block", i)``), None where its blocks are wrapped instead."""

    attribute: str
    layout: Layout
    dit_key: str | None = None

    # The layout's facts read off the list, as every hook asks them.
    @property
    def returns(self) -> tuple[str, ...] | str:
        return self.layout.returns

    @property
    def stream(self) -> str:
        return self.layout.stream

    @property
    def stream_tokens(self) -> str:
        return self.layout.stream_tokens

    @property
    def text_dropped_if(self) -> str | None:
        return self.layout.text_dropped_if


def text_dropped(layout: Layout, block: object) -> bool:
    """Whether ``block`` hands back no text stream (see :attr:`Layout.text_dropped_if`)."""
    if layout.text_dropped_if is None:
        return False
    value: object = block
    for part in layout.text_dropped_if.split("."):
        value = getattr(value, part, None)
    return bool(value)


# --- the ComfyUI-lineage layouts (ComfyUI, Forge, Forge Neo, A1111's SD3) -----------------
# Argument names as those frontends' block forwards and ``patches_replace["dit"]`` dicts
# spell them (``comfy/ldm/flux/layers.py``, Forge ``backend/nn/flux.py``).

#: ``img, txt = block(img=, txt=)`` / ``{"img", "txt"} -> {"img", "txt"}``: FLUX and Chroma
#: double blocks, Qwen-Image, ComfyUI's SD3 joint blocks, HunyuanVideo double blocks.
IMG_TXT = Layout(returns=("img", "txt"), stream="img")
#: ``context, x = block(context, x, c=)``: SD3 / SD3.5 joint blocks in Forge and A1111; the
#: last one is ``pre_only`` and hands back no context.
JOINT = Layout(returns=("context", "x"), stream="x", text_dropped_if="context_block.pre_only")
#: ``x = block(cat(txt, img))``: FLUX / Chroma single blocks; the image tokens at the tail.
CONCAT_TAIL = Layout(returns="img", stream="img", stream_tokens=TAIL)
#: ``x = block(cat(img, txt))``: HunyuanVideo single blocks; the image tokens at the head.
CONCAT_HEAD = Layout(returns="img", stream="img", stream_tokens=HEAD)
#: ``x = layer(x, ...)`` over one joint token stream, cached whole (Lumina2 / Z-Image).
SINGLE = Layout(returns="x", stream="x")
#: ``{"img", ...} -> {"img"}`` over the image stream alone (Wan blocks).
IMG = Layout(returns="img", stream="img")
