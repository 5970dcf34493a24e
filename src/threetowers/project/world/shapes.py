"""The world's shapes as unit polygons: the objects, and the landmarks that are never objects.

Every polygon is centred on its bounding box and scaled to a half-extent of 1 (y points down,
as in images); ``render`` places, sizes and tilts them. Circle and ring are ellipses that
PIL draws directly, so they have no polygon here.
"""

from __future__ import annotations

import math

import numpy as np


def _normalised(points) -> np.ndarray:
    """Centre a polygon's bounding box on 0 and scale its larger half-extent to 1."""
    p = np.asarray(points, np.float64)
    p -= (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max()


def _circle_points(n: int, radius: float = 1.0, centre=(0.0, 0.0), start=0.0, stop=2 * math.pi):
    a = np.linspace(start, stop, n)
    return np.stack([centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)], 1)


def _star() -> np.ndarray:
    a = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _crescent() -> np.ndarray:
    # Unit disc minus a disc of radius 0.85 centred at (0.5, 0); they cross at x = 0.5275.
    x0 = 0.5275
    theta = math.atan2(math.sqrt(1 - x0**2), x0)
    phi = math.atan2(math.sqrt(1 - x0**2), x0 - 0.5)
    outer = _circle_points(28, 1.0, (0, 0), theta, 2 * math.pi - theta)
    inner = _circle_points(20, 0.85, (0.5, 0), 2 * math.pi - phi, phi)
    return np.concatenate([outer, inner])


# Unit polygons (y points down, as in images). Circle and ring are ellipses, drawn by PIL.
OBJECT_SHAPES = {
    "square": _normalised([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.82,
    "triangle": _normalised([(0, -1), (1, 0.75), (-1, 0.75)]),
    "star": _normalised(_star()),
    "cross": _normalised(
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ),  # fmt: skip
    "heart": _normalised(_heart()),
    "diamond": _normalised([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]),
    "arrow": _normalised(
        [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]
    ),
    "crescent": _normalised(_crescent()),
    "house": _normalised(
        [(-0.75, 1), (0.75, 1), (0.75, -0.05), (1, -0.05), (0, -1), (-1, -0.05), (-0.75, -0.05)]
    ),
    "tree": _normalised(
        [
            (-0.15, 1),
            (-0.15, 0.6),
            (-0.8, 0.6),
            (-0.35, 0.05),
            (-0.62, 0.05),
            (0, -1),
            (0.62, 0.05),
            (0.35, 0.05),
            (0.8, 0.6),
            (0.15, 0.6),
            (0.15, 1),
        ]
    ),  # fmt: skip
}


def _regular(n: int, start: float = -math.pi / 2) -> np.ndarray:
    a = start + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1)


# Landmarks: shapes that are never objects, so no caption and no zero-shot prompt names them.
# A scene of the labelled scene set is told apart from the other scenes of its place by its
# landmark (``landmark_of``), as a Places365 class is told apart by what it contains; a
# classifier of those labels must learn generic shape features, not the object classes.
LANDMARKS = {
    "pentagon": _normalised(_regular(5)),
    "hexagon": _normalised(_regular(6, 0.0)),
    "ell": _normalised([(-1, -1), (-0.4, -1), (-0.4, 0.4), (1, 0.4), (1, 1), (-1, 1)]),
    "tee": _normalised(
        [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)]
    ),
    "chevron": _normalised([(-1, -1), (0, -0.2), (1, -1), (1, -0.3), (0, 0.6), (-1, -0.3)]),
    "trapezoid": _normalised([(-0.45, -0.7), (0.45, -0.7), (1, 0.7), (-1, 0.7)]),
    "semicircle": _normalised(_circle_points(24, 1.0, (0, 0), math.pi, 2 * math.pi)),
    "hourglass": _normalised([(-1, -1), (1, -1), (0.15, 0), (1, 1), (-1, 1), (-0.15, 0)]),
    "parallelogram": _normalised([(-0.4, -0.6), (1, -0.6), (0.4, 0.6), (-1, 0.6)]),
}
