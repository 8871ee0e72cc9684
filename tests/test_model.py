"""ALPNet (method.md 3): encoders, ALP pooling on hand-made masks, scores, losses, PAR, predict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from alpnet.backbones import ENCODERS, EncoderError, build_encoder, load_pretrained
from alpnet.config import ModelConfig
from alpnet.model import ALPNet, class_prototypes, class_scores, downsample_mask


def tiny_model(**kw) -> ALPNet:
    torch.manual_seed(0)
    return ALPNet(ModelConfig(encoder="tiny", **kw), quiet=True)


def episode(size: int = 64, batch: int = 1):
    torch.manual_seed(1)
    img = torch.randn(batch, 3, size, size)
    fg = torch.zeros(batch, size, size)
    fg[:, 0:32, 0:32] = 1                                  # exactly the top-left 4x4 window of the 8x8 grid
    return img, fg, img + 0.1 * torch.randn_like(img), fg.long()


# ------------------------------------------------------------------------------------------ encoders
@pytest.mark.parametrize("name", ["tiny", "resnet18_l3", "resnet18"])
def test_encoders_give_256_channels_at_one_eighth(name):
    enc = build_encoder(name, 256, quiet=True)
    assert enc(torch.randn(2, 3, 64, 96)).shape == (2, 256, 8, 12)


def test_resnet101_is_the_dilated_deeplab_backbone():
    enc = build_encoder("resnet101", 256, quiet=True)
    assert enc.backbone.layer4[0].conv2.dilation == (2, 2) and enc.backbone.layer4[1].conv2.dilation == (4, 4)
    assert enc.proj.bias is None and enc.proj.in_channels == 2048
    with torch.no_grad():
        assert enc.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 256, 8, 8)


def test_random_init_notice_and_unknown_encoder(capsys):
    build_encoder("tiny", 8)
    assert "random init" in capsys.readouterr().out
    with pytest.raises(EncoderError, match="model.encoder"):
        build_encoder("vgg", 256)


def test_imagenet_checkpoint_keys_map_onto_the_encoder(tmp_path, capsys):
    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    enc = build_encoder("resnet18_l3", 256, quiet=True)
    counts = load_pretrained(enc, tmp_path / "r18.pth")
    n_l4 = sum(1 for k in src.state_dict() if k.startswith("layer4."))
    n_trunk = sum(1 for k in src.state_dict() if not k.startswith(("layer4.", "fc.")))
    assert counts == {"loaded": n_trunk, "missing": 0, "unexpected": n_l4, "mismatched": 0}
    assert torch.equal(enc.backbone.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"loaded {n_trunk}" in line and f"unexpected {n_l4}" in line


def test_coco_deeplab_checkpoint_keys_map_onto_the_encoder(tmp_path):
    coco = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                              aux_loss=True)
    torch.save(coco.state_dict(), tmp_path / "coco.pth")
    enc = build_encoder("resnet50", 256, quiet=True)
    counts = load_pretrained(enc, tmp_path / "coco.pth")
    n_backbone = sum(1 for k in coco.state_dict() if k.startswith("backbone."))
    assert counts["loaded"] == n_backbone and counts["missing"] == 0 and counts["unexpected"] == 0
    assert torch.equal(enc.backbone.layer4[2].conv3.weight, coco.backbone.layer4[2].conv3.weight)


def test_pretrained_file_errors_are_one_line(tmp_path):
    enc = build_encoder("resnet18_l3", 256, quiet=True)
    with pytest.raises(EncoderError, match="not found"):
        load_pretrained(enc, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(EncoderError) as err:
        load_pretrained(enc, tmp_path / "junk.pth")
    assert "junk.pth" in str(err.value) and "\n" not in str(err.value)
    # a resnet18 file into resnet50: every tensor has the wrong shape or name, counted, nothing crashes
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    counts = load_pretrained(build_encoder("resnet50", 256, quiet=True), tmp_path / "r18.pth")
    assert counts["mismatched"] > 0 and counts["missing"] > 0
    # a truncated weights file: torch's finding only, not the sentences of advice it adds
    (tmp_path / "cut.pth").write_bytes((tmp_path / "r18.pth").read_bytes()[:4096])
    with pytest.raises(EncoderError) as err:
        load_pretrained(enc, tmp_path / "cut.pth")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'cut.pth'}: cannot read weights (") and message.endswith(")")
    assert "\n" not in message and ". " not in message.split("(", 1)[1]


def test_registry_lists_paper_and_cpu_encoders():
    assert {"resnet101", "resnet50", "resnet18", "resnet18_l3", "tiny"} <= set(ENCODERS)


# ------------------------------------------------------------------------------------------ ALP pooling
def test_downsample_mask_samples_the_central_2x2_block():
    mask = torch.zeros(1, 64, 64)
    mask[0, 11, 19] = 1                                    # row 8*1+3, col 8*2+3
    low = downsample_mask(mask, (8, 8))
    assert low[0, 1, 2] == pytest.approx(0.25) and float(low.sum()) == pytest.approx(0.25)
    mask2 = torch.zeros(1, 64, 64)
    mask2[0, 8:11, 16:19] = 1                              # same cell, but outside its sampled block
    assert float(downsample_mask(mask2, (8, 8)).sum()) == 0.0


def _feats(c: int = 4, h: int = 8) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(c, h, h)


def test_fg_local_and_global_when_a_4x4_window_is_full():
    mask = torch.zeros(8, 8)
    mask[0:4, 0:8] = 1                                     # fills two 4x4 windows
    protos, case = class_prototypes(_feats(), mask, 4, 0.95, "fg")
    assert case == "local" and protos.shape == (3, 4)     # 2 local + 1 global
    f = _feats()
    assert torch.allclose(protos[0], f[:, 0:4, 0:4].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(protos[-1], (f * mask).sum(dim=(1, 2)) / (mask.sum() + 1e-5), atol=1e-6)
    # at test time (L = 2) the same mask gives 8 local windows + global
    protos, case = class_prototypes(_feats(), mask, 2, 0.95, "fg")
    assert case == "local" and protos.shape[0] == 9


def test_fg_global_only_when_no_4x4_window_reaches_the_threshold():
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1                                     # 4x4 block straddling four windows
    protos, case = class_prototypes(_feats(), mask, 4, 0.95, "fg")
    assert case == "global_only" and protos.shape[0] == 1
    # 2x2 windows would qualify, but the rule uses 4x4 even at test time
    protos, case = class_prototypes(_feats(), mask, 2, 0.95, "fg")
    assert case == "global_only" and protos.shape[0] == 1


def test_threshold_is_strict_for_windows_and_inclusive_for_the_fg_rule():
    mask = torch.full((8, 8), 0.5)                         # 0.5: exact in float32, so "equal" is really equal
    protos, case = class_prototypes(_feats(), mask, 4, 0.5, "fg")
    assert case == "local" and protos.shape[0] == 1       # rule passes (>=), no window is > 0.5
    protos, case = class_prototypes(_feats(), mask, 4, 0.5, "bg")
    assert case == "fallback_global"


def test_bg_local_only_and_its_fallback():
    fg = torch.zeros(8, 8)
    fg[0:4, 0:4] = 1
    protos, case = class_prototypes(_feats(), 1 - fg, 4, 0.95, "bg")
    assert case == "local" and protos.shape[0] == 3       # three background windows, no global
    fg = torch.ones(8, 8)
    fg[:, 7] = 0                                           # background is one thin column
    protos, case = class_prototypes(_feats(), 1 - fg, 4, 0.95, "bg")
    assert case == "fallback_global" and protos.shape[0] == 1


def test_empty_mask_gives_no_prototype_and_a_zero_score():
    protos, case = class_prototypes(_feats(), torch.zeros(8, 8), 4, 0.95, "fg")
    assert case == "empty" and protos.shape == (0, 4)
    assert torch.equal(class_scores(_feats(), protos, 20.0), torch.zeros(8, 8))


def test_class_scores_softmax_weighted_cosine():
    q = _feats()
    p = torch.randn(3, 4)
    s = 20 * F.cosine_similarity(q[None], p[:, :, None, None], dim=1)        # (3, h, w)
    expected = (torch.softmax(s, dim=0) * s).sum(dim=0)
    assert torch.allclose(class_scores(q, p, 20.0), expected, atol=1e-4)
    assert torch.allclose(class_scores(q, p[:1], 20.0), s[0], atol=1e-4)    # one prototype: plain 20 * cos
    # norm clamp 1e-4: a zero query vector scores 0 rather than NaN
    q0 = q.clone()
    q0[:, 0, 0] = 0
    assert float(class_scores(q0, p, 20.0)[0, 0]) == 0.0


# ------------------------------------------------------------------------------------------ network
def test_forward_shapes_losses_and_gradients():
    model = tiny_model()
    img, fg, qimg, qmask = episode(batch=2)
    out = model(img, fg, qimg, qmask, train=True)
    assert out["logits"].shape == (2, 2, 64, 64) and out["logits_low"].shape == (2, 2, 8, 8)
    for k in ("loss", "loss_query", "loss_par"):
        assert out[k].ndim == 0 and torch.isfinite(out[k])
    assert torch.allclose(out["loss"], out["loss_query"] + out["loss_par"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    c = out["counters"]
    assert c["episodes"] == 2 and c["fg_global_only"] + c["fg_empty"] <= 2


def test_query_loss_is_the_weighted_cross_entropy():
    model = tiny_model()
    img, fg, qimg, qmask = episode()
    out = model(img, fg, qimg, qmask)
    expected = F.cross_entropy(out["logits"], qmask, weight=torch.tensor([0.05, 1.0]))
    assert torch.allclose(out["loss_query"], expected)


def test_alignment_loss_matches_its_definition():
    model = tiny_model()
    img, fg, qimg, qmask = episode()
    out = model(img, fg, qimg, qmask)
    with torch.no_grad():
        feats = model.encode(torch.cat([img, qimg]))
        sup_f, qry_f = feats[:1], feats[1:]
        pred_fg = (out["logits_low"].argmax(dim=1) == 1).float()[0]
        fg_p, _ = class_prototypes(qry_f[0], pred_fg, 4, 0.95, "fg")
        bg_p, _ = class_prototypes(qry_f[0], 1 - pred_fg, 4, 0.95, "bg")
        low = torch.stack([class_scores(sup_f[0], bg_p, 20.0), class_scores(sup_f[0], fg_p, 20.0)])[None]
        up = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(up, fg.long())          # unweighted
    assert torch.allclose(out["loss_par"].detach(), expected, atol=1e-5)


def test_empty_support_foreground_is_handled_and_counted():
    model = tiny_model()
    img, fg, qimg, qmask = episode()
    out = model(img, torch.zeros_like(fg), qimg, qmask)
    assert out["counters"]["fg_empty"] == 1 and torch.isfinite(out["loss"])
    assert torch.equal(out["logits_low"][0, 1], torch.zeros(8, 8))
    out = model(img, torch.ones_like(fg), qimg, qmask)    # nothing is background
    assert out["counters"]["bg_empty"] == 1 and torch.isfinite(out["loss"])


def test_par_with_empty_predicted_foreground_is_counted_not_skipped():
    model = tiny_model()
    img, fg, qimg, qmask = episode()
    with torch.no_grad():
        sup_f, qry_f = model.encode(img), model.encode(qimg)
    counters = {k: 0 for k in ("fg_local_protos", "bg_local_protos", "par_fg_global_only", "par_fg_empty",
                               "par_bg_fallback_global", "par_bg_empty")}
    all_bg = torch.zeros(1, 2, 8, 8)
    all_bg[:, 0] = 1.0
    loss = model.alignment_loss(qry_f, all_bg, sup_f, fg, 4, counters)
    assert counters["par_fg_empty"] == 1 and torch.isfinite(loss) and float(loss) > 0


def test_predict_uses_eval_mode_test_window_and_support_cache():
    model = tiny_model()
    model.train()
    img, fg, qimg, _ = episode()
    out = model.predict(img, fg, qimg)
    assert model.training                                  # mode restored
    assert out["pred"].shape == (1, 64, 64) and out["pred"].dtype == torch.int64
    model.eval()
    with torch.no_grad():
        cached = model.encode(img)
    again = model.predict(None, fg, qimg, support_feats=cached)
    assert torch.allclose(out["logits"], again["logits"], atol=1e-5)
    # L = 2: the fg square covers 4 of the 2x2 windows (and passes the 4x4 rule): local + global
    assert out["counters"]["fg_global_only"] == 0 and out["counters"]["fg_local_protos"] == 4


def test_window_size_differs_between_train_and_test():
    model = tiny_model()
    model.eval()
    img, fg, qimg, _ = episode()
    with torch.no_grad():
        train_out = model(img, fg, qimg, train=True)
        test_out = model(img, fg, qimg, train=False)
    assert train_out["counters"]["fg_local_protos"] == 1 and test_out["counters"]["fg_local_protos"] == 4
    assert train_out["counters"]["bg_local_protos"] == 3 and test_out["counters"]["bg_local_protos"] == 12


# ------------------------------------------------------------------------------------------ audit checks
def _alp_by_hand(f, m, window, threshold, mode, rule=4):
    """method.md 3.3 written as plain loops over windows (independent of avg_pool2d)."""
    c, h, w = f.shape
    mass = float(m.sum())
    if mass <= 0:
        return torch.zeros(0, c), "empty"
    glob = (f * m).sum(dim=(1, 2)) / (mass + 1e-5)
    if mode == "fg":
        best = max(float(m[i:i + rule, j:j + rule].mean()) for i in range(0, h - rule + 1, rule)
                   for j in range(0, w - rule + 1, rule))
        if best < threshold:
            return glob[None], "global_only"
    local = [f[:, i:i + window, j:j + window].mean(dim=(1, 2))
             for i in range(0, h - window + 1, window) for j in range(0, w - window + 1, window)
             if float(m[i:i + window, j:j + window].mean()) > threshold]
    local = torch.stack(local) if local else torch.zeros(0, c)
    if mode == "fg":
        return torch.cat([local, glob[None]]), "local"
    return (local, "local") if len(local) else (glob[None], "fallback_global")


def test_alp_pooling_matches_a_hand_loop_on_non_square_soft_masks():
    gen = torch.Generator().manual_seed(7)
    for trial in range(60):
        h, w = (int(v) for v in torch.randint(4, 13, (2,), generator=gen))
        f = torch.randn(5, h, w, generator=gen, dtype=torch.float64).float()
        # soft values of a bilinear 2x2 sample (multiples of 1/4), in blocks so that some windows qualify
        m = (torch.rand(h, w, generator=gen) < torch.rand(1, generator=gen)).float()
        if trial % 2:
            m = torch.round(torch.rand(h, w, generator=gen) * 4) / 4
        for window in (2, 4):
            for mode, mm in (("fg", m), ("bg", 1 - m)):
                protos, case = class_prototypes(f, mm, window, 0.95, mode)
                exp, exp_case = _alp_by_hand(f, mm, window, 0.95, mode)
                assert case == exp_case and protos.shape == exp.shape
                assert torch.allclose(protos, exp, atol=1e-5)


def test_batched_non_square_episodes_equal_one_at_a_time():
    model = tiny_model().eval()                            # eval: BatchNorm does not couple the episodes
    torch.manual_seed(3)
    img, qimg = torch.randn(3, 3, 48, 80), torch.randn(3, 3, 48, 80)
    fg = torch.zeros(3, 48, 80)
    fg[0, :32, :32] = 1
    fg[1, 8:40, 16:72] = 1
    fg[2, 20:, 50:] = 1
    with torch.no_grad():
        out = model(img, fg, qimg, fg.long(), train=True)
        assert out["logits"].shape == (3, 2, 48, 80) and out["logits_low"].shape == (3, 2, 6, 10)
        for b in range(3):
            one = model(img[b:b + 1], fg[b:b + 1], qimg[b:b + 1], train=True)
            assert torch.allclose(one["logits"], out["logits"][b:b + 1], atol=1e-5)


def test_unequal_support_and_query_batches_are_refused():
    # a single support for two queries used to return one prediction and drop the second query
    model = tiny_model()
    img, fg, qimg, _ = episode(batch=2)
    with torch.no_grad():
        feats = model.eval().encode(img[:1])
    with pytest.raises(ValueError, match="same batch size"):
        model.predict(None, fg[:1], qimg, support_feats=feats)
    out = model.predict(None, fg[:1].expand(2, -1, -1), qimg, support_feats=feats.expand(2, -1, -1, -1))
    assert out["pred"].shape == (2, 64, 64)
