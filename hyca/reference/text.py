"""The reference model's text side: a word tokenizer over the caption vocabulary and a small
learned encoder that produces FLUX's two conditioning inputs.

``encoder_hidden_states`` (batch, max_length, joint_dim) feed the transformer's text stream;
``pooled_projections`` (batch, pooled_dim) feed its AdaLN modulation, as CLIP's pooled
output does in FLUX. The vocabulary lives in the encoder's config, so the saved folder
is self-contained.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import data

PAD = "<pad>"


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, padding first (id 0)."""
    words = {"a", "at", "the", "on", "and", "background"}
    for names in (data.COLOUR_NAMES, data.BACKGROUND_NAMES, data.SHAPES, data.SIZE_NAMES, data.POSITION_NAMES):
        for name in names:
            words.update(name.split())
    return [PAD, *sorted(words)]


class CaptionTokenizer:
    """Lower-cased whitespace words to ids, padded or cut to ``max_length``."""

    def __init__(self, vocabulary: list[str], max_length: int) -> None:
        self.vocabulary = list(vocabulary)
        self.max_length = max_length
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for caption in captions:
            words = caption.lower().replace(",", " ").split()
            unknown = sorted({w for w in words if w not in self.ids})
            if unknown:
                raise ValueError(
                    f"the reference model does not know the words {unknown}; it understands only "
                    f"{self.vocabulary[1:]} (captions like 'a small red circle at the top left on a white background')")
            if len(words) > self.max_length:
                raise ValueError(f"caption has {len(words)} words, the reference model reads at most {self.max_length}")
            rows.append([self.ids[w] for w in words] + [0] * (self.max_length - len(words)))
        return torch.tensor(rows, dtype=torch.long)


class CaptionEncoder(ModelMixin, ConfigMixin):
    """Embeddings + a few pre-norm transformer layers; pooled output is the masked mean."""

    @register_to_config
    def __init__(self, vocabulary: list[str] | None = None, max_length: int = 16, width: int = 64,
                 layers: int = 2, heads: int = 4, joint_dim: int = 64, pooled_dim: int = 64) -> None:
        super().__init__()
        vocabulary = vocabulary or caption_vocabulary()
        self.embed = nn.Embedding(len(vocabulary), width)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.to_hidden = nn.Linear(width, joint_dim)
        self.to_pooled = nn.Linear(width, pooled_dim)
        nn.init.normal_(self.position, std=0.02)

    @property
    def tokenizer(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.config.vocabulary or caption_vocabulary(), self.config.max_length)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Padding is attended to (no key mask): the empty caption, all padding, is the
        # unconditional input for guidance and needs a well-defined encoding.
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.blocks(x))
        keep = (ids != 0).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.to_hidden(x), self.to_pooled(pooled)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self.tokenizer(captions).to(self.device))
