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
    """A figure of exactly width_px × height_px pixels when saved (no tight bounding box)."""
    return plt.subplots(rows, cols, figsize=(width_px / DPI, height_px / DPI), dpi=DPI,
                        squeeze=False, **kwargs)


def save_png(fig, path: str | os.PathLike) -> str:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)
    return os.fspath(path)


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
