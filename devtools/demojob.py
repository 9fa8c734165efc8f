"""The demo's job: one frame of a moving pattern, rendered and blurred.

Owns :func:`render_frame`, the function ``make demo`` posts, kept in a
module of its own because a job must be importable by its dotted path and
the demo itself runs as ``__main__``. It must not import the demo.
"""

from __future__ import annotations

import math
from pathlib import Path

from pdoflowd.client import job

__all__ = ["FLAKY_FRAMES", "render_frame"]

# These frames fail their first attempt, so the demo shows a retry.
FLAKY_FRAMES = frozenset({42, 137, 251})

_WIDTH, _HEIGHT = 32, 24


@job()
def render_frame(frame: int, sigma: float, marks_dir: str = "") -> None:
    """Render one frame of a moving pattern and blur it (a few ms of CPU).

    With ``marks_dir``, a frame in :data:`FLAKY_FRAMES` fails on its first
    attempt and leaves a mark there; its retry finds the mark and succeeds.
    """
    if marks_dir and frame in FLAKY_FRAMES:
        mark = Path(marks_dir) / f"frame-{frame}"
        try:
            mark.touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            raise RuntimeError(f"frame {frame}: render node hiccup")
    image = [
        [
            math.sin(0.21 * x + 0.05 * frame)
            * math.cos(0.17 * y - 0.03 * frame)
            for x in range(_WIDTH)
        ]
        for y in range(_HEIGHT)
    ]
    kernel = _gaussian_kernel(sigma)
    blurred = _transpose(
        _blur_rows(_transpose(_blur_rows(image, kernel)), kernel)
    )
    if not all(math.isfinite(value) for row in blurred for value in row):
        raise ArithmeticError(f"frame {frame}: the blur diverged")


def _gaussian_kernel(sigma: float) -> list[float]:
    radius = max(1, math.ceil(3 * sigma))
    weights = [
        math.exp(-(i * i) / (2 * sigma * sigma))
        for i in range(-radius, radius + 1)
    ]
    total = sum(weights)
    return [w / total for w in weights]


def _blur_rows(
    image: list[list[float]], kernel: list[float]
) -> list[list[float]]:
    radius = len(kernel) // 2
    blurred = []
    for row in image:
        last = len(row) - 1
        blurred.append(
            [
                sum(
                    weight * row[min(last, max(0, x + offset - radius))]
                    for offset, weight in enumerate(kernel)
                )
                for x in range(len(row))
            ]
        )
    return blurred


def _transpose(image: list[list[float]]) -> list[list[float]]:
    return [list(column) for column in zip(*image, strict=True)]
