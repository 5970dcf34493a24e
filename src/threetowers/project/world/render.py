"""Drawing for the embedded image-caption world (``generate.py`` writes it, ``captions.py``
describes each image).

An image is a procedural background *scene* (a coarse place in one of three variants) with one
to three coloured objects on a 3x3 grid (in the labelled scene set, landmarks instead).
Backgrounds are muted and textured, objects are flat and saturated, so every object colour
stays distinguishable from every background. Everything is vectorised numpy or PIL drawing, so
one core renders thousands of 64x64 images a second.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from threetowers.project.world.shapes import LANDMARKS, OBJECT_SHAPES

OBJECT_CLASSES = [
    "circle", "square", "triangle", "star", "cross", "heart",
    "ring", "diamond", "arrow", "crescent", "house", "tree",
]  # fmt: skip
# Saturated colours; the background palettes below are muted so none of them comes close.
COLOURS = {
    "red": (225, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 30),
    "green": (35, 215, 55),
    "blue": (35, 70, 225),
    "purple": (145, 50, 200),
    "pink": (250, 110, 190),
    "cyan": (30, 215, 225),
}
SIZES = ["small", "large"]
POSITIONS = [
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
]  # fmt: skip
PLACES = [
    "grass", "sand", "water", "snow", "brick wall",
    "sky", "forest", "road", "wooden floor",
]  # fmt: skip
# Three variants per place: the fine scene labels, ordered place by place (scene // 3 = place).
SCENES = [
    "dry grass", "lush grass", "flowery grass",
    "beach sand", "desert sand", "pebbly sand",
    "calm water", "wavy water", "rippled water",
    "fresh snow", "falling snow", "icy snow",
    "red brick wall", "grey brick wall", "white brick wall",
    "clear sky", "cloudy sky", "sunset sky",
    "pine forest", "autumn forest", "birch forest",
    "asphalt road", "cobblestone road", "gravel road",
    "oak floor", "dark wood floor", "pale wood floor",
]  # fmt: skip
VARIANTS = 3

# Palettes (low, high, detail colour) per scene: muted, and far from every object colour.
_PALETTES = [
    ((150, 140, 90), (185, 170, 110), (120, 110, 70)),
    ((55, 95, 45), (90, 135, 60), (40, 70, 35)),
    ((70, 110, 55), (100, 140, 70), (238, 236, 232)),
    ((200, 185, 150), (225, 210, 175), (180, 165, 135)),
    ((185, 140, 95), (215, 170, 120), (160, 120, 80)),
    ((175, 165, 140), (200, 190, 160), (105, 95, 85)),
    ((40, 85, 105), (60, 110, 130), (80, 130, 150)),
    ((35, 75, 110), (80, 125, 150), (200, 215, 220)),
    ((45, 95, 95), (75, 125, 120), (95, 140, 135)),
    ((222, 225, 232), (245, 247, 250), (210, 215, 228)),
    ((165, 170, 185), (195, 200, 210), (245, 245, 248)),
    ((200, 215, 230), (228, 236, 245), (165, 190, 215)),
    ((140, 68, 52), (172, 92, 70), (190, 185, 175)),
    ((108, 108, 114), (142, 142, 148), (78, 78, 80)),
    ((212, 207, 198), (236, 232, 222), (160, 155, 150)),
    ((110, 160, 215), (175, 205, 235), (230, 235, 240)),
    ((135, 155, 180), (165, 180, 200), (228, 230, 234)),
    ((120, 90, 140), (225, 150, 110), (240, 200, 150)),
    ((25, 55, 35), (50, 85, 50), (70, 50, 35)),
    ((120, 70, 35), (160, 100, 45), (60, 45, 35)),
    ((80, 110, 60), (110, 140, 80), (225, 225, 215)),
    ((58, 58, 63), (85, 85, 90), (225, 225, 220)),
    ((118, 113, 108), (150, 145, 140), (70, 65, 60)),
    ((128, 123, 113), (172, 167, 157), (95, 90, 85)),
    ((162, 118, 74), (192, 146, 96), (100, 70, 45)),
    ((82, 54, 38), (112, 76, 52), (55, 35, 25)),
    ((204, 180, 140), (226, 202, 162), (170, 145, 110)),
]  # fmt: skip


# ---------------------------------------------------------------- backgrounds
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1) as a column (y) and a row (x), for broadcasting."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly (PIL is the fastest)."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def _dots(rng: np.random.Generator, size: int, count: int, radius: int = 1):
    """Row and column indices of ``count`` small square dots."""
    ys = rng.integers(0, size, count)[:, None] + np.arange(radius)[None, :]
    xs = rng.integers(0, size, count)[:, None] + np.arange(radius)[None, :]
    ys = np.repeat(ys, radius, axis=1) % size
    xs = np.tile(xs, (1, radius)) % size
    return ys.ravel(), xs.ravel()


_RAMP = np.linspace(0, 1, 255, dtype=np.float32)[:, None]
# Per scene a 256-colour palette: a low-to-high ramp (0..254) and the detail colour (255).
_LUTS = [
    np.vstack([np.add(low, _RAMP * np.subtract(high, low)), [detail]]).astype(np.float32)
    for low, high, detail in _PALETTES
]


def _background(rng: np.random.Generator, size: int, scene: int) -> Image.Image:
    """An RGB texture for ``scene``; every call jitters the palette, layout and grain."""
    place, variant = divmod(scene, VARIANTS)
    shift = rng.uniform(-9, 9, 3).astype(np.float32)  # per-image tint, so no two match
    yy, xx = _grid(size)
    u = rng.random(8).tolist()  # layout parameters, as Python floats: keep arrays float32
    overlay = None  # pixels in the detail colour: a mask, or (rows, cols) of dots
    if place == 0:  # grass: sheared one-pixel blades over soft patches
        cols = rng.random(size, dtype=np.float32)
        shear = (np.arange(size)[:, None] * (u[0] - 0.5) * 0.8).astype(np.intp)
        t = 0.55 * cols[(np.arange(size)[None, :] + shear) % size] + 0.45 * _smooth(rng, size, 4)
        if variant == 2:  # pale flowers
            overlay = _dots(rng, size, size // 3 + int(u[1] * 10), 1)
    elif place == 1:  # sand: ripples, long dunes, or pebbles
        angle = u[0] * math.pi
        freq = 2 + u[1] if variant == 1 else 5 + 3 * u[1]
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (freq * phase + 0.5 * _smooth(rng, size, 3)))
        t = 0.6 * t + 0.4 * _smooth(rng, size, 6)
        if variant == 2:
            overlay = _dots(rng, size, size // 2, 2)
    elif place == 2:  # water: horizontal waves, foam crests, or concentric ripples
        if variant == 2:
            r = np.sqrt((yy - 0.2 - 0.6 * u[0]) ** 2 + (xx - 0.2 - 0.6 * u[1]) ** 2)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * (8 + 4 * u[2]) * r)
        else:
            wobble = (0.1 + 0.15 * variant) * np.sin(2 * math.pi * (2 * xx + u[0]))
            t = 0.5 + 0.5 * np.sin(2 * math.pi * ((6 + 4 * u[1]) * yy + wobble + u[2]))
        t = 0.75 * t + 0.25 * _smooth(rng, size, 5)
        if variant == 1:
            overlay = t > 0.85
    elif place == 3:  # snow: soft drifts, flakes, or icy diagonal streaks
        t = _smooth(rng, size, 6)
        if variant == 1:
            overlay = _dots(rng, size, size // 2 + int(u[0] * 20), 1 + int(u[1] * 2))
        elif variant == 2:
            streak = np.sin(2 * math.pi * (5 + 3 * u[0]) * (xx + (0.5 + u[1]) * yy))
            overlay = streak > 0.8
    elif place == 4:  # brick wall: staggered bricks with one-pixel mortar
        rows = max(4, round(size / (9 + 3 * u[0])))
        r = yy * rows + u[1]
        row = r.astype(np.intp)
        c = xx * (rows / 2) + 0.5 * (row % 2) + u[2]
        shade = rng.random((rows + 2, rows // 2 + 3), dtype=np.float32)
        t = 0.7 * shade[row, c.astype(np.intp)] + 0.3 * _smooth(rng, size, 8)
        overlay = ((r % 1) < rows / size) | ((c % 1) < rows / (2 * size))
    elif place == 5:  # sky: vertical gradient; clouds for the cloudy variant
        t = np.clip(yy * (0.8 + 0.4 * u[0]) + 0.15 * _smooth(rng, size, 3), 0, 1)
        if variant == 1:
            clouds = _smooth(rng, size, 4) - 0.45 - 0.15 * u[1]
            overlay = clouds > 0
    elif place == 6:  # forest: leafy canopy with tree trunks
        t = 0.7 * _smooth(rng, size, 8) + 0.3 * rng.random((size, size), dtype=np.float32)
        trunks = rng.random(size) < 0.08 + 0.06 * u[0]
        trunks |= np.roll(trunks, 1)  # two pixels wide
        tops = rng.random(size, dtype=np.float32) * 0.6
        overlay = trunks[None, :] & (yy > tops[None, :])
    elif place == 7:  # road: asphalt with a dashed line, cobblestones, or gravel
        if variant == 0:
            t = 0.6 * rng.random((size, size), dtype=np.float32) + 0.4 * _smooth(rng, size, 5)
            band = np.abs(yy - 0.35 - 0.3 * u[0]) < 1.2 / size + 0.01
            overlay = band & (((xx * 4 + u[1]) % 1) < 0.5)
        elif variant == 1:
            n = 4 + int(u[0] * 3)
            fy, fx = (yy * n + u[1]), (xx * n + u[2])
            shade = rng.random((n + 2, n + 2), dtype=np.float32)
            t = shade[fy.astype(np.intp), fx.astype(np.intp)]
            t = 0.8 * t + 0.2 * _smooth(rng, size, 8)
            overlay = np.maximum(np.abs(fy % 1 - 0.5), np.abs(fx % 1 - 0.5)) > 0.4
        else:
            half = max(1, size // 2)
            grit = rng.random((half, half), dtype=np.float32).repeat(2, 0).repeat(2, 1)
            t = 0.75 * np.resize(grit, (size, size)) + 0.25 * _smooth(rng, size, 4)
    else:  # wooden floor: planks with grain and dark gaps
        n = 4 + int(u[0] * 3)
        r = yy * n + u[1]
        row = r.astype(np.intp)
        phase = rng.random(n + 2, dtype=np.float32)[row]
        rings = np.sin(2 * math.pi * ((3 + 4 * u[2]) * xx + 4 * phase + 0.6 * yy))
        t = 0.4 + 0.3 * rings + 0.3 * _smooth(rng, size, 6)
        overlay = (r % 1) < n / size
    # Colour through a palette image: t indexes a low-to-high ramp (0..254), 255 is the detail
    # colour. Far cheaper than blending (size, size, 3) float arrays; grain is added to t.
    grain = np.frombuffer(rng.bytes(size * size), np.uint8).reshape(size, size) // 5  # 0..51
    index = (np.clip(t, 0, 1) * 203).astype(np.uint8) + grain
    if overlay is not None:
        if isinstance(overlay, np.ndarray):  # a mask, perhaps one row or column to broadcast
            overlay = np.broadcast_to(overlay, (size, size))
        index[overlay] = 255
    image = Image.fromarray(index)
    image.putpalette(np.clip(_LUTS[scene] + shift, 0, 255).astype(np.uint8).tobytes())
    return image.convert("RGB")


# ------------------------------------------------------------------ objects
_SHAPES = OBJECT_SHAPES | LANDMARKS


def landmark_of(scene: int) -> str:
    """The landmark of a scene: the three scenes of a place get three different ones, and
    every landmark serves three places."""
    place, variant = divmod(scene, VARIANTS)
    return list(LANDMARKS)[(variant * 3 + place) % len(LANDMARKS)]


def sample_objects(py: random.Random, count: int, cls: str | None = None) -> list[dict]:
    """``count`` objects in distinct grid cells; ``cls`` fixes the first object's class."""
    cells = py.sample(range(9), count)
    objects = []
    for i, cell in enumerate(cells):
        name = cls if (cls is not None and i == 0) else py.choice(OBJECT_CLASSES)
        objects.append(
            {
                "class": name,
                "colour": py.choice(list(COLOURS)),
                "size": py.choice(SIZES),
                "position": POSITIONS[cell],
            }
        )
    return objects


def _draw(draws, obj: dict, size: int, py: random.Random) -> None:
    """Draw one object into every ``(ImageDraw, fill or None)`` pair in ``draws``."""
    cell = size / 3
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    # Radius plus jitter stays under half a cell, so objects in different cells never touch.
    radius = cell * (0.40 if obj["size"] == "large" else 0.25) * py.uniform(0.9, 1.0)
    jitter = cell * 0.07
    cx = (col + 0.5) * cell + py.uniform(-jitter, jitter)
    cy = (row + 0.5) * cell + py.uniform(-jitter, jitter)
    colour = tuple(min(255, max(0, c + py.randint(-12, 12))) for c in COLOURS[obj["colour"]])
    name = obj["class"]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name in ("circle", "ring"):
        width = max(2, round(radius * 0.4))
        for draw, fill in draws:
            if name == "circle":
                draw.ellipse(box, fill=fill or colour)
            else:
                draw.ellipse(box, outline=fill or colour, width=width)
        return
    angle = math.radians(py.uniform(-15, 15))  # small tilt; shapes stay recognisable
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    points = (_SHAPES[name] @ rot * radius + (cx, cy)).ravel().tolist()
    for draw, fill in draws:
        draw.polygon(points, fill=fill or colour)


def compose(
    rng: np.random.Generator,
    py: random.Random,
    size: int,
    scene: int,
    objects: list[dict],
    with_mask: bool = False,
):
    """The image for a scene index and object list; with ``with_mask`` also an ``L`` mask of
    the object pixels (255), for checks and debugging."""
    image = _background(rng, size, scene)
    draws = [(ImageDraw.Draw(image), None)]
    mask = None
    if with_mask:
        mask = Image.new("L", (size, size), 0)
        draws.append((ImageDraw.Draw(mask), 255))
    for obj in objects:
        _draw(draws, obj, size, py)
    return (image, mask) if with_mask else image
