"""The volume record every source yields, and the error a source reports for one bad input."""
from __future__ import annotations

import dataclasses

import numpy as np


class VolumeError(Exception):
    """One input cannot be used. ``str(err)`` is a single line naming the file and the problem."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def one_line(exc: BaseException, sentence: bool = False) -> str:
    """``Type: first line of the message`` of an exception, for one-line error reports; with ``sentence``, only
    the first sentence of that line (``first_sentence``)."""
    text = str(exc).strip().splitlines()
    reason = first_sentence(text[0]) if sentence and text else (text[0] if text else "")
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of a message's first line, at most ``limit`` characters. Some libraries follow
    their finding with sentences of advice (torch on a truncated file), which a cut at a fixed length left
    half-said."""
    lines = text.strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


@dataclasses.dataclass
class Volume:
    """A 3D scan as read from its source, before normalisation.

    Attributes
    ----------
    id : str
        Scan id (e.g. ``"1"`` for ``image_1.nii.gz``, ``"phantom_003"``).
    image : ndarray, shape (H, W, Z), float32 (float64 when the file stores float64)
        Intensities as stored (CHAOS-T2: clipped, 0 .. ~1300). Slices are ``image[:, :, z]``:
        the third array axis is the acquisition axis. ``engine.prepare`` converts every voxel to float32;
        a float64 volume is not copied to float32 first (one pass and 9 MB less per CHAOS volume).
    spacing : tuple of 3 floats
        Voxel size in mm along the three array axes.
    affine : ndarray, shape (4, 4), float64
        Voxel-to-world (RAS+) transform, as recorded by the source.
    orientation : str
        Axis codes of the array axes, e.g. ``"LAS"`` (nibabel ``aff2axcodes``); recorded, never changed.
    label : ndarray, shape (H, W, Z), uint8, or None
        Organ labels when the source has them (CHAOS: 1 liver, 2 right kidney, 3 left kidney, 4 spleen).
    path : str
        The file or folder the volume was read from.
    checksum : str
        sha256 of the source file(s), or of the generator settings for the phantom.
    """
    id: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    orientation: str
    label: np.ndarray | None
    path: str
    checksum: str

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[2])
