"""The analytic shapes the synthetic patient of `phantom_anatomy` is drawn with (RAS mm, numpy only).

Every shape has `contains(x, y, z)` (a boolean mask of broadcast RAS points) and `bounds()` (the RAS box around
it, which lets the painter evaluate it on a small part of a large grid only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in RAS mm; an infinite z semi-axis makes a vertical elliptic cylinder."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (broadcast x, y, z in RAS mm) inside the ellipsoid."""
        (cx, cy, cz), (a, b, c) = self.centre, self.semi
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) RAS corners of the box around the shape."""
        return np.subtract(self.centre, self.semi), np.add(self.centre, self.semi)


@dataclass(frozen=True)
class Capsule:
    """The points within `radius` mm of the segment start-end (RAS mm): a bowel loop, a vessel segment, a sphere
    if start == end."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (broadcast x, y, z in RAS mm) inside the capsule."""
        (sx, sy, sz), (dx, dy, dz) = self.start, np.subtract(self.end, self.start)
        length2 = max(dx * dx + dy * dy + dz * dz, 1e-12)
        t = np.clip(((x - sx) * dx + (y - sy) * dy + (z - sz) * dz) / length2, 0.0, 1.0)  # nearest segment point
        return (x - sx - t * dx) ** 2 + (y - sy - t * dy) ** 2 + (z - sz - t * dz) ** 2 <= self.radius ** 2

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) RAS corners of the box around the shape."""
        ends = np.array([self.start, self.end])
        return ends.min(0) - self.radius, ends.max(0) + self.radius


@dataclass(frozen=True)
class Anterior:
    """The part of `shape` at RAS y >= `level`: the gas above an air-fluid level of a patient lying supine."""

    shape: Capsule
    level: float

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.shape.contains(x, y, z) & (y >= self.level)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = self.shape.bounds()
        low[1] = max(low[1], min(self.level, high[1]))
        return low, high


def clear_of_pancreas(loops: tuple[Capsule, ...], out: np.ndarray, curve: np.ndarray, radius: np.ndarray,
                      gap: float = 1.0, steps: int = 60) -> tuple[Capsule, ...]:
    """Move the capsules together along `out` in 2 mm steps until each is at least `gap` mm off every pancreas
    sample (sphere of `radius` at each point of `curve`); a chain of capsules moves as one, so it stays joined."""
    for _ in range(steps):
        gaps = []
        for loop in loops:
            start, end = np.array(loop.start), np.array(loop.end)
            span = end - start
            t = np.clip((curve - start) @ span / max(span @ span, 1e-12), 0.0, 1.0)[:, None]
            gaps.append((np.linalg.norm(curve - (start + t * span), axis=1) - radius - loop.radius).min())
        if min(gaps) >= gap:
            break
        loops = tuple(Capsule(tuple(np.array(loop.start) + 2.0 * out), tuple(np.array(loop.end) + 2.0 * out),
                              loop.radius) for loop in loops)
    return loops
