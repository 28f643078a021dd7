"""Reference computations for the data tests, written independently of ultrasam_training."""

from __future__ import annotations

from collections import deque

import numpy as np

NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def components_8(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components of a 2D bool mask by breadth-first search: sets of (row, col)."""
    remaining = {tuple(p) for p in np.argwhere(mask)}
    components = []
    while remaining:
        seed = remaining.pop()
        component, queue = {seed}, deque([seed])
        while queue:
            y, x = queue.popleft()
            for dy, dx in NEIGHBOURS_8:
                neighbour = (y + dy, x + dx)
                if neighbour in remaining:
                    remaining.remove(neighbour)
                    component.add(neighbour)
                    queue.append(neighbour)
        components.append(component)
    return components


def instance_count(label_map: np.ndarray) -> int:
    """Connected components of every non-zero label of a 2D label map, summed."""
    return sum(len(components_8(label_map == value)) for value in np.unique(label_map) if value != 0)


def ellipse_outline(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    """(H, W) bool one-pixel closed outline of an ellipse (dense parametric sampling, rounded)."""
    t = np.linspace(0.0, 2.0 * np.pi, 20000, endpoint=False)
    x = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    y = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    outline = np.zeros(shape, dtype=bool)
    outline[np.rint(y).astype(int), np.rint(x).astype(int)] = True
    return outline


def perimeter_numeric(a: float, b: float) -> float:
    """Ellipse perimeter by summing 200,000 chords of the parametric curve."""
    t = np.linspace(0.0, 2.0 * np.pi, 200001)
    return float(np.sum(np.hypot(np.diff(a * np.cos(t)), np.diff(b * np.sin(t)))))


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a bool mask with a 4-neighbour outside it: a closed one-pixel outline."""
    padded = np.pad(mask, 1)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inside
