"""Procedural captioned shapes: the reference model's whole training set, generated from a seed.

A scene is one shape (colour, kind, size, position) on a plain or two-tone background
(two-tone: first colour on the top half, second on the bottom half). Scenes are held as
integer arrays so a batch of thousands renders in one vectorised numpy pass.

Some (colour, shape, position) triples never appear in training (``HELD_OUT``); the
adherence benchmark asks for exactly those, so it measures composition, not recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side in pixels

# Shape colours and background colours are disjoint sets, so a pixel's nearest palette
# entry says whether it belongs to the shape or to the background (see checker.py).
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 80, 220),
    "yellow": (235, 205, 40), "purple": (140, 55, 190), "cyan": (40, 190, 200),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 4.5, "large": 7.5}  # nominal radius in pixels
# Nominal centres (x, y) in pixels; each scene jitters its centre by up to one pixel.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (9.0, 9.0), "top right": (23.0, 9.0), "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0), "center": (16.0, 16.0),
}
STYLES = ("filled", "outline", "pastel")

COLOUR_NAMES = tuple(SHAPE_COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUND_COLOURS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS)
# Background index b < 3: plain; otherwise an ordered pair (top, bottom) of distinct colours.
BACKGROUNDS: tuple[tuple[int, ...], ...] = tuple((i,) for i in range(3)) + tuple(
    (i, j) for i in range(3) for j in range(3) if i != j)


def _held_out() -> frozenset[tuple[int, int, int]]:
    """Half of the (colour, shape) pairs lose one position each: 12 of 120 triples.
    Every colour, shape and position still appears in training in other combinations."""
    return frozenset((c, s, (c + 2 * s) % len(POSITIONS))
                     for c in range(len(SHAPE_COLOURS)) for s in range(len(SHAPES)) if (c + s) % 2 == 0)


HELD_OUT = _held_out()


def _held_out_table() -> np.ndarray:
    """HELD_OUT as a boolean lookup table indexed [colour, shape, position]."""
    table = np.zeros((len(SHAPE_COLOURS), len(SHAPES), len(POSITIONS)), dtype=bool)
    for triple in HELD_OUT:
        table[triple] = True
    return table


@dataclass(frozen=True)
class Scenes:
    """A batch of scene labels, one integer array per attribute (all of length n)."""

    colour: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    position: np.ndarray
    background: np.ndarray
    jitter: np.ndarray  # (n, 2) centre offset in pixels

    def __len__(self) -> int:
        return len(self.colour)

    def captions(self) -> list[str]:
        return [caption_of(self, i) for i in range(len(self))]

    def is_held_out(self) -> np.ndarray:
        return _held_out_table()[self.colour, self.shape, self.position]


def caption_of(scenes: Scenes, i: int) -> str:
    background = " and ".join(BACKGROUND_NAMES[b] for b in BACKGROUNDS[scenes.background[i]])
    return (f"a {SIZE_NAMES[scenes.size[i]]} {COLOUR_NAMES[scenes.colour[i]]} {SHAPES[scenes.shape[i]]} "
            f"at the {POSITION_NAMES[scenes.position[i]]} on a {background} background")


def sample_scenes(rng: np.random.Generator, n: int, split: str = "train") -> Scenes:
    """``split``: "train" (never a held-out triple), "heldout" (only held-out triples) or "all".
    Half the backgrounds are plain, half two-tone."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    colour = rng.integers(0, len(SHAPE_COLOURS), n)
    shape = rng.integers(0, len(SHAPES), n)
    position = rng.integers(0, len(POSITIONS), n)
    if split != "all":
        triples = sorted(HELD_OUT)
        if split == "heldout":
            pick = np.array(triples)[rng.integers(0, len(triples), n)]
            colour, shape, position = pick[:, 0], pick[:, 1], pick[:, 2]
        else:
            # Redraw the position of held-out triples: one pass suffices because each
            # (colour, shape) pair holds out at most one position.
            bad = _held_out_table()[colour, shape, position]
            shift = rng.integers(1, len(POSITIONS), n)
            position = np.where(bad, (position + shift) % len(POSITIONS), position)
    plain = rng.random(n) < 0.5
    background = np.where(plain, rng.integers(0, 3, n), rng.integers(3, len(BACKGROUNDS), n))
    return Scenes(colour=colour, shape=shape, size=rng.integers(0, len(SIZES), n), position=position,
                  background=background, jitter=rng.uniform(-1.0, 1.0, (n, 2)))


def scenes_from_labels(colour: str, shape: str, size: str, position: str, background: str | tuple[str, ...],
                       jitter: tuple[float, float] = (0.0, 0.0)) -> Scenes:
    """One scene from names, e.g. ``("red", "circle", "small", "top left", ("white", "gray"))``."""
    bg = (background,) if isinstance(background, str) else tuple(background)
    key = tuple(BACKGROUND_NAMES.index(b) for b in bg)
    return Scenes(colour=np.array([COLOUR_NAMES.index(colour)]), shape=np.array([SHAPES.index(shape)]),
                  size=np.array([SIZE_NAMES.index(size)]), position=np.array([POSITION_NAMES.index(position)]),
                  background=np.array([BACKGROUNDS.index(key)]), jitter=np.array([jitter], dtype=float))


def shape_masks(scenes: Scenes, shrink: float = 0.0) -> np.ndarray:
    """(n, SIZE, SIZE) bool: the pixels each scene's shape covers; ``shrink`` pixels inset."""
    centres = np.array(list(POSITIONS.values()))[scenes.position] + scenes.jitter
    radius = np.array(list(SIZES.values()))[scenes.size][:, None, None] - shrink
    grid = np.arange(SIZE) + 0.5  # pixel centres
    dx = grid[None, None, :] - centres[:, 0, None, None]
    dy = grid[None, :, None] - centres[:, 1, None, None]
    kinds = np.stack([
        dx ** 2 + dy ** 2 <= radius ** 2,                                        # circle
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius,                    # square
        (dy <= 0.8 * radius) & (np.abs(dx) <= (dy + radius) * 0.6),             # triangle, apex up
        np.abs(dx) + np.abs(dy) <= 1.2 * radius,                                 # diamond
    ])
    return kinds[scenes.shape, np.arange(len(scenes))]


def _palette(names: tuple[str, ...], table: dict[str, tuple[int, int, int]]) -> np.ndarray:
    return np.array([table[n] for n in names], dtype=np.float32)


def pastel(rgb: np.ndarray) -> np.ndarray:
    """The pastel version of a colour: mixed 55% towards white."""
    return rgb + 0.55 * (255.0 - rgb)


def render(scenes: Scenes, style: str = "filled") -> np.ndarray:
    """(n, SIZE, SIZE, 3) uint8 images. ``style``: "filled", "outline" (a 2-pixel
    outline, interior left as background) or "pastel" (pastel shape colours)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    n = len(scenes)
    bg = _palette(BACKGROUND_NAMES, BACKGROUND_COLOURS)
    top = np.array([BACKGROUNDS[b][0] for b in scenes.background])
    bottom = np.array([BACKGROUNDS[b][-1] for b in scenes.background])
    rows = (np.arange(SIZE) >= SIZE // 2)[None, :, None]
    image = np.where(rows[..., None], bg[bottom][:, None, None, :], bg[top][:, None, None, :])
    image = np.broadcast_to(image, (n, SIZE, SIZE, 3)).copy()
    fg = _palette(COLOUR_NAMES, SHAPE_COLOURS)[scenes.colour]
    if style == "pastel":
        fg = pastel(fg)
    mask = shape_masks(scenes)
    if style == "outline":
        mask &= ~shape_masks(scenes, shrink=2.0)
    image = np.where(mask[..., None], fg[:, None, None, :], image)
    return image.astype(np.uint8)


def batch(seed: int, n: int, split: str = "train", style: str = "filled") -> tuple[np.ndarray, list[str], Scenes]:
    """A reproducible batch: images (n, SIZE, SIZE, 3) uint8, captions, labels."""
    scenes = sample_scenes(np.random.default_rng(seed), n, split)
    return render(scenes, style), scenes.captions(), scenes
