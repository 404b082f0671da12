"""The embedded reference model: a small text-to-image ``FluxTransformer2DModel`` trained on
procedural shapes, shipped in ``models/reference``. A demo and test model, not a
substitute for FLUX: it draws one coloured shape on a plain or two-tone background."""

from .pipeline import ReferencePipeline, load_pipeline, shipped_path
from .text import CaptionEncoder, CaptionTokenizer


def tiny_components(seed: int = 0) -> ReferencePipeline:
    """A random-weight pipeline of the same layout, smaller still: for fast wiring tests."""
    from .model import build
    from .pipeline import default_scheduler

    transformer, encoder = build(seed=seed, heads=2, head_dim=16, double=1, single=1, text_dim=32)
    pipe = ReferencePipeline(transformer=transformer.eval(), text_encoder=encoder.eval(),
                             scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["CaptionEncoder", "CaptionTokenizer", "ReferencePipeline", "load_pipeline", "shipped_path",
           "tiny_components"]
