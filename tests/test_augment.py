"""Augmentation of method.md 2.2: affine composition, warps, elastic field, mask rule, gamma, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alpnet import augment as A
from alpnet.config import AugmentConfig, ConfigError, load


def _apply(m: torch.Tensor, x: float, y: float) -> tuple[float, float]:
    p = m @ torch.tensor([x, y, 1.0], dtype=torch.float64)
    return float(p[0]), float(p[1])


def test_affine_composition_order_rotate_translate_shear_zoom():
    h, w = 64, 48
    cx, cy = (w - 1) / 2, (h - 1) / 2
    rot, tx, ty, sh, z = 4.0, 2.5, -3.0, 3.0, 1.1
    m = A.affine_from_params(*(torch.tensor([v], dtype=torch.float64) for v in (rot, tx, ty, sh, z)), h, w)[0]
    x, y = 10.0, 20.0
    # step by step: rotate about the centre, translate, shear about the origin, zoom about the centre
    r, t = math.radians(rot), math.radians(sh)
    x, y = cx + math.cos(r) * (x - cx) - math.sin(r) * (y - cy), cy + math.sin(r) * (x - cx) + math.cos(r) * (y - cy)
    x, y = x + tx, y + ty
    x, y = x - math.sin(t) * y, math.cos(t) * y
    x, y = cx + z * (x - cx), cy + z * (y - cy)
    assert _apply(m, 10.0, 20.0) == pytest.approx((x, y), abs=1e-9)


def test_random_affine_parameters_stay_in_their_ranges():
    cfg = AugmentConfig(rotate_deg=0.0, translate_px=5.0, shear_deg=0.0, zoom=[1.0, 1.0])
    m = A.affine_matrices(200, cfg, 32, 32, torch.Generator().manual_seed(0))
    assert torch.allclose(m[:, :2, :2], torch.eye(2, dtype=torch.float64).expand(200, 2, 2))
    assert m[:, :2, 2].abs().max() <= 5.0 and m[:, :2, 2].abs().max() > 4.0
    cfg = AugmentConfig(rotate_deg=0.0, translate_px=0.0, shear_deg=0.0, zoom=[0.9, 1.2])
    m = A.affine_matrices(200, cfg, 32, 32, torch.Generator().manual_seed(0))
    zoom = m[:, 0, 0]
    assert zoom.min() >= 0.9 and zoom.max() <= 1.2 and torch.equal(m[:, 0, 0], m[:, 1, 1])
    # zoom about the centre: the centre pixel stays put
    centre = torch.einsum("nij,j->ni", m, torch.tensor([15.5, 15.5, 1.0], dtype=torch.float64))
    assert torch.allclose(centre[:, :2], torch.full((200, 2), 15.5, dtype=torch.float64))


def test_warp_affine_moves_content_forward_with_zero_border():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 5, 4] = 1.0                                    # row 5, column 4
    m = A.affine_from_params(*(torch.tensor([v], dtype=torch.float64) for v in (0, 3, 2, 0, 1)), 16, 16)
    out = A.warp_affine(x, m)
    assert out[0, 0, 7, 7] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)
    full = A.warp_affine(torch.ones(1, 1, 16, 16), m)
    assert float(full[0, 0, 0, 0]) == 0.0 and float(full[0, 0, 15, 15]) == pytest.approx(1.0)


def test_zoom_above_one_enlarges_content():
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, 12:21, 12:21] = 1.0
    m = A.affine_from_params(*(torch.tensor([v], dtype=torch.float64) for v in (0, 0, 0, 0, 1.2)), 33, 33)
    assert A.warp_affine(x, m).sum() > x.sum() * 1.3


def test_gaussian_blur_equals_reflect101_2d_convolution():
    noise = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1)) * 2 - 1
    k = A.gaussian_kernel1d(5.0, 21)
    ref = F.conv2d(F.pad(noise[:, None], (10, 10, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, 10, 10), mode="reflect"), k.view(1, 1, -1, 1))[:, 0]
    assert torch.allclose(A.gaussian_blur(noise, 5.0, 21), ref, atol=1e-6)
    assert A.gaussian_kernel1d(5.0, 21).sum() == pytest.approx(1.0)
    # reflect-101 border: a field symmetric about the first row stays symmetric (row -1 mirrors row 1)
    e = torch.zeros(1, 40, 50)
    e[0, 1] = 1.0
    b = A.gaussian_blur(e, 5.0, 21)
    assert b[0, 0].sum() > b[0, 2].sum()


def test_elastic_field_is_mild_and_smooth():
    d = A.elastic_displacement(4, 128, 128, 10.0, 5.0, 21, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert d.shape == (4, 128, 128, 2)
    assert 0.05 < float(d.abs().mean()) < 1.0            # method.md: well under a pixel
    # blurred: neighbours differ by a few hundredths of a pixel (raw alpha * noise differs by ~6.7 px)
    assert float((d[:, 1:] - d[:, :-1]).abs().mean()) < 0.1


def test_warp_elastic_zero_displacement_is_identity():
    x = torch.randn(2, 3, 24, 20)
    assert torch.allclose(A.warp_elastic(x, torch.zeros(2, 24, 20, 2)), x, atol=1e-5)


def test_fg_channel_rule_equals_rounded_onehot_argmax():
    cfg = AugmentConfig(rotate_deg=20.0, translate_px=9.0, shear_deg=10.0, zoom=[0.6, 1.4])
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(6, 48, 48)
    mask[:, 10:30, 5:40] = 1
    mask[:, :3, :] = 1                                     # touches the border
    m = A.affine_matrices(6, cfg, 48, 48, gen)
    d = A.elastic_displacement(6, 48, 48, 10.0, 5.0, 21, gen, torch.device("cpu"))
    onehot = torch.stack([1 - mask, mask], dim=1)
    ref = A.warp_elastic(A.warp_affine(onehot, m), d).round().argmax(dim=1)
    fg = A.warp_elastic(A.warp_affine(mask[:, None], m), d)[:, 0]
    assert torch.equal((fg > 0.5).long(), ref)


def test_gamma_transform_formula_and_range():
    img = torch.linspace(-2, 3, 100).view(1, 10, 10).repeat(2, 1, 1)
    out = A.gamma_transform(img, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert torch.allclose(out[0], img[0], atol=1e-4)
    r = 5.0 + 1e-5
    expected = r * ((img[1] + 2 + 1e-5) / r) ** 0.5 - 2
    assert torch.allclose(out[1], expected, atol=1e-5)
    assert float(out[1].min()) == pytest.approx(-2, abs=1e-2) and float(out[1].max()) == pytest.approx(3, abs=1e-3)


def test_augment_pairs_identity_settings_and_outputs():
    cfg = AugmentConfig(rotate_deg=0.0, translate_px=0.0, shear_deg=0.0, zoom=[1.0, 1.0], elastic_alpha=0.0,
                        gamma=[1.0, 1.0])
    img = torch.randn(2, 32, 32)
    mask = (torch.rand(2, 32, 32) > 0.5).long()
    out, m = A.augment_pairs(img, mask, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out, img, atol=1e-4) and torch.equal(m, mask)


def test_augment_pairs_independent_per_image_and_deterministic():
    cfg = AugmentConfig()
    img = torch.randn(32, 32).expand(2, 32, 32).contiguous()
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[:, 8:24, 8:24] = 1
    a = A.augment_pairs(img, mask, cfg, torch.Generator().manual_seed(5))
    b = A.augment_pairs(img, mask, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0][0], a[0][1])           # the two copies get different parameters
    assert set(np.unique(a[1].numpy())) <= {0, 1} and a[1].dtype == torch.int64
    # mild augmentation: most of the square stays foreground
    inter = (a[1] & mask).sum(dim=(1, 2)).float()
    assert bool((inter / mask.sum(dim=(1, 2)) > 0.6).all())


def test_bad_augment_values_are_rejected():
    with pytest.raises(ConfigError, match="augment.zoom"):
        load(None, ["augment.zoom=[1.2, 0.9]"])
    with pytest.raises(ConfigError, match="elastic_kernel"):
        load(None, ["augment.elastic_kernel=20"])


def test_warp_elastic_equals_the_reference_scipy_reflect_resampler():
    # the reference resamples the elastic field with scipy map_coordinates(order=1, mode="reflect"), which
    # mirrors about the outer pixel edges like grid_sample's reflection: equal on every pixel, borders included
    ndimage = pytest.importorskip("scipy.ndimage")
    img = torch.randn(1, 1, 30, 44, generator=torch.Generator().manual_seed(4))
    d = 3.0 * A.elastic_displacement(1, 30, 44, 10.0, 5.0, 21, torch.Generator().manual_seed(5), torch.device("cpu"))
    got = A.warp_elastic(img, d)[0, 0].numpy()
    yy, xx = np.mgrid[0:30, 0:44].astype(np.float64)
    dd = d[0].numpy().astype(np.float64)
    ref = ndimage.map_coordinates(img[0, 0].numpy().astype(np.float64), [yy + dd[..., 1], xx + dd[..., 0]],
                                  order=1, mode="reflect")
    assert np.abs(got - ref).max() < 1e-4
