"""The demo model's world: flat-colour scenes of one or two shapes, their prompts and how to score them.

A scene is a background colour and one or two objects, each a shape of a colour and a size in one
cell of a 3×3 grid (the corners, the edges' middles, the centre). The same grammar makes the
training prompts, the held-out prompts and the words the tokenizer knows, so they cannot drift apart.

Held out by construction: a fixed set of (shape, colour, position) triples is never drawn during
training, alone or beside another object. Every shape, colour and position, and every pair of them,
is still seen, so a held-out prompt asks for a new combination of known parts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128  # pixels; the VAE makes 16×16 latents of it
SUPERSAMPLE = 2  # drawn at twice the size and reduced, for anti-aliased edges

# Named colours, far enough apart that the nearest one identifies a pixel after decoding.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "cyan": (40, 210, 230),
    "blue": (40, 80, 235),
    "dark blue": (15, 25, 105),
    "purple": (140, 50, 190),
    "pink": (250, 140, 200),
    "brown": (125, 75, 30),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
# Size word -> radius in pixels; "" is the unnamed, medium size.
SIZES: dict[str, float] = {"small": 10.0, "": 15.0, "large": 20.0, "big": 20.0}
# Position -> (row, column) of its grid cell, and the phrases that name it.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "centre": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner"),
    "top": ("at the top",),
    "top right": ("in the top right", "in the top right corner"),
    "left": ("on the left",),
    "centre": ("in the centre", "in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
CELL = IMAGE_SIZE / 3  # a grid cell's side, in pixels
HOLDOUT_FRACTION = 0.15  # of all (shape, colour, position) triples
HOLDOUT_SEED = 16


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    size: str  # a key of SIZES
    position: str  # a key of POSITIONS


@dataclass(frozen=True)
class Scene:
    """What a prompt describes, and where each object's centre lands (jitter included)."""

    background: str
    things: tuple[Thing, ...]
    offsets: tuple[tuple[float, float, float], ...]  # per thing: (dx, dy, radius scale)


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar can write, for the tokenizer's whole-word tokens."""
    words = {"a", "an", "and", "on", "background"}
    for name in [*COLOURS, *SHAPES, *SIZES, *(p for ps in PHRASES.values() for p in ps)]:
        words.update(name.split())
    return tuple(sorted(words))


@cache
def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """The (shape, colour, position) triples training never draws: a fixed random subset."""
    triples = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
    rng = random.Random(HOLDOUT_SEED)
    return frozenset(rng.sample(triples, round(len(triples) * HOLDOUT_FRACTION)))


def is_held_out(thing: Thing) -> bool:
    return (thing.shape, thing.colour, thing.position) in held_out_triples()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(thing: Thing, phrase: str | None) -> str:
    """ "a small yellow star in the top left"; without a phrase, the position is left unsaid."""
    words = " ".join(w for w in (thing.size, thing.colour, thing.shape) if w)
    text = f"{_article(words)} {words}"
    return f"{text} {phrase}" if phrase else text


def prompt_of(scene: Scene, rng: random.Random, *, say_position: bool = True, say_background: bool = True) -> str:
    """The prompt for a scene, with one of the phrases for each position picked by ``rng``."""
    parts = [describe(t, rng.choice(PHRASES[t.position]) if say_position else None) for t in scene.things]
    text = " and ".join(parts)
    return f"{text} on {_article(scene.background)} {scene.background} background" if say_background else text


def _jitter(rng: random.Random) -> tuple[float, float, float]:
    return (rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0.9, 1.1))


def random_thing(rng: random.Random, background: str, taken: set[str], *, held_out: bool) -> Thing:
    """A random object in a free cell, not of the background's colour; held out or not, as asked."""
    while True:
        thing = Thing(
            shape=rng.choice(SHAPES),
            colour=rng.choice([c for c in COLOURS if c != background]),
            size=rng.choice(list(SIZES)),
            position=rng.choice([p for p in POSITIONS if p not in taken]),
        )
        if is_held_out(thing) == held_out:
            return thing


def training_example(rng: random.Random) -> tuple[Scene, str]:
    """A random training scene and its prompt: never a held-out triple.

    Three in ten have two objects. One in ten leaves the background unsaid and one in ten
    of the single objects leaves the position unsaid (the model then picks one), so short
    prompts such as "a red circle" still draw something sensible.
    """
    background = rng.choice(list(COLOURS))
    things: list[Thing] = []
    for _ in range(2 if rng.random() < 0.3 else 1):
        things.append(random_thing(rng, background, {t.position for t in things}, held_out=False))
    scene = Scene(background, tuple(things), tuple(_jitter(rng) for _ in things))
    say_position = len(things) == 2 or rng.random() >= 0.1
    return scene, prompt_of(scene, rng, say_position=say_position, say_background=rng.random() >= 0.1)


def held_out_examples(seed: int = 0) -> Iterator[tuple[Scene, str]]:
    """One single-object prompt per held-out triple, with a random size and background."""
    rng = random.Random(seed)
    for shape, colour, position in sorted(held_out_triples()):
        background = rng.choice([c for c in COLOURS if c != colour])
        thing = Thing(shape, colour, rng.choice(["small", "", "large"]), position)
        scene = Scene(background, (thing,), ((0.0, 0.0, 1.0),))
        yield scene, prompt_of(scene, rng)


# --- drawing ----------------------------------------------------------------------------------


def _centre(thing: Thing, offset: tuple[float, float, float]) -> tuple[float, float, float]:
    """(x, y, radius) of an object, in pixels of the final image."""
    row, col = POSITIONS[thing.position]
    return (col + 0.5) * CELL + offset[0], (row + 0.5) * CELL + offset[1], SIZES[thing.size] * offset[2]


def _polygon(x: float, y: float, radii: list[float], turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced around (x, y), the first pointing up."""
    step = 2 * math.pi / len(radii)
    return [(x + r * math.cos(turn + i * step), y + r * math.sin(turn + i * step)) for i, r in enumerate(radii)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, int, int]) -> None:
    """One shape of (about) radius ``r`` centred on (x, y)."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=max(1, round(0.4 * r)))
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y + 0.15 * r, [1.15 * r] * 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, [1.15 * r, 0.5 * r] * 5), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(x, y, [1.1 * r, 0.8 * r] * 2), fill=fill)
    elif shape == "cross":
        w = 0.45 * r
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 128×128 RGB image."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for thing, offset in zip(scene.things, scene.offsets, strict=True):
        x, y, r = _centre(thing, offset)
        _draw(draw, thing.shape, x * SUPERSAMPLE, y * SUPERSAMPLE, r * SUPERSAMPLE, COLOURS[thing.colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# --- scoring ----------------------------------------------------------------------------------

MIN_SHAPE_SHARE = 0.35  # of the pixels the object covers when drawn, the least that must be its colour
MIN_BACKGROUND_SHARE = 0.8  # of the pixels outside the objects' cells, the least that must be background
CELL_MARGIN = 4  # pixels around a cell still counted as its own: shapes spill a little


@dataclass(frozen=True)
class Verdict:
    """Whether an image shows its scene, read from its pixels."""

    shapes_ok: bool
    background_ok: bool
    shape_shares: tuple[float, ...]  # per object: its colour's pixels in its cell / the pixels it should cover
    background_share: float  # background-coloured pixels outside the objects' cells
    stray_share: float  # pixels of the objects' colours outside their cells / those inside: copies drawn elsewhere

    @property
    def ok(self) -> bool:
        return self.shapes_ok and self.background_ok


def nearest_colours(image: Image.Image) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest named colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    distances = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # (H, W, K)
    return distances.argmin(-1)


def _cell_box(position: str, margin: int) -> tuple[slice, slice]:
    row, col = POSITIONS[position]
    top, left = round(row * CELL) - margin, round(col * CELL) - margin
    bottom, right = round((row + 1) * CELL) + margin, round((col + 1) * CELL) + margin
    return slice(max(top, 0), min(bottom, IMAGE_SIZE)), slice(max(left, 0), min(right, IMAGE_SIZE))


def score(scene: Scene, image: Image.Image) -> Verdict:
    """Judge ``image`` against ``scene`` by its pixels' nearest named colours.

    An object passes when, in its cell, its colour is the commonest one after the background's
    and covers at least MIN_SHAPE_SHARE of the area the object covers when drawn at its nominal
    size (a ring or a small star covers far less of its cell than a large square). The background
    passes when its colour covers MIN_BACKGROUND_SHARE of everything outside the objects' cells.
    A copy of an object drawn in another cell as well does not fail these; ``stray_share`` measures it.
    """
    labels = nearest_colours(image)
    names = list(COLOURS)
    background = names.index(scene.background)
    truth = nearest_colours(render(Scene(scene.background, scene.things, ((0.0, 0.0, 1.0),) * len(scene.things))))
    outside = np.ones_like(labels, dtype=bool)
    shares: list[float] = []
    for thing in scene.things:
        box = _cell_box(thing.position, CELL_MARGIN)
        outside[box] = False
        colour = names.index(thing.colour)
        cell = labels[box]
        counts = np.bincount(cell.ravel(), minlength=len(names))
        counts[background] = -1
        expected = max(int((truth[box] == colour).sum()), 1)
        share = float((cell == colour).sum()) / expected
        shares.append(share if counts.argmax() == colour else 0.0)
    background_share = float((labels[outside] == background).mean())
    coloured = np.isin(labels, [names.index(t.colour) for t in scene.things])
    stray_share = float(coloured[outside].sum()) / max(int(coloured[~outside].sum()), 1)
    return Verdict(
        shapes_ok=all(s >= MIN_SHAPE_SHARE for s in shares),
        background_ok=background_share >= MIN_BACKGROUND_SHARE,
        shape_shares=tuple(shares),
        background_share=background_share,
        stray_share=stray_share,
    )
