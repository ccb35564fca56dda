"""Shared figure set-up: matplotlib's Agg backend (no display), PNGs of a fixed pixel size written
atomically."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from sara_megatron.io import atomic_open  # noqa: E402

DPI = 100


def new_figure(width_px: int, height_px: int, rows: int = 1, cols: int = 1, **kwargs):
    """A figure of exactly width_px × height_px pixels when saved (no tight bounding box).

    Args:
        width_px, height_px: The saved PNG's size in pixels.
        rows, cols: The grid of axes.
        **kwargs: Passed on to `plt.subplots` (e.g. sharey).

    Returns:
        (figure, axes), axes always a 2-D `[rows][cols]` array.
    """
    return plt.subplots(rows, cols, figsize=(width_px / DPI, height_px / DPI), dpi=DPI,
                        squeeze=False, **kwargs)


def save_png(fig, path: str | os.PathLike) -> str:
    """Write the figure as a PNG, atomically, and close it.

    Args:
        fig: The figure.
        path: The file to write.

    Returns:
        The path, as a string.
    """
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)
    return os.fspath(path)


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk.

    Args:
        path: A PNG file.

    Returns:
        (width, height) in pixels.

    Raises:
        ValueError: The file is not a PNG.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
