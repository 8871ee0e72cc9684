"""ALPNet: few-shot segmentation with adaptive local prototype pooling (method.md section 3).

One episode = one support image with a binary foreground mask and one query image (1-way 1-shot). Shapes use
B episodes, C feature channels, (H, W) the image size and (h, w) = (H/8, W/8) the feature grid.

Pipeline of :meth:`ALPNet.forward`:
1. support and query go through the encoder in one batch (BatchNorm sees both, method.md 3.1);
2. the support masks are sampled down to (h, w) bilinearly (align_corners=False, method.md 3.2);
3. prototypes (:func:`class_prototypes`): background = local prototypes only (L x L average pooling, pooled mask
   > threshold); foreground = local + global if the 4x4-pooled mask reaches the threshold, else global only;
4. score of a class at each query position = softmax-weighted sum of alpha * cos(feature, prototype) over the
   class's prototypes (:func:`class_scores`); logits [bg, fg] are up-sampled bilinearly to (H, W);
5. losses: weighted cross-entropy on the query + prototype alignment (PAR, method.md 3.4).

Degenerate masks are handled explicitly (the reference code crashes on them and skips the batch):
- no background window above the threshold -> the background uses its global (masked-average) prototype;
- empty class mask (all zero at feature resolution) -> that class scores 0 everywhere, which is exactly what
  the reference's zero global prototype gives, but stated and counted instead of happening by accident.
Each case is counted in the ``counters`` dict every forward returns.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from alpnet.backbones import build_encoder

# Counter names returned by every forward (summed over the episodes of the batch).
COUNTERS = ("episodes", "fg_local_protos", "fg_global_only", "fg_empty", "bg_local_protos", "bg_fallback_global",
            "bg_empty", "par_fg_global_only", "par_fg_empty", "par_bg_fallback_global", "par_bg_empty")


def smallest_slice(cfg, stride: int) -> int:
    """Smallest slice side (px) the model can pool: its largest window (``local_size_train``,
    ``local_size_test`` or ``fg_rule_window``, in feature cells) times the encoder's output ``stride``.
    Smaller slices end inside torch's pooling ("Output size is too small")."""
    return int(stride) * max(int(cfg.local_size_train), int(cfg.local_size_test), int(cfg.fg_rule_window))


def safe_normalize(x: torch.Tensor, dim: int, eps: float = 1e-4) -> torch.Tensor:
    """x / max(||x||_2, eps) along ``dim`` (the reference's ``safe_norm``)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) 0/1 mask -> (B, h, w) soft mask by bilinear sampling, align_corners=False, no antialias.

    For H/h = 8 this is the mean of the 2x2 pixel block at rows 8i+3..8i+4 (method.md 3.2), not an area average.
    """
    return F.interpolate(mask[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def class_prototypes(feats: torch.Tensor, mask: torch.Tensor, window: int, threshold: float,
                     use_global: str, rule_window: int = 4) -> tuple[torch.Tensor, str]:
    """Prototypes of one class from one image's features.

    Parameters
    ----------
    feats : (C, h, w) tensor
        Features of the image the class is taken from.
    mask : (h, w) tensor in [0, 1]
        The class's soft mask at feature resolution.
    window : int
        L: local windows are non-overlapping L x L average pools of ``feats`` and ``mask``; a window is kept
        when its pooled mask value is > ``threshold`` (strict).
    threshold : float
        0.95 in the paper.
    use_global : {"fg", "bg"}
        ``"fg"``: local + global prototypes if the ``rule_window``-pooled mask has max >= threshold, else the
        global prototype only. ``"bg"``: local prototypes only; if none qualifies, the global prototype
        (explicit fallback).
    rule_window : int
        Window of the foreground rule (4 even at test time, method.md 3.3).

    Returns
    -------
    protos : (K, C) tensor
        K >= 1 prototypes, or K = 0 when the mask is empty (sum 0).
    case : str
        ``"local"`` (local prototypes, with the global one for fg), ``"global_only"``, ``"fallback_global"``
        (bg with no qualifying window) or ``"empty"``.
    """
    c = feats.shape[0]
    mass = mask.sum()
    if float(mass) <= 0.0:
        return feats.new_zeros((0, c)), "empty"
    glob = (feats * mask).sum(dim=(1, 2)) / (mass + 1e-5)
    if use_global == "fg":
        rule = F.avg_pool2d(mask[None, None], rule_window).max()
        if float(rule) < threshold:
            return glob[None], "global_only"
    pooled_f = F.avg_pool2d(feats[None], window)[0].flatten(1)          # (C, n_windows)
    pooled_m = F.avg_pool2d(mask[None, None], window).flatten()         # (n_windows,)
    local = pooled_f[:, pooled_m > threshold].t()                       # (K_local, C)
    if use_global == "fg":
        return torch.cat([local, glob[None]], dim=0), "local"
    if local.shape[0] == 0:
        return glob[None], "fallback_global"
    return local, "local"


def class_scores(query_feats: torch.Tensor, protos: torch.Tensor, alpha: float) -> torch.Tensor:
    """Score map of one class: sum_k softmax_k(s_k) * s_k with s_k = alpha * cos(query feature, prototype k).

    Parameters
    ----------
    query_feats : (C, h, w) tensor
    protos : (K, C) tensor; K = 0 (empty class) gives a zero map.
    alpha : float
        Cosine scale (20).

    Returns
    -------
    (h, w) tensor
    """
    if protos.shape[0] == 0:
        return query_feats.new_zeros(query_feats.shape[1:])
    q = safe_normalize(query_feats, dim=0)
    p = safe_normalize(protos, dim=1)
    sims = alpha * torch.einsum("kc,chw->khw", p, q)
    return (F.softmax(sims, dim=0) * sims).sum(dim=0)


class ALPNet(nn.Module):
    """Few-shot segmenter (encoder + ALP prototypes + cosine classifier).

    Parameters
    ----------
    cfg : alpnet.config.ModelConfig
        encoder, pretrained, feature_dim, local_size_train / local_size_test, fg_rule_window, threshold, alpha,
        bg_weight / fg_weight (query CE), par_weight.
    quiet : bool
        Suppress the encoder's random-init notice (weights loaded from a checkpoint right after).
    """

    def __init__(self, cfg, quiet: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder, cfg.feature_dim, cfg.pretrained, quiet=quiet)
        self.register_buffer("ce_weight", torch.tensor([cfg.bg_weight, cfg.fg_weight], dtype=torch.float32),
                             persistent=False)

    # ------------------------------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/8, W/8) features. Cache support features with it at evaluation."""
        return self.encoder(images)

    def segment(self, support_feats: torch.Tensor, support_fg: torch.Tensor, query_feats: torch.Tensor,
                window: int, counters: dict[str, int] | None = None, prefix: str = ""
                ) -> torch.Tensor:
        """Low-resolution logits of the query given the support.

        Parameters
        ----------
        support_feats : (B, C, h, w)
        support_fg : (B, h, w) float in [0, 1]
            Foreground mask at feature resolution (soft after down-sampling, or hard in PAR).
        query_feats : (B, C, h, w)
        window : int
            Local pooling window L.
        counters : dict, optional
            Incremented in place with the prototype cases (names prefixed by ``prefix``).

        Returns
        -------
        (B, 2, h, w) logits [background, foreground].
        """
        cfg = self.cfg
        # Episodes pair support b with query b: with unequal batches the loop below would silently drop the
        # extra queries (or fail on a missing one), so one cached support must be expanded by the caller.
        sizes = (support_feats.shape[0], support_fg.shape[0], query_feats.shape[0])
        if len(set(sizes)) != 1:
            raise ValueError(f"support features, support masks and query features must have the same batch "
                             f"size (one support per query), got {sizes[0]}, {sizes[1]} and {sizes[2]}")
        out = []
        for b in range(support_feats.shape[0]):
            fg = support_fg[b]
            fg_protos, fg_case = class_prototypes(support_feats[b], fg, window, cfg.threshold, "fg",
                                                  cfg.fg_rule_window)
            bg_protos, bg_case = class_prototypes(support_feats[b], 1.0 - fg, window, cfg.threshold, "bg",
                                                  cfg.fg_rule_window)
            if counters is not None:
                _count(counters, prefix, fg_case, bg_case, fg_protos.shape[0], bg_protos.shape[0])
            out.append(torch.stack([class_scores(query_feats[b], bg_protos, cfg.alpha),
                                    class_scores(query_feats[b], fg_protos, cfg.alpha)]))
        return torch.stack(out)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, support_img: torch.Tensor, support_fg: torch.Tensor, query_img: torch.Tensor,
                query_mask: torch.Tensor | None = None, train: bool = True) -> dict:
        """One batch of episodes.

        Parameters
        ----------
        support_img, query_img : (B, 3, H, W) float
        support_fg : (B, H, W) 0/1 (any dtype)
        query_mask : (B, H, W) integer 0/1, optional
            When given, the losses are computed.
        train : bool
            L = ``local_size_train`` (4) if True, else ``local_size_test`` (2).

        Returns
        -------
        dict
            ``logits`` (B, 2, H, W); ``logits_low`` (B, 2, h, w); ``counters`` (dict of int); with
            ``query_mask``: ``loss`` (scalar), ``loss_query``, ``loss_par`` (scalars).
        """
        n, _, height, width = support_img.shape
        feats = self.encode(torch.cat([support_img, query_img], dim=0))
        sup_f, qry_f = feats[:n], feats[n:]
        window = self.cfg.local_size_train if train else self.cfg.local_size_test
        sup_fg_low = downsample_mask(support_fg, tuple(feats.shape[-2:]))
        counters = dict.fromkeys(COUNTERS, 0)
        counters["episodes"] = n
        # Prototype maths runs in float32 even under autocast: cosine scores x 20 go through a softmax.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            sup_f, qry_f = sup_f.float(), qry_f.float()
            low = self.segment(sup_f, sup_fg_low, qry_f, window, counters)
            logits = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
            result = {"logits": logits, "logits_low": low, "counters": counters}
            if query_mask is not None:
                loss_q = F.cross_entropy(logits, query_mask.long(), weight=self.ce_weight)
                loss_par = self.alignment_loss(qry_f, low, sup_f, support_fg, window, counters)
                result.update(loss_query=loss_q, loss_par=loss_par, loss=loss_q + self.cfg.par_weight * loss_par)
        return result

    def alignment_loss(self, query_feats: torch.Tensor, query_logits_low: torch.Tensor,
                       support_feats: torch.Tensor, support_fg: torch.Tensor, window: int,
                       counters: dict[str, int]) -> torch.Tensor:
        """Prototype alignment regularisation (PANet, method.md 3.4).

        The query's predicted hard masks (argmax of ``query_logits_low`` (B, 2, h, w), no gradient through them)
        give prototypes from ``query_feats`` (B, C, h, w) with the same ALP rules; they segment
        ``support_feats``; the up-sampled logits get an unweighted cross-entropy against ``support_fg``
        (B, H, W). An empty predicted foreground is not skipped (the reference disables skipping): that class
        then scores 0 and the case is counted as ``par_fg_empty``.
        """
        pred_fg = (query_logits_low.argmax(dim=1) == 1).float().detach()
        low = self.segment(query_feats, pred_fg, support_feats, window, counters, prefix="par_")
        logits = F.interpolate(low, size=support_fg.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, support_fg.long())

    @torch.no_grad()
    def predict(self, support_img: torch.Tensor, support_fg: torch.Tensor, query_img: torch.Tensor,
                support_feats: torch.Tensor | None = None) -> dict:
        """Test-time segmentation: eval mode (BatchNorm running stats), L = ``local_size_test``, no gradients.

        Parameters
        ----------
        support_img : (B, 3, H, W), or None when ``support_feats`` is given
        support_fg : (B, H, W) 0/1
        query_img : (B, 3, H', W') with H'/8 = h
        support_feats : (B, C, h, w), optional
            Cached ``encode(support_img)`` (computed in eval mode), to reuse one support for many queries.

        Returns
        -------
        dict
            ``logits`` (B, 2, H', W'), ``pred`` (B, H', W') int64 argmax, ``counters``.
        """
        was_training = self.training
        self.eval()
        try:
            if support_feats is None:
                support_feats = self.encode(support_img)
            qry_f = self.encode(query_img)
            with torch.autocast(device_type=qry_f.device.type, enabled=False):
                counters = dict.fromkeys(COUNTERS, 0)
                counters["episodes"] = qry_f.shape[0]
                low = self.segment(support_feats.float(),
                                   downsample_mask(support_fg, tuple(support_feats.shape[-2:])),
                                   qry_f.float(), self.cfg.local_size_test, counters)
                logits = F.interpolate(low, size=query_img.shape[-2:], mode="bilinear", align_corners=False)
        finally:
            self.train(was_training)
        return {"logits": logits, "pred": logits.argmax(dim=1), "counters": counters}


def _count(counters: dict[str, int], prefix: str, fg_case: str, bg_case: str, n_fg: int, n_bg: int) -> None:
    if not prefix:
        counters["bg_local_protos"] += n_bg if bg_case == "local" else 0
        counters["fg_local_protos"] += n_fg - 1 if fg_case == "local" else 0
    if fg_case == "global_only":
        counters[prefix + "fg_global_only"] += 1
    elif fg_case == "empty":
        counters[prefix + "fg_empty"] += 1
    if bg_case == "fallback_global":
        counters[prefix + "bg_fallback_global"] += 1
    elif bg_case == "empty":
        counters[prefix + "bg_empty"] += 1
