"""Built-in phantom: deterministic synthetic T2-SPIR-like abdominal MRI volumes.

Each "patient" is drawn from a generator seeded with (seed, index) and rendered in the geometry of the
preprocessed CHAOS-T2 volumes (method.md 1.3 and 8): 256 x 256 x Z (Z in 30..45), spacing 1.25 x 1.25 x 7.7 mm,
LAS orientation (array axis 0 runs from the patient's right to left, axis 1 from posterior to anterior,
axis 2 from feet to head), raw intensities 0 .. ~1300 with air below the body-mask threshold of 50.

Anatomy: body outline with skin, fat-suppressed (dark) subcutaneous fat and muscle wall; spine (vertebral
body, discs, bright CSF canal, posterior arch), paraspinal and psoas muscles; aorta and IVC; lung bases and
heart above the diaphragm; stomach and heterogeneous bowel loops; liver (two lobes, bright intrahepatic
vessels, gallbladder), spleen and two kidneys (bright, with a darker renal sinus). Organs are labelled with
the CHAOS ids (1 liver, 2 right kidney, 3 left kidney, 4 spleen) and start and end at different slices with
extents drawn close to the real data (liver ~19-32 slices, kidneys ~11-20, spleen ~9-21). Cross-sections are
superellipses whose size, centre, rotation and low-order radial harmonics change smoothly along z.

Acquisition model: smooth tissue texture, partial-volume blur (Gaussian, in-plane and along z), smooth
multiplicative bias field (in-plane polynomial times a z profile dimming the ends of the stack), Rician noise
(magnitude of complex Gaussian) and the CHAOS clip of the bright tail at the 99.5th percentile.

Intensity levels were tuned so that the per-volume z-scored medians match method.md section 8: body outside
the organs ~+0.25, liver ~+1.1, kidneys ~+3.3-3.5, spleen ~+3.1, fat dark, air darkest.
Pure numpy/scipy; one volume takes a fraction of a second. Arrays are bit-identical for the same
arguments and numpy version (numpy keeps its PCG64 streams stable in practice, without promising it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from scipy import ndimage

from engine.volume import Volume

#: Bump when the generated arrays change for a given (index, seed, n_slices): it is part of the checksum.
PHANTOM_VERSION = "phantom-1"
SIZE = 256
SPACING = (1.25, 1.25, 7.7)
Z_RANGE = (30, 45)                      # slices per patient, inclusive (CHAOS-T2: 31..46)
LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
# voxel -> world (RAS+) for LAS axes: x runs towards the patient's left, hence the negative first column.
_AFFINE_DIAG = (-SPACING[0], SPACING[1], SPACING[2])

__all__ = ["PHANTOM_VERSION", "LABELS", "PhantomArrays", "generate", "make_volume", "checksum"]


@dataclasses.dataclass
class PhantomArrays:
    """Everything the generator knows about one patient.

    Attributes
    ----------
    image : ndarray, shape (256, 256, Z), float32
        Raw intensities (0 .. ~1300), LAS axes.
    label : ndarray, shape (256, 256, Z), uint8
        0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
    body : ndarray, shape (256, 256, Z), bool
        True body region (inside the skin) before blur and noise: the ground truth of the body mask.
    extents : dict
        Organ name -> (first, last) slice index as planned by the generator.
    """
    image: np.ndarray
    label: np.ndarray
    body: np.ndarray
    extents: dict


# ----------------------------------------------------------------------------------------------- drawing
def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), 0x9A7])


def _ln(rng: np.random.Generator, sd: float) -> float:
    """Multiplicative jitter exp(N(0, sd)), clipped to 2 sd so no patient becomes an outlier by chance."""
    return float(np.exp(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd)))


def _extent(first: int, last: int, f: float) -> tuple[int, int]:
    """Map an organ's slice range drawn for Z_nat slices onto a stack compressed/stretched by ``f``."""
    if f == 1.0:
        return first, last
    a = int(np.floor(first * f))
    b = max(a, int(np.ceil((last + 1) * f)) - 1)
    return a, b


def _profile(t: np.ndarray, floor: float, gamma: float, q: float) -> np.ndarray:
    """Cross-section scale along an organ: ``floor`` at the poles, 1 at t = 0.5**(1/gamma)."""
    return floor + (1.0 - floor) * np.sin(np.pi * np.clip(t, 0, 1) ** gamma) ** q


@dataclasses.dataclass
class _Tube:
    """A structure whose cross-section in slice k is a deformed, rotated superellipse.

    All per-slice arrays have the length of ``ks`` (the slice indices it occupies).
    The normalised radius r (< 1 inside) of the boundary is rho / (1 + delta), with rho the superellipse
    norm and delta = sum_m amp[m] cos((m + 2) phi + phase[m, k]) a smooth radial deformation.
    """
    ks: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    ax: np.ndarray
    ay: np.ndarray
    theta: np.ndarray
    p: float = 2.0
    amp: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    phase: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))

    def slices(self):
        """Yield (k, (i0, i1, j0, j1), r, u, v) for each occupied slice; r, u, v are (i1-i0, j1-j0) float32."""
        grow = 1.0 + float(np.sum(np.abs(self.amp)))
        corner = 2.0 ** (0.5 - 1.0 / self.p) if self.p > 2 else 1.0
        for n, k in enumerate(self.ks):
            ax, ay = float(self.ax[n]), float(self.ay[n])
            if ax <= 0.3 or ay <= 0.3:
                continue
            reach = max(ax, ay) * grow * corner + 1.5
            i0, i1 = max(0, int(self.cx[n] - reach)), min(SIZE, int(self.cx[n] + reach) + 2)
            j0, j1 = max(0, int(self.cy[n] - reach)), min(SIZE, int(self.cy[n] + reach) + 2)
            if i0 >= i1 or j0 >= j1:
                continue
            dx = np.arange(i0, i1, dtype=np.float32)[:, None] - np.float32(self.cx[n])
            dy = np.arange(j0, j1, dtype=np.float32)[None, :] - np.float32(self.cy[n])
            c, s = np.float32(np.cos(self.theta[n])), np.float32(np.sin(self.theta[n]))
            u = (dx * c + dy * s) / np.float32(ax)
            v = (dy * c - dx * s) / np.float32(ay)
            if self.p == 2.0:
                rho = np.sqrt(u * u + v * v)
            else:
                rho = (np.abs(u) ** self.p + np.abs(v) ** self.p) ** (1.0 / self.p)
            if len(self.amp):
                phi = np.arctan2(v, u)
                delta = np.zeros_like(rho)
                for m, a in enumerate(self.amp):
                    delta += np.float32(a) * np.cos((m + 2) * phi + np.float32(self.phase[m, n]))
                rho = rho / (1.0 + delta)
            yield int(k), (i0, i1, j0, j1), rho, u, v


def _smooth_field(rng: np.random.Generator, nz: int, cell_xy: float, cell_z: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field, shape (256, 256, nz) float32, correlation length about
    ``cell_xy`` px in-plane and ``cell_z`` slices along z.

    Coarse white noise is interpolated with separable Gaussian kernels, one large matrix product per axis:
    far cheaper than filtering a full-size noise volume, and (unlike a batch of small products) it does not
    stall when BLAS threads compete with other processes for the cores.
    """
    def kernel(n_out: int, cell: float) -> np.ndarray:
        pos = np.arange(-2 * cell, n_out + 2 * cell, cell)
        w = np.exp(-0.5 * ((np.arange(n_out)[:, None] - pos[None, :]) / (0.7 * cell)) ** 2)
        return (w / np.sqrt((w * w).sum(1, keepdims=True))).astype(np.float32)
    kx, kz = kernel(SIZE, cell_xy), kernel(nz, cell_z)
    c, cz = kx.shape[1], kz.shape[1]
    coarse = rng.standard_normal((c * c, cz)).astype(np.float32)
    field = (coarse @ kz.T).reshape(c, c * nz)                   # z interpolated: (a, b*z)
    field = (kx @ field).reshape(SIZE, c, nz)                    # first in-plane axis: (A, b, z)
    field = np.ascontiguousarray(field.transpose(1, 0, 2)).reshape(c, SIZE * nz)
    # second in-plane axis; the result is indexed (B, A, z): the transposed realisation of an
    # isotropic field has the same statistics, so no transpose back is needed
    return (kx @ field).reshape(SIZE, SIZE, nz)


def _harmonics(rng: np.random.Generator, n: int, amps: tuple[float, ...], drift: float = 1.2):
    """Radial deformation amplitudes and phases that rotate slowly along the structure (smooth in z)."""
    amp = np.array([a * rng.uniform(0.4, 1.0) for a in amps])
    t = np.linspace(0.0, 1.0, max(n, 1))
    phase = np.stack([rng.uniform(0, 2 * np.pi) + rng.uniform(-drift, drift) * np.pi * t
                      + rng.uniform(-0.5, 0.5) * np.sin(np.pi * t * rng.uniform(0.5, 1.5)) for _ in amps])
    return amp, phase


class _Canvas:
    """The image, label and cavity (inside the muscle wall) being painted, in painter's order."""

    def __init__(self, nz: int):
        self.img = np.zeros((SIZE, SIZE, nz), np.float32)
        self.lab = np.zeros((SIZE, SIZE, nz), np.uint8)
        self.cavity = np.zeros((SIZE, SIZE, nz), bool)
        self.body = np.zeros((SIZE, SIZE, nz), bool)

    def paint(self, k, box, mask, value, label: int | None = None, clip: str = "cavity",
              only_label: int | None = None):
        """Set ``value`` (scalar or array over ``box``) where ``mask``, restricted to the abdominal cavity
        (``clip="cavity"``), to the body (``"body"``) or nowhere (``"none"``); ``label`` overwrites ids
        (0 clears them), ``only_label`` restricts painting to voxels already carrying that id."""
        i0, i1, j0, j1 = box
        if clip == "cavity":
            mask = mask & self.cavity[i0:i1, j0:j1, k]
        elif clip == "body":
            mask = mask & self.body[i0:i1, j0:j1, k]
        if only_label is not None:
            mask = mask & (self.lab[i0:i1, j0:j1, k] == only_label)
        img = self.img[i0:i1, j0:j1, k]
        if np.ndim(value):
            img[mask] = value[mask]
        else:
            img[mask] = value
        if label is not None:
            self.lab[i0:i1, j0:j1, k][mask] = label


# ----------------------------------------------------------------------------------------------- patient
def _layout(rng: np.random.Generator, nz: int) -> dict:
    """Organ slice ranges (first, last), z increasing towards the head, in the pattern of the real scans:
    the liver reaches the dome 1-4 slices below the top of the stack; the kidneys start near the liver's
    lower end (the left one up to 3 slices higher) and end at least 4 slices below the dome; the spleen
    ends near the dome and starts at least 3 slices above the right kidney."""
    top_margin = int(rng.integers(1, 5))
    liv_top = nz - 1 - top_margin                         # >= 25 for nz >= 30
    # real extents are skewed: median 22, range 19-32 slices
    liv_len = min(int(np.clip(round(19 + rng.gamma(1.5, 2.2)), 19, 32)), liv_top)
    liv_bot = liv_top - liv_len + 1                       # >= 1
    cap = liv_top - 4                                     # highest slice of a kidney's upper pole
    ranges = {"liver": (liv_bot, liv_top)}
    rk_bot = max(0, liv_bot + int(rng.integers(-4, 3)))
    for name, mean, sd, lo, hi, first in (("right_kidney", 14.5, 2.0, 11, 18, rk_bot),
                                          ("left_kidney", 15.5, 2.2, 12, 20, rk_bot + int(rng.integers(0, 4)))):
        length = int(np.clip(round(rng.normal(mean, sd)), lo, hi))
        first = max(0, min(first, cap - length + 1))
        ranges[name] = (first, min(first + length - 1, cap))
    rk_bot = ranges["right_kidney"][0]
    sp_top = liv_top - int(rng.integers(0, 6))
    # the bound keeps >= 9 slices: sp_top - rk_bot - 2 >= liv_len - 10 >= 9
    sp_len = min(int(np.clip(round(rng.normal(14.5, 3.0)), 9, 21)), sp_top - rk_bot - 2)
    ranges["spleen"] = (sp_top - sp_len + 1, sp_top)
    return ranges


def _tissue_levels(rng: np.random.Generator) -> dict:
    """Nominal T2-SPIR signal per tissue (before gain, texture, bias and noise); per-patient jitter."""
    j = lambda sd: _ln(rng, sd)  # noqa: E731
    liver = 375 * j(0.12)
    kidney = 870 * j(0.07)
    # the left kidney is a little brighter in the real scans (median z-score 3.54 vs 3.29 for the right)
    left_gain = 1.06
    return {
        "skin": 220 * j(0.1), "fat": 72 * j(0.15), "muscle": 195 * j(0.1), "viscera": 285 * j(0.1),
        "lung": 28 * j(0.2), "heart": 260 * j(0.15),
        "vertebra": 190 * j(0.12), "disc": 330 * j(0.15), "csf": 1000 * j(0.08), "arch": 80 * j(0.15),
        "aorta": 110 * j(0.35), "vessel_wall": 330 * j(0.1), "ivc": 560 * j(0.15),
        "liver": liver, "liver_vessel": liver * 1.9 * j(0.1), "gallbladder": 1000 * j(0.08),
        "spleen": 740 * j(0.07), "kidney": kidney, "kidney_medulla": kidney * 0.88, "sinus": kidney * 0.42,
        "left_gain": left_gain,
        "bowel_wall": 230 * j(0.12),
    }


@dataclasses.dataclass(frozen=True)
class _BodyFrame:
    """Centre and semi-axes (px) of the body outline and the subcutaneous fat thickness, for placing organs."""
    cx0: float
    cy0: float
    bx: float                                             # lateral semi-axis
    byp: float                                            # posterior semi-axis
    bya: float                                            # anterior semi-axis
    fat_t: float

    @property
    def y_post(self) -> float:
        """y of the posterior body edge (the patient's back)."""
        return self.cy0 - self.byp


@dataclasses.dataclass(frozen=True)
class _Spine:
    """Vertebral body radius and centre (px): several structures are placed relative to it."""
    vb_r: float
    vb_x: float
    vb_y: float


def _tube(rng: np.random.Generator, first: int, last: int, cx, cy, ax, ay, theta, p: float = 2.0,
          amps: tuple[float, ...] = (), drift: float = 1.0) -> _Tube:
    """A _Tube over slices first..last; scalars broadcast along z, harmonics drawn only if ``amps``."""
    ks = np.arange(first, last + 1)
    n = len(ks)
    amp, phase = _harmonics(rng, n, amps, drift) if amps else (np.zeros(0), np.zeros((0, n)))
    b = lambda a: np.broadcast_to(np.asarray(a, float), (n,))  # noqa: E731
    return _Tube(ks, b(cx), b(cy), b(ax), b(ay), b(theta), p, amp, phase)


def _wall_x(cv: _Canvas, y: float, k: int, side: int, fallback: float) -> float:
    """x of the inner abdominal wall on row y of slice k (side -1: patient's right, +1: left)."""
    nz = cv.cavity.shape[2]
    row = np.nonzero(cv.cavity[:, int(np.clip(round(y), 0, SIZE - 1)), int(np.clip(k, 0, nz - 1))])[0]
    if row.size == 0:
        return fallback
    return float(row[0] if side < 0 else row[-1])


def _organ_t(first: int, last: int) -> np.ndarray:
    """Normalised position 0..1 along an organ (feet -> head) at each of its slices."""
    n = last - first + 1
    return (np.arange(n) + 0.5) / n


def _render(rng: np.random.Generator, nz_nat: int, nz: int) -> tuple[_Canvas, np.ndarray, dict]:
    """Draw one patient's anatomy on a fresh canvas, in painter's order (later sections paint over earlier)."""
    f = nz / nz_nat                                       # z compression when n_slices is forced
    lev = _tissue_levels(rng)
    cv = _Canvas(nz)
    za = (np.arange(nz) + 0.5) / f - 0.5                             # slice index in the patient's natural stack
    frame = _paint_body(rng, cv, lev, za, nz_nat)
    ext_nat = _layout(rng, nz_nat)
    ext = {name: _extent(a, b, f) for name, (a, b) in ext_nat.items()}
    spine = _draw_spine(rng, frame)
    clutter_top = max(1, ext["liver"][1] - 2 * f)
    bowel_top = max(0.0, ext["liver"][1] - 3 * f)
    _paint_visceral_background(rng, cv, lev, clutter_top, f)
    _paint_small_structures(rng, cv, frame, clutter_top)
    _paint_bowel(rng, cv, lev, frame, bowel_top, f)
    _paint_stomach(rng, cv, lev, frame, ext)
    _paint_chest(rng, cv, lev, frame, ext["liver"][1], f)
    _paint_liver(rng, cv, lev, frame, spine, ext["liver"], f)
    _paint_spleen(rng, cv, lev, frame, ext["spleen"])
    _paint_kidneys(rng, cv, lev, spine, ext)
    # painted last: they clear organ labels where they overlap
    _paint_back_muscles(rng, cv, lev, frame, spine, ext["left_kidney"][1] - 2 * f)
    _paint_spine(rng, cv, lev, spine, za)
    _paint_vessels(rng, cv, lev, frame, spine, za, nz_nat, bowel_top, f)
    return cv, cv.body, ext


def _paint_body(rng: np.random.Generator, cv: _Canvas, lev: dict, za: np.ndarray, nz_nat: int) -> _BodyFrame:
    """Body outline with skin, fat and muscle-wall layers; sets ``cv.body`` and ``cv.cavity``."""
    nz = cv.img.shape[2]
    # polar description around a fixed centre; depth below the skin drives the layers
    cx0 = SIZE / 2 + rng.normal(0, 3)
    cy0 = SIZE / 2 + rng.normal(-5, 3)
    bx = rng.uniform(118, 145)                            # lateral semi-axis (px); wide ones touch the FOV
    byp = rng.uniform(70, 84)                             # posterior semi-axis (back is flatter)
    bya = rng.uniform(74, 94)                             # anterior semi-axis
    pbody = rng.uniform(2.3, 3.0)
    zc = rng.uniform(0.3, 0.7) * nz_nat
    zscale = 1.0 + 0.05 * np.cos(np.pi * (za - zc) / nz_nat) * rng.uniform(-1, 1) + \
        0.03 * (za / nz_nat - 0.5) * rng.uniform(-1, 1)
    bamp, bphase = _harmonics(rng, nz, (0.035, 0.025, 0.015), drift=0.4)
    fat_t = rng.uniform(4, 14)                            # subcutaneous fat thickness (px)
    fat_dir, fat_var = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.45)
    wall_t = rng.uniform(5, 9)                            # abdominal muscle wall

    xs = np.arange(SIZE, dtype=np.float32)[:, None] - np.float32(cx0)
    ys = np.arange(SIZE, dtype=np.float32)[None, :] - np.float32(cy0)
    radius = np.sqrt(xs * xs + ys * ys)
    phi = np.arctan2(ys, xs)
    cphi, sphi = np.abs(np.cos(phi)), np.abs(np.sin(phi))
    ant = ys > 0
    fat_here = fat_t * (1 + fat_var * np.cos(phi - fat_dir))
    body = cv.body
    # the outline scales with z as a whole; only the harmonic phases change per slice
    edge0 = ((cphi / bx) ** pbody + (sphi / np.where(ant, bya, byp)) ** pbody) ** (-1.0 / pbody)
    cos_m = [np.cos((m + 2) * phi) for m in range(len(bamp))]
    sin_m = [np.sin((m + 2) * phi) for m in range(len(bamp))]
    for k in range(nz):
        wobble = 1.0
        for m in range(len(bamp)):
            wobble = wobble + bamp[m] * (np.cos(bphase[m, k]) * cos_m[m] - np.sin(bphase[m, k]) * sin_m[m])
        depth = edge0 * (zscale[k] * wobble) - radius
        inside = depth > 0
        body[:, :, k] = inside
        # layers blend over one pixel (anti-aliased edges, no staircase at the skin)
        w = lambda d0: np.clip(depth - d0 + 0.5, 0.0, 1.0)  # noqa: E731
        cv.img[:, :, k] = (lev["skin"] * w(0.0) + (lev["fat"] - lev["skin"]) * w(2.0)
                           + (lev["muscle"] - lev["fat"]) * w(2.0 + fat_here)
                           + (lev["viscera"] - lev["muscle"]) * w(2.0 + fat_here + wall_t))
        cv.cavity[:, :, k] = depth > 2.5 + fat_here + wall_t
    return _BodyFrame(cx0, cy0, bx, byp, bya, fat_t)


def _draw_spine(rng: np.random.Generator, frame: _BodyFrame) -> _Spine:
    """Spine geometry, drawn early because several structures are placed relative to it."""
    vb_r = rng.uniform(14, 18)
    vb_x = frame.cx0 + rng.normal(0, 2)
    vb_y = frame.y_post + rng.uniform(60, 74)
    return _Spine(vb_r, vb_x, vb_y)


def _paint_visceral_background(rng: np.random.Generator, cv: _Canvas, lev: dict, clutter_top: float,
                               f: float) -> None:
    """Visceral background below the dome: soft-edged patches of fluid-filled bowel (bright on T2) and of
    fat-suppressed mesentery (dark) from a thresholded smooth random field."""
    kc = int(np.ceil(clutter_top))
    field = _smooth_field(rng, kc, rng.uniform(9, 14), rng.uniform(1.0, 1.6) * f)
    fine = _smooth_field(rng, kc, 3.5, 0.8)
    q_fluid, q_fat = rng.uniform(0.35, 0.65), rng.uniform(0.9, 1.3)
    w_fluid = np.clip((field - q_fluid) * 3.0, 0, 1)
    w_fat = np.clip((-field - q_fat) * 3.0, 0, 1)
    # a dark rim where a loop meets its surroundings (bowel wall, fat-suppressed mesentery)
    rim = np.exp(-((field - q_fluid + 0.1) / 0.12) ** 2)
    fluid = rng.uniform(480, 800)
    cav = cv.cavity[:, :, :kc]
    sub = cv.img[:, :, :kc]
    mixed = sub * (1 - w_fluid - w_fat) + fluid * w_fluid + lev["fat"] * w_fat
    mixed *= (1.0 - 0.45 * rim) * (1.0 + 0.12 * fine)
    sub[cav] = mixed[cav]


def _paint_small_structures(rng: np.random.Generator, cv: _Canvas, frame: _BodyFrame, clutter_top: float) -> None:
    """Mesenteric vessels and lymph nodes (bright dots) and fat strands (dark) over the visceral background."""
    nz = cv.img.shape[2]
    cx0, cy0, bx, byp, bya = frame.cx0, frame.cy0, frame.bx, frame.byp, frame.bya
    n_cl = int(rng.integers(200, 300))
    cl_k = (clutter_top * rng.uniform(0, 1, n_cl) ** 0.7).astype(int)
    for n in range(n_cl):
        k0 = int(min(nz - 1, cl_k[n]))
        k1 = min(nz - 1, k0 + int(rng.integers(0, 3)))
        kind = rng.choice(3, p=[0.45, 0.35, 0.2])
        level = [rng.uniform(40, 110), rng.uniform(220, 420), rng.uniform(450, 800)][kind]
        a = rng.uniform(2.5, 9) if kind < 2 else rng.uniform(1.5, 4.5)
        t = _tube(rng, k0, k1, cx0 + bx * rng.uniform(-0.75, 0.8), cy0 + rng.uniform(-0.6 * byp, 0.85 * bya),
                  a, a * rng.uniform(0.4, 1.0), rng.uniform(0, np.pi), amps=(0.1,))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, level)


def _paint_bowel(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, bowel_top: float,
                 f: float) -> None:
    """Bowel loops and colon (heterogeneous), below the diaphragm."""
    nz = cv.img.shape[2]
    cx0, cy0, bx, byp, bya = frame.cx0, frame.cy0, frame.bx, frame.byp, frame.bya
    n_bowel = int(rng.integers(80, 130))
    for _ in range(n_bowel):
        # small-bowel loops are mostly fluid-filled (bright on T2), some with chyme, a few with gas
        kind = rng.choice(3, p=[0.35, 0.55, 0.1])
        level = [rng.uniform(220, 450), rng.uniform(450, 900), rng.uniform(12, 40)][kind]
        zmid = bowel_top * rng.uniform(0, 1) ** 1.3
        half = rng.uniform(1.0, 3.0) * f
        a, b_ = rng.uniform(9, 20), rng.uniform(7, 15)
        k0, k1 = max(0, int(np.ceil(zmid - half))), min(nz - 1, int(np.floor(zmid + half)))
        if k1 < k0:
            continue
        bxc = cx0 + bx * rng.uniform(-0.55, 0.75)
        byc = cy0 + rng.uniform(-0.2 * byp, 0.85 * bya)
        dz = rng.normal(0, 4, size=2)
        zz = np.linspace(-1, 1, k1 - k0 + 1)
        sc = np.sqrt(np.clip(1 - (zz * 0.8) ** 2, 0.2, 1))
        t = _tube(rng, k0, k1, bxc + dz[0] * zz, byc + dz[1] * zz, a * sc, b_ * sc, rng.uniform(0, np.pi),
                  amps=(0.12, 0.08))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["bowel_wall"])
            cv.paint(k, box, r < 0.78, level)


def _paint_stomach(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, ext: dict) -> None:
    """Stomach: upper left, anterior to the spleen."""
    nz = cv.img.shape[2]
    cx0, cy0, bx, bya = frame.cx0, frame.cy0, frame.bx, frame.bya
    sp_bot, sp_top = ext["spleen"]
    liv_top = ext["liver"][1]
    st_lo, st_hi = max(0, (sp_bot + sp_top) // 2 - 2), min(nz - 1, liv_top - 1)
    if st_hi >= st_lo:
        tt = _organ_t(st_lo, st_hi)
        s = _profile(tt, 0.4, 1.0, 0.6)
        level = [rng.uniform(500, 850), rng.uniform(220, 380), rng.uniform(15, 40)][rng.choice(3, p=[.5, .35, .15])]
        t = _tube(rng, st_lo, st_hi, cx0 + bx * rng.uniform(0.2, 0.4), cy0 + bya * rng.uniform(0.15, 0.35),
                  rng.uniform(22, 34) * s, rng.uniform(16, 24) * s, rng.uniform(0, np.pi), amps=(0.1, 0.06))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["bowel_wall"])
            cv.paint(k, box, r < 0.82, level)


def _paint_chest(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, liv_top: int,
                 f: float) -> None:
    """Lung bases and heart above the diaphragm."""
    nz = cv.img.shape[2]
    cx0, cy0, bx, byp, bya, y_post = frame.cx0, frame.cy0, frame.bx, frame.byp, frame.bya, frame.y_post
    lung_lo = max(0, liv_top - int(rng.integers(3, 8) * f))
    for side in (-1, 1):
        tt = (np.arange(lung_lo, nz) - lung_lo + 1) / (nz - lung_lo)
        s = np.clip(tt, 0.3, 1.0) ** 0.7
        t = _tube(rng, lung_lo, nz - 1, cx0 + side * 0.5 * bx, y_post + byp * rng.uniform(0.55, 0.75),
                  0.42 * bx * s, 0.62 * byp * s, rng.uniform(-0.3, 0.3), amps=(0.08, 0.05))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["lung"])
    heart_lo = max(0, liv_top - int(rng.integers(0, 3) * f))
    if heart_lo <= nz - 1:
        tt = (np.arange(heart_lo, nz) - heart_lo + 1) / (nz - heart_lo)
        s = np.clip(tt, 0.35, 1.0) ** 0.5
        t = _tube(rng, heart_lo, nz - 1, cx0 + bx * rng.uniform(0.05, 0.25), cy0 + bya * rng.uniform(0.3, 0.5),
                  0.35 * bx * s, 0.38 * bya * s, rng.uniform(-0.5, 0.5), amps=(0.06,))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["heart"])


def _paint_liver(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, spine: _Spine,
                 extent: tuple[int, int], f: float) -> None:
    """Liver: right lobe (whole extent) + left lobe (upper part), bright vessels, gallbladder."""
    cx0, cy0, bx, bya = frame.cx0, frame.cy0, frame.bx, frame.bya
    liv_bot, liv_top = extent
    tt = _organ_t(liv_bot, liv_top)
    gam = rng.uniform(1.5, 2.4)
    s = _profile(tt, 0.28, gam, rng.uniform(0.45, 0.75))
    rl_ax, rl_ay = rng.uniform(50, 62), rng.uniform(55, 68)
    rl_cy = cy0 + rng.uniform(0, 20) + 15 * (1 - tt)
    # the right lobe hugs the right lateral wall at every level
    x_wall = _wall_x(cv, rl_cy[len(tt) // 2], (liv_bot + liv_top) // 2, -1, cx0 - bx + 20)
    rl_cx = x_wall + rl_ax * s * rng.uniform(0.75, 0.9)
    right = _tube(rng, liv_bot, liv_top, rl_cx, rl_cy, rl_ax * s, rl_ay * s, rng.uniform(-0.4, 0.4),
                  p=rng.uniform(2.0, 2.6), amps=(0.08, 0.05, 0.03))
    lobe_lo = liv_bot + int(round((liv_top - liv_bot) * rng.uniform(0.35, 0.55)))
    t2 = _organ_t(lobe_lo, liv_top)
    s2 = _profile(t2, 0.2, 1.0, 0.6)
    left = _tube(rng, lobe_lo, liv_top, spine.vb_x + rng.uniform(0, 25), cy0 + bya * rng.uniform(0.45, 0.6),
                 rng.uniform(50, 65) * s2, rng.uniform(24, 32) * s2, rng.uniform(-0.45, 0.1),
                 amps=(0.1, 0.05))
    for part in (right, left):
        for k, box, r, _, _ in part.slices():
            cv.paint(k, box, r < 1, lev["liver"], label=LABELS["liver"])
    _liver_vessels(rng, cv, lev, right, liv_bot, liv_top, f)
    if rng.uniform() < 0.75:                              # gallbladder under the liver, not labelled
        g_lo = liv_bot + int((liv_top - liv_bot) * rng.uniform(0.1, 0.3))
        g_hi = min(liv_top, g_lo + max(1, int(rng.integers(2, 6) * f)))
        tt = _organ_t(g_lo, g_hi)
        s = _profile(tt, 0.5, 1.0, 0.5)
        t = _tube(rng, g_lo, g_hi, cx0 - bx * rng.uniform(0.15, 0.3), cy0 + bya * rng.uniform(0.3, 0.5),
                  rng.uniform(9, 15) * s, rng.uniform(6, 10) * s, rng.uniform(0, np.pi))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["gallbladder"], label=0)


def _paint_spleen(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame,
                  extent: tuple[int, int]) -> None:
    """Spleen: posterolateral left, long axis along the wall, concave medial face."""
    sp_bot, sp_top = extent
    tt = _organ_t(sp_bot, sp_top)
    s = _profile(tt, 0.35, rng.uniform(0.8, 1.3), 0.6)
    sp_cy = frame.y_post + rng.uniform(48, 68) + 14 * (tt - 0.5)   # lower pole more posterior
    sp_a, sp_b, sp_th = rng.uniform(42, 52), rng.uniform(24, 30), np.deg2rad(rng.uniform(55, 85))
    half_x = np.hypot(sp_a * np.cos(sp_th), sp_b * np.sin(sp_th)) * s
    x_wall = _wall_x(cv, sp_cy[len(tt) // 2], (sp_bot + sp_top) // 2, 1, frame.cx0 + frame.bx - 20)
    sp_cx = x_wall - half_x * rng.uniform(0.7, 0.85)     # against the left posterolateral wall
    spl = _tube(rng, sp_bot, sp_top, sp_cx, sp_cy, sp_a * s, sp_b * s, sp_th, p=2.2, amps=(0.08, 0.04))
    bite = rng.uniform(0.25, 0.45)
    for k, box, r, u, v in spl.slices():
        # the medial face (+v points to -x, medially, for this orientation) is hollowed by the
        # stomach and the kidney
        hollow = ((v - 1.35) ** 2 / 0.7 + u * u / 1.4) < bite + 0.6
        cv.paint(k, box, (r < 1) & ~hollow, lev["spleen"], label=LABELS["spleen"])


def _paint_kidneys(rng: np.random.Generator, cv: _Canvas, lev: dict, spine: _Spine, ext: dict) -> None:
    """Kidneys: bean-shaped, long axis tilted with the anterior pole lateral, darker sinus medially."""
    vb_r, vb_x, vb_y = spine.vb_r, spine.vb_x, spine.vb_y
    for name, side in (("right_kidney", -1), ("left_kidney", 1)):
        k_bot, k_top = ext[name]
        tt = _organ_t(k_bot, k_top)
        s = _profile(tt, 0.33, 1.0, 0.5)
        kcx = vb_x + side * (rng.uniform(50, 60) - 5 * (tt - 0.5))
        kcy = vb_y - vb_r * rng.uniform(0.8, 1.3) - 5 * (tt - 0.5)
        tilt = np.deg2rad(rng.uniform(8, 30))
        kid = _tube(rng, k_bot, k_top, kcx, kcy, rng.uniform(27, 33) * s, rng.uniform(17, 21) * s,
                    np.pi / 2 - side * tilt, p=2.0, amps=(0.05, 0.03), drift=0.3)
        mid = np.exp(-((tt - 0.5) / 0.22) ** 2)             # the hilum shows in the middle slices
        for n, (k, box, r, u, v) in enumerate(kid.slices()):
            # the v axis points to -x (the patient's right) for both kidneys: medial is -v for the right
            # kidney and +v for the left one
            med = v * side
            w = max(mid[n], 1e-3)
            hilum = ((med - 1.0) / (0.45 * w)) ** 2 + (u / (0.28 * w)) ** 2 < 1
            inside = (r < 1) & ~hilum
            val = np.where(r > 0.72, lev["kidney"], lev["kidney_medulla"]).astype(np.float32)
            sinus = ((med - 0.55) / (0.38 * w)) ** 2 + (u / (0.36 * w)) ** 2 < 1
            val[sinus] = lev["sinus"]
            if side > 0:
                val *= np.float32(lev["left_gain"])
            cv.paint(k, box, inside, val, label=LABELS[name])
            cv.paint(k, box, hilum & (r < 1.05), lev["viscera"] * 0.6, label=0)


def _paint_back_muscles(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, spine: _Spine,
                        ps_top: float) -> None:
    """Psoas (tapering off above ``ps_top``) and paraspinal muscles on both sides of the spine."""
    nz = cv.img.shape[2]
    vb_r, vb_x, vb_y = spine.vb_r, spine.vb_x, spine.vb_y
    for side in (-1, 1):
        ks = np.arange(0, nz)
        rr = 4 + 9 * np.clip((ps_top - ks) / max(ps_top, 1), 0, 1)
        t = _tube(rng, 0, nz - 1, vb_x + side * (vb_r + 6 + 0.6 * rr), vb_y + 2, rr * 1.2, rr, 0.0, amps=(0.05,))
        for k, box, r, _, _ in t.slices():
            if k <= ps_top:
                cv.paint(k, box, r < 1, lev["muscle"], label=0)
        t = _tube(rng, 0, nz - 1, vb_x + side * rng.uniform(20, 25),
                  frame.y_post + 2 + frame.fat_t + rng.uniform(15, 19),
                  rng.uniform(15, 19), rng.uniform(13, 17), side * rng.uniform(0, 0.3), amps=(0.05,))
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["muscle"] * 0.9, label=0, clip="body")


def _paint_spine(rng: np.random.Generator, cv: _Canvas, lev: dict, spine: _Spine, za: np.ndarray) -> None:
    """Posterior arch, vertebral bodies alternating with discs along z, and the bright CSF canal."""
    nz = cv.img.shape[2]
    vb_r, vb_x, vb_y = spine.vb_r, spine.vb_x, spine.vb_y
    disc_period, disc_phase = rng.uniform(4.0, 4.6), rng.uniform(0, 4)
    disc = ((za + disc_phase) % disc_period) < 0.9
    arch = _tube(rng, 0, nz - 1, vb_x, vb_y - vb_r - 10, vb_r * 1.3, 11.0, 0.0)
    for k, box, r, _, _ in arch.slices():
        cv.paint(k, box, r < 1, lev["arch"], label=0, clip="body")
    verts = _tube(rng, 0, nz - 1, vb_x, vb_y, vb_r, vb_r * 0.92, 0.0, amps=(0.03,))
    for k, box, r, _, _ in verts.slices():
        cv.paint(k, box, r < 1, lev["disc"] if disc[k] else lev["vertebra"], label=0, clip="body")
        cv.paint(k, box, (r < 1) & (r > 0.93), lev["arch"], label=0, clip="body")
    canal_r = rng.uniform(5.5, 7.5)
    canal = _tube(rng, 0, nz - 1, vb_x, vb_y - vb_r - canal_r - 2, canal_r, canal_r * 0.9, 0.0)
    for k, box, r, _, _ in canal.slices():
        cv.paint(k, box, r < 1, lev["csf"], label=0, clip="body")


def _paint_vessels(rng: np.random.Generator, cv: _Canvas, lev: dict, frame: _BodyFrame, spine: _Spine,
                   za: np.ndarray, nz_nat: int, bowel_top: float, f: float) -> None:
    """Aorta, IVC and a few small mesenteric vessels."""
    nz = cv.img.shape[2]
    cx0, cy0, bx, bya = frame.cx0, frame.cy0, frame.bx, frame.bya
    vb_r, vb_x, vb_y = spine.vb_r, spine.vb_x, spine.vb_y
    ao_r = rng.uniform(7, 10)
    aorta = _tube(rng, 0, nz - 1, vb_x + rng.uniform(6, 14), vb_y + vb_r + ao_r + 1 + 3 * np.sin(za / nz_nat * 2),
                  ao_r, ao_r, 0.0)
    for k, box, r, _, _ in aorta.slices():
        cv.paint(k, box, r < 1, lev["vessel_wall"], label=0, clip="body")
        cv.paint(k, box, r < 0.75, lev["aorta"], label=0, clip="body")
    ivc = _tube(rng, 0, nz - 1, vb_x - vb_r * rng.uniform(0.9, 1.4), vb_y + vb_r + rng.uniform(8, 14),
                rng.uniform(9, 13), rng.uniform(6, 9), rng.uniform(-0.3, 0.3), amps=(0.08,))
    for k, box, r, _, _ in ivc.slices():
        cv.paint(k, box, r < 1, lev["ivc"], label=0, clip="body")
    for _ in range(int(rng.integers(8, 16))):              # small mesenteric vessels
        k0 = int(rng.integers(0, max(1, bowel_top * f)))
        k1 = min(nz - 1, k0 + int(rng.integers(1, 4)))
        rr = rng.uniform(1.5, 3)
        t = _tube(rng, k0, k1, cx0 + bx * rng.uniform(-0.3, 0.4) + rng.normal(0, 3, 1),
                  cy0 + bya * rng.uniform(0, 0.5), rr, rr, 0.0)
        for k, box, r, _, _ in t.slices():
            cv.paint(k, box, r < 1, lev["ivc"] * rng.uniform(0.9, 1.4), label=0)


def _liver_vessels(rng, cv: _Canvas, lev: dict, right: _Tube, liv_bot: int, liv_top: int, f: float) -> None:
    """Bright hepatic/portal branches: a small tree of 3D segments radiating from the liver's upper medial
    part, drawn only where the label is liver. Distances in px; one slice is 7.7 / 1.25 = 6.2 px thick, and
    segments run mostly in-plane so that they show as lines, as in the real scans."""
    zpx = SPACING[2] / SPACING[0] / f
    n = len(right.ks)
    segs = []
    for _ in range(int(rng.integers(6, 11))):
        n0 = int(n * rng.uniform(0.4, 0.85))
        p0 = np.array([right.cx[n0] + right.ax[n0] * rng.uniform(0.3, 0.7), right.cy[n0] + rng.normal(0, 6),
                       right.ks[n0] * zpx])
        ang = rng.uniform(0, 2 * np.pi)
        length = max(right.ax[n0], right.ay[n0]) * rng.uniform(0.7, 1.3)
        p1 = p0 + np.array([np.cos(ang) * length, np.sin(ang) * length, rng.uniform(-2.5, 1.0) * zpx])
        rad = rng.uniform(1.6, 2.8)
        segs.append((p0, p1, rad))
        for _ in range(int(rng.integers(2, 5))):          # side branches off the trunk
            q0 = p0 + (p1 - p0) * rng.uniform(0.3, 0.7)
            a2 = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
            l2 = length * rng.uniform(0.3, 0.6)
            q1 = q0 + np.array([np.cos(a2) * l2, np.sin(a2) * l2, rng.uniform(-1.2, 1.2) * zpx])
            segs.append((q0, q1, rad * 0.65))
    for p0, p1, rad in segs:
        d = p1 - p0
        length2 = float(d @ d) + 1e-6
        k_lo = int(np.floor(min(p0[2], p1[2]) / zpx - 0.5))
        k_hi = int(np.ceil(max(p0[2], p1[2]) / zpx + 0.5))
        i0, i1 = int(max(0, min(p0[0], p1[0]) - rad - 2)), int(min(SIZE, max(p0[0], p1[0]) + rad + 3))
        j0, j1 = int(max(0, min(p0[1], p1[1]) - rad - 2)), int(min(SIZE, max(p0[1], p1[1]) + rad + 3))
        if i0 >= i1 or j0 >= j1:
            continue
        x = np.arange(i0, i1, dtype=np.float32)[:, None] - np.float32(p0[0])
        y = np.arange(j0, j1, dtype=np.float32)[None, :] - np.float32(p0[1])
        for k in range(max(liv_bot, k_lo), min(liv_top, k_hi) + 1):
            zz = np.float32(k * zpx - p0[2])
            tpar = np.clip((x * d[0] + y * d[1] + zz * d[2]) / length2, 0, 1)
            # the slab of a slice is thick: a vessel shows where it passes within half a slice of its centre
            dz = np.maximum(np.abs(zz - tpar * d[2]) - 0.5 * zpx, 0)
            dist2 = (x - tpar * d[0]) ** 2 + (y - tpar * d[1]) ** 2 + dz ** 2
            rr = rad * (1.0 - 0.4 * tpar)                  # branches thin out towards the periphery
            cv.paint(k, (i0, i1, j0, j1), dist2 < rr * rr, lev["liver_vessel"], only_label=LABELS["liver"])


def _acquire(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Texture, partial-volume blur, bias field, Rician noise and the CHAOS bright-tail clip."""
    nz = img.shape[2]
    # smooth tissue texture (a few per cent, correlation ~1 cm)
    img *= 1.0 + np.float32(rng.uniform(0.04, 0.08)) * _smooth_field(rng, nz, 8.0, 2.0)
    # partial volume: slight blur in-plane and along z (7.7 mm slices average neighbouring tissue)
    img = ndimage.gaussian_filter(img, (rng.uniform(0.6, 0.9),) * 2 + (rng.uniform(0.3, 0.45),), truncate=3.0)
    # multiplicative bias: low-order polynomial in-plane times a z profile that dims the stack ends
    g = np.linspace(-1, 1, SIZE, dtype=np.float32)
    X, Y = g[:, None], g[None, :]
    c = np.clip(rng.normal(0, 1, 5), -1.5, 1.5) * np.array([0.1, 0.12, 0.07, 0.07, 0.07])
    bias2d = np.exp(c[0] * X + c[1] * Y + c[2] * X * Y + c[3] * (X * X - 0.33) + c[4] * (Y * Y - 0.33))
    zz = np.linspace(-1, 1, nz, dtype=np.float32)
    biasz = np.exp(-rng.uniform(0.15, 0.5) * zz ** 4 + rng.normal(0, 0.08) * zz)
    gain = np.float32(rng.uniform(0.85, 1.2))
    img *= (gain * bias2d.astype(np.float32))[:, :, None]
    img *= biasz.astype(np.float32)[None, None, :]
    # Rician noise: magnitude of the complex signal with Gaussian noise on both channels
    sigma = np.float32(rng.uniform(4.5, 8.0))
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt(re * re + im * im)
    # the CHAOS preprocessing clips the top 0.5 % of the histogram (method.md 1.3)
    flat = out.reshape(-1)
    kth = int(0.995 * (flat.size - 1))
    top = np.partition(flat, kth)[kth]
    np.minimum(out, top, out=out)
    return out


# ----------------------------------------------------------------------------------------------- public
def checksum(index: int, seed: int = 0, n_slices: int | None = None) -> str:
    """sha256 of the generator settings and version: identifies a phantom volume without its voxels."""
    text = json.dumps({"generator": "engine.phantom", "version": PHANTOM_VERSION, "index": int(index),
                       "seed": int(seed), "n_slices": n_slices}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_args(index: int, seed: int, n_slices: int | None) -> None:
    for name, val in (("index", index), ("seed", seed)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"phantom: {name} must be a non-negative integer, got {val!r}")
    if n_slices is not None and (isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer))
                                 or n_slices < 1):
        raise ValueError(f"phantom: n_slices must be a positive integer or None, got {n_slices!r}")


def generate(index: int, seed: int = 0, n_slices: int | None = None) -> PhantomArrays:
    """Render one phantom patient with its ground truth.

    Parameters
    ----------
    index : int
        Patient number (>= 0); each index is a different anatomy.
    seed : int
        Dataset seed (>= 0); the same (index, seed, n_slices) always gives identical arrays.
    n_slices : int or None
        Force the number of slices. None: Z is drawn in 30..45 from (seed, index). Otherwise the patient's
        anatomy is compressed or stretched along z to fit (organ extents then scale with it).

    Returns
    -------
    PhantomArrays
        image (256, 256, Z) float32, label (256, 256, Z) uint8, body (256, 256, Z) bool, planned extents.
    """
    _check_args(index, seed, n_slices)
    rng = _rng(seed, index)
    nz_nat = int(rng.integers(Z_RANGE[0], Z_RANGE[1] + 1))
    nz = nz_nat if n_slices is None else int(n_slices)
    cv, body, ext = _render(rng, nz_nat, nz)
    image = _acquire(rng, cv.img)
    return PhantomArrays(image=image, label=cv.lab, body=body, extents=ext)


def make_volume(index: int, seed: int = 0, n_slices: int | None = None) -> Volume:
    """One phantom patient as a :class:`engine.volume.Volume` (CHAOS-T2 geometry, LAS).

    Parameters
    ----------
    index, seed, n_slices
        See :func:`generate`.

    Returns
    -------
    Volume
        id ``phantom_<index:03d>``, image (256, 256, Z) float32 (raw scale, air < 50), label uint8 with
        1 liver, 2 right kidney, 3 left kidney, 4 spleen; spacing (1.25, 1.25, 7.7) mm; path
        ``phantom:<index>``; checksum from :func:`checksum`.
    """
    arrays = generate(index, seed, n_slices)
    nz = arrays.image.shape[2]
    affine = np.diag([*_AFFINE_DIAG, 1.0])
    # world origin roughly at the volume centre, like a scanner's isocentre
    affine[:3, 3] = -affine[:3, :3] @ np.array([(SIZE - 1) / 2, (SIZE - 1) / 2, (nz - 1) / 2])
    return Volume(id=f"phantom_{index:03d}", image=arrays.image, spacing=SPACING, affine=affine,
                  orientation="LAS", label=arrays.label, path=f"phantom:{index}",
                  checksum=checksum(index, seed, n_slices))
