"""A pixel-statistics checker: what colour is the shape, where is it, is it filled, how saturated.

It knows nothing about the model, only the palette of ``data.py``: shape colours and
background colours are disjoint, so each pixel is labelled with its nearest palette
entry; the pixels labelled with a shape colour are the shape. The majority shape colour
is the shape's colour, and the centroid of those pixels, snapped to the nearest nominal
centre, is its position. On the generator's own images it must agree with the labels
(tests check this), which is what makes it a fair judge of the model's images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import data

MIN_PIXELS = 6  # fewer shape-coloured pixels than this: no shape found
COLOURED = 0.15  # HSV saturation above which a pixel counts as coloured (backgrounds are gray)

_PALETTE = np.array(list(data.SHAPE_COLOURS.values()) + list(data.BACKGROUND_COLOURS.values()), dtype=np.float32)
_CENTRES = np.array(list(data.POSITIONS.values()), dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    colour: str | None  # majority shape colour, None if no shape found
    position: str | None  # nearest nominal position of the shape's centroid
    pixels: int  # pixels of the majority shape colour
    centre_filled: float  # fraction of the 3x3 pixels at the centroid that are shape-coloured
    saturation: float  # mean HSV saturation of coloured pixels (0 if none)


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Accept (H, W, 3) uint8 or float in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index of each pixel's nearest palette entry; < len(SHAPE_COLOURS) means shape."""
    pixels = as_uint8(image).astype(np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def saturation(image: np.ndarray) -> float:
    rgb = as_uint8(image).astype(np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    s = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0)
    coloured = s[s > COLOURED]
    return float(coloured.mean()) if coloured.size else 0.0


def read(image: np.ndarray) -> Reading:
    labels = palette_labels(image)
    counts = np.bincount(labels.ravel(), minlength=len(_PALETTE))[: len(data.SHAPE_COLOURS)]
    sat = saturation(image)
    best = int(counts.argmax())
    if counts[best] < MIN_PIXELS:
        return Reading(None, None, int(counts[best]), 0.0, sat)
    ys, xs = np.nonzero(labels == best)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    position = data.POSITION_NAMES[int(((_CENTRES - centroid) ** 2).sum(-1).argmin())]
    cx, cy = int(centroid[0]), int(centroid[1])
    window = labels[max(cy - 1, 0): cy + 2, max(cx - 1, 0): cx + 2]
    filled = float((window < len(data.SHAPE_COLOURS)).mean())
    return Reading(data.COLOUR_NAMES[best], position, int(counts[best]), filled, sat)


def adherence(images: np.ndarray, scenes: data.Scenes) -> dict[str, float]:
    """Fractions of images whose checked colour / position / both match the labels."""
    readings = [read(im) for im in images]
    colour = np.array([r.colour == data.COLOUR_NAMES[c] for r, c in zip(readings, scenes.colour)])
    position = np.array([r.position == data.POSITION_NAMES[p] for r, p in zip(readings, scenes.position)])
    return {"colour": float(colour.mean()), "position": float(position.mean()),
            "both": float((colour & position).mean()), "n": len(readings)}
