"""Episode stream (method.md 2.1-2.3, 5.2): sampling, exclusion, hold-out, counters, workers, real stores."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alpnet.config import AugmentConfig, EpisodeConfig
from engine.config import ConfigError
from alpnet.episodes import (EpisodeError, EpisodeStream, MemoryReader, build_index, collate_episodes,
                             held_out_volumes, visible_ids, worker_init)
from alpnet.protocol import make_fold

SIZE = 64


# ------------------------------------------------------------------------------------------ test data
def synthetic_volumes(n: int = 6, depth: int = 4, size: int = SIZE, seed: int = 0, labels: bool = True) -> list:
    """Small volumes: a disc-shaped body cut into 16x16 superpixels, organs on known slices.

    Labels per z: 0 -> liver (1); 1 -> right kidney (2); 2 -> nothing; 3 -> spleen (4) and left kidney (3).
    The last slice of volume 0 has no body (no superpixels).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.47 * size) ** 2
    blocks = (yy // 16) * (size // 16) + xx // 16 + 1
    sp2d = np.where(body, blocks, 0)
    _, inv = np.unique(sp2d, return_inverse=True)         # consecutive ids 1..K inside the body
    sp2d = inv.reshape(size, size).astype(np.int32)
    vols = []
    for v in range(n):
        sp = np.repeat(sp2d[:, :, None], depth, axis=2).copy()
        img = (0.3 * sp + rng.normal(0, 0.3, sp.shape)).astype(np.float32)
        img = (img - img.mean()) / img.std()
        lab = np.zeros(sp.shape, np.uint8)
        for z, rows, cols, value in ((0, slice(8, 20), slice(8, 20), 1), (1, slice(40, 50), slice(10, 20), 2),
                                     (3, slice(40, 50), slice(40, 50), 3), (3, slice(10, 20), slice(40, 50), 4)):
            if z < depth:
                lab[rows, cols, z] = value
        if v == 0:
            sp[:, :, depth - 1] = 0
        vol = {"id": str(v + 1), "image": img, "superpixels": sp}
        if labels:
            vol["label"] = lab
        vols.append(vol)
    return vols


def write_store(path: Path, volumes: list, method: str = "test") -> Path:
    """Write ``volumes`` as a real store with engine.store's writer (one committed batch)."""
    from engine.store import StoreWriter
    from engine.store_codec import Codec
    from engine.store_format import Batch, SliceResult, volume_row
    size = volumes[0]["image"].shape[0]
    codec = Codec.parse("maps-gzip-1")
    settings = {"method": method, "params": {"n": 1}, "prepare": {"size": size}, "source": {"test": True}}
    writer = StoreWriter.open(path, settings, codec, (size, size), code_version="test")
    slices, rows = [], {}
    for v in volumes:
        label = v.get("label")
        rows[v["id"]] = volume_row(v["id"], v["id"], v["image"].shape[2], (1.25, 1.25, 7.7), "LAS", np.eye(4),
                                   "memory", "0", label is not None)
        for z in range(v["image"].shape[2]):
            sp = v["superpixels"][:, :, z]
            lab = label[:, :, z] if label is not None else np.zeros_like(sp, dtype=np.uint8)
            chunks = {"image": codec.encode("image", v["image"][:, :, z]),
                      "superpixels": codec.encode("superpixels", sp), "fg": codec.encode("fg", sp > 0),
                      "label": codec.encode("label", lab)}
            organs = sum(1 << int(x) for x in np.unique(lab) if x > 0)
            slices.append(SliceResult(v["id"], v["id"], z, chunks, int(sp.max()), label is not None, organs))
    writer.commit(Batch(0, 0, slices, rows, []))
    writer.finish(True)
    return path


class RecordingFactory:
    """Reader factory that records the pid of every process that opens a reader (in a file)."""

    def __init__(self, volumes: list, log: Path):
        self.volumes = volumes
        self.log = str(log)

    def __call__(self):
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return MemoryReader(self.volumes)


def ecfg(**kw) -> EpisodeConfig:
    kw.setdefault("holdout", False)
    kw.setdefault("setting", 1)
    return EpisodeConfig(**kw)


NO_AUG = AugmentConfig(enabled=False)


def stream_of(volumes, episodes=None, augment=NO_AUG, **kw) -> EpisodeStream:
    return EpisodeStream(lambda: MemoryReader(volumes), episodes or ecfg(), augment, **kw)


# ------------------------------------------------------------------------------------------ pieces
def test_visible_ids_match_bilinear_downsampling():
    rng = np.random.default_rng(0)
    sp = rng.integers(0, 40, size=(64, 64)).astype(np.int32)
    sp[sp > 3] = rng.integers(4, 400, size=int((sp > 3).sum()))      # many tiny ids, most invisible
    expected = []
    for i in np.unique(sp):
        low = F.interpolate(torch.from_numpy(sp == i)[None, None].float(), size=(8, 8), mode="bilinear",
                            align_corners=False)
        if float(low.max()) > 0:
            expected.append(i)
    assert visible_ids(sp, 8).tolist() == expected


def test_support_and_query_are_the_chosen_superpixel_of_one_slice():
    vols = synthetic_volumes()
    s = stream_of(vols, n_batches=20)
    for sample in s:
        m = sample["meta"]
        v = next(v for v in vols if v["id"] == m["volume"])
        target = torch.from_numpy(v["superpixels"][:, :, m["z"]] == m["superpixel"]).to(torch.uint8)
        image = torch.from_numpy(v["image"][:, :, m["z"]])
        for key in ("support", "query"):
            assert torch.equal(sample[f"{key}_mask"], target)
            assert sample[f"{key}_image"].shape == (3, SIZE, SIZE)
            assert torch.equal(sample[f"{key}_image"][1], image)
        assert target.sum() > 0


def test_augmented_support_and_query_are_two_views_of_the_same_slice():
    vols = synthetic_volumes()
    # intensity-only augmentation: masks are the target exactly, images a monotone remap of the same slice
    gamma_only = AugmentConfig(rotate_deg=0.0, translate_px=0.0, shear_deg=0.0, zoom=[1.0, 1.0],
                               elastic_alpha=0.0)
    for sample in stream_of(vols, augment=gamma_only, n_batches=10):
        m = sample["meta"]
        v = next(v for v in vols if v["id"] == m["volume"])
        target = torch.from_numpy(v["superpixels"][:, :, m["z"]] == m["superpixel"]).to(torch.uint8)
        order = np.argsort(v["image"][:, :, m["z"]].ravel(), kind="stable")
        assert torch.equal(sample["support_mask"], target) and torch.equal(sample["query_mask"], target)
        assert not torch.equal(sample["support_image"], sample["query_image"])   # independent gammas
        for key in ("support", "query"):
            values = sample[f"{key}_image"][0].numpy().ravel()[order]
            assert np.all(np.diff(values) >= -1e-5)
    # full augmentation: each mask is a mildly moved copy of the target
    for sample in stream_of(vols, augment=AugmentConfig(), n_batches=10):
        m = sample["meta"]
        v = next(v for v in vols if v["id"] == m["volume"])
        target = v["superpixels"][:, :, m["z"]] == m["superpixel"]
        for key in ("support", "query"):
            mask = sample[f"{key}_mask"].numpy().astype(bool)
            assert 0.5 < mask.sum() / target.sum() < 1.8
            shift = np.subtract(np.argwhere(mask).mean(axis=0), np.argwhere(target).mean(axis=0))
            assert np.hypot(*shift) < 12                   # 5 px translation, 5 deg, zoom <= 1.2 about the centre


def test_empty_and_vanishing_ids_are_redrawn_and_counted():
    vols = synthetic_volumes(n=2, depth=1)[1:]           # volume 0 has no body in its last slice
    sp = vols[0]["superpixels"][:, :, 0]
    k = int(sp.max())
    sp[sp == k] = k - 1                                   # id k left empty (an id gap)
    sp[0, 0] = k + 1                                       # id k+1: one pixel, not on the sampled grid
    s = stream_of(vols, n_batches=300)
    drawn = [sample["meta"]["superpixel"] for sample in s]
    assert k not in drawn and k + 1 not in drawn
    st = s.stats
    assert st["episodes"] == 300 and st["empty_redraws"] > 0 and st["vanishing_redraws"] > 0
    assert st["id_draws"] == 300 + st["empty_redraws"] + st["vanishing_redraws"]
    # each of the 2 bad ids of K + 1 comes first in a random order 1/(K+1) of the time (and further redraws)
    assert 0.3 < st["empty_redraws"] / (300 / (k + 1)) < 3
    ref = stream_of(vols, ecfg(drop_empty_ids=False, drop_vanishing_ids=False), n_batches=300)
    drawn = [sample["meta"]["superpixel"] for sample in ref]
    assert k in drawn and k + 1 in drawn and ref.stats["empty_redraws"] == 0


def test_slices_without_superpixels_never_reach_training():
    s = stream_of(synthetic_volumes())
    assert s.index.dropped["no_superpixels"] == 1
    assert not any(v == "1" and z == 3 for v, z in zip(s.index.volume, s.index.z))


@pytest.mark.parametrize("group,excluded", [(0, {2, 3}), (1, {1, 4})])
def test_setting2_removes_every_slice_with_an_excluded_organ(group, excluded):
    vols = synthetic_volumes()
    s = stream_of(vols, ecfg(setting=2, label_group=group))
    assert s.index.exclude_labels == sorted(excluded)
    reader = MemoryReader(vols)
    for row in s.index.rows:
        assert not set(np.unique(reader.read(int(row))["label"])) & excluded
    kept_z = set(s.index.z.tolist())
    assert kept_z == ({0, 2} if group == 0 else {1, 2})  # z=3 has both groups' organs
    setting1 = stream_of(vols, ecfg(setting=1))
    assert setting1.index.rows.size == 6 * 4 - 1 and setting1.index.dropped["excluded_label"] == 0


def test_exclude_labels_override_and_unlabelled_volumes():
    vols = synthetic_volumes()
    s = stream_of(vols, ecfg(setting=1, exclude_labels=[1]))
    assert s.index.exclude_labels == [1] and 0 not in set(s.index.z.tolist())
    with pytest.raises(EpisodeError, match=r"setting 2 needs organ labels.*\(use episodes\.setting=1\)$"):
        stream_of(synthetic_volumes(labels=False), ecfg(setting=2))
    # an explicit list in setting 1: switching to setting 1 is no way out, emptying the list is
    with pytest.raises(EpisodeError, match=r"episodes\.exclude_labels needs organ labels to exclude \[1\].*"
                                           r"\(set episodes\.exclude_labels=\[\]\)$"):
        stream_of(synthetic_volumes(labels=False), ecfg(setting=1, exclude_labels=[1]))
    # in setting 2 an emptied list falls back on the setting's own group: the way out is setting 1
    with pytest.raises(EpisodeError, match=r"episodes\.exclude_labels needs organ labels to exclude \[1\].*"
                                           r"\(use episodes\.setting=1 and episodes\.exclude_labels=\[\]\)$"):
        stream_of(synthetic_volumes(labels=False), ecfg(setting=2, exclude_labels=[1]))


def test_exclude_labels_above_63_are_refused_and_63_is_excluded():
    # the store's organs column has bits for labels 1..63 only: a label of 64 or more made build_index fail
    # with numpy's OverflowError (a traceback from train) and could never have been excluded; the config now
    # refuses it on load (tests/test_config.py), and 63, the highest, works
    with pytest.raises(ConfigError, match=r"exclude_labels: organ labels that can be excluded are 1\.\.63"):
        ecfg(setting=2, exclude_labels=[2, 70])
    s = stream_of(synthetic_volumes(), ecfg(setting=2, exclude_labels=[63]))
    assert s.index.exclude_labels == [63] and s.index.dropped["excluded_label"] == 0


def test_fold_scans_never_enter_training():
    vols = synthetic_volumes(n=12)
    ids = [v["id"] for v in vols]
    for fold in range(5):
        s = stream_of(vols, ecfg(holdout=True, fold=fold))
        f = make_fold(ids, 5, fold)
        assert sorted(s.index.held_out) == sorted(f.scans)
        assert not set(s.index.volume.tolist()) & set(f.scans)
        assert set(s.index.volume.tolist()) == set(ids) - set(f.scans)


def test_paper_folds_on_chaos_ids():
    chaos = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36",
             "37", "38", "39"]
    assert held_out_volumes(list(reversed(chaos)), 0, 5) == ["1", "2", "3", "5", "8"]
    assert held_out_volumes(chaos, 2, 5) == ["19", "20", "21", "22", "31"]
    assert held_out_volumes(chaos, 4, 5) == ["36", "37", "38", "39", "1"]


def test_error_paths_are_one_line(tmp_path):
    with pytest.raises(EpisodeError, match="store not found"):
        EpisodeStream.from_store(tmp_path / "absent.h5", ecfg(), NO_AUG)
    empty = synthetic_volumes(n=2)
    for v in empty:
        v["superpixels"][:] = 0
    with pytest.raises(EpisodeError, match="no usable training slice") as err:
        stream_of(empty)
    assert "\n" not in str(err.value)
    with pytest.raises(EpisodeError, match="no usable training slice"):
        stream_of(synthetic_volumes(n=2, depth=2), ecfg(setting=1, exclude_labels=[1, 2], holdout=False))
    with pytest.raises(EpisodeError, match="holdout=false"):
        stream_of(synthetic_volumes(n=3), ecfg(holdout=True))   # 3 scans cannot form 5 folds

    def broken():
        raise OSError("disk on fire")
    with pytest.raises(EpisodeError, match="cannot open the store .disk on fire"):
        EpisodeStream(broken, ecfg(), NO_AUG)


def test_stream_is_reproducible_and_resumable():
    vols = synthetic_volumes()
    a = [x["meta"]["superpixel"] for x in stream_of(vols, augment=AugmentConfig(), seed=7, n_batches=12)]
    b = list(stream_of(vols, augment=AugmentConfig(), seed=7, n_batches=12))
    assert a == [x["meta"]["superpixel"] for x in b]
    tail = list(stream_of(vols, augment=AugmentConfig(), seed=7, start_batch=8, n_batches=4))
    for x, y in zip(b[8:], tail):
        assert x["meta"] == y["meta"] and torch.equal(x["query_image"], y["query_image"])
    other = [x["meta"]["superpixel"] for x in stream_of(vols, augment=AugmentConfig(), seed=8, n_batches=12)]
    assert other != a


def test_two_workers_open_the_store_lazily_and_give_the_same_stream(tmp_path):
    vols = synthetic_volumes()
    log = tmp_path / "opens.txt"
    s = EpisodeStream(RecordingFactory(vols, log), ecfg(), AugmentConfig(), seed=3, batch_size=2, n_batches=6)
    assert log.read_text().split() == [str(os.getpid())]  # the index was built in this process only
    loader = DataLoader(s, batch_size=2, num_workers=2, worker_init_fn=worker_init, collate_fn=collate_episodes)
    batches = list(loader)
    opens = log.read_text().split()
    assert len(opens) == 3 and len(set(opens[1:])) == 2 and str(os.getpid()) not in opens[1:]
    assert s._reader is None                               # the main process never opened a reading handle
    ref = list(DataLoader(stream_of(vols, augment=AugmentConfig(), seed=3, batch_size=2, n_batches=6),
                          batch_size=2, num_workers=0))
    assert len(batches) == len(ref) == 6
    for x, y in zip(batches, ref):
        assert x["meta"]["episode"] == y["meta"]["episode"].tolist()
        assert x["query_image"].shape == (2, 3, SIZE, SIZE) and torch.equal(x["query_image"][:, 0],
                                                                            x["query_image"][:, 2])
        assert torch.equal(x["query_image"], y["query_image"]) and torch.equal(x["support_mask"], y["support_mask"])


# ------------------------------------------------------------------------------------------ real store
def test_stream_from_a_real_store_with_two_workers(tmp_path):
    vols = synthetic_volumes(n=7)
    store = write_store(tmp_path / "store.h5", vols)
    s = EpisodeStream.from_store(store, ecfg(setting=2, label_group=0, holdout=True, fold=1), AugmentConfig(),
                                 seed=0, n_batches=8)
    assert s.store_meta["method"] == "test"
    held = set(make_fold([v["id"] for v in vols], 5, 1).scans)
    assert not set(s.index.volume.tolist()) & held
    batches = list(DataLoader(s, batch_size=1, num_workers=2, worker_init_fn=worker_init,
                              collate_fn=collate_episodes))
    assert len(batches) == 8
    for b in batches:
        assert b["meta"]["volume"][0] not in held and b["meta"]["z"][0] in (0, 2)
        assert b["support_image"].shape == (1, 3, SIZE, SIZE) and b["query_mask"].dtype == torch.uint8
    # the same index from the store as from memory
    mem = stream_of(vols, ecfg(setting=2, label_group=0, holdout=True, fold=1))
    assert np.array_equal(mem.index.rows, s.index.rows)


def test_build_index_reads_organs_from_labels_when_the_store_lacks_the_column():
    vols = synthetic_volumes()
    reader = MemoryReader(vols)
    with_bits = build_index(reader, ecfg(setting=2, label_group=1))
    del reader.slices["organs"]
    without = build_index(reader, ecfg(setting=2, label_group=1))
    assert np.array_equal(with_bits.rows, without.rows)


def test_collate_episodes_packs_one_buffer_with_exact_values_and_odd_sizes(episode_samples):
    # 5 x 7 planes: the mask bytes per episode (70) are not a multiple of 4, the float32 views must still line up
    samples = episode_samples(3, 5, 7)
    b = collate_episodes(samples)
    for key in ("support_image", "query_image", "support_mask", "query_mask"):
        assert torch.equal(b[key], torch.stack([s[key] for s in samples]))
    assert b["support_image"].dtype == torch.float32 and b["query_mask"].dtype == torch.uint8
    storages = {b[k].untyped_storage().data_ptr() for k in ("support_image", "query_image", "support_mask",
                                                            "query_mask")}
    assert len(storages) == 1                              # one shared-memory segment per batch
    assert b["meta"] == {"episode": [0, 1, 2], "volume": ["0", "1", "2"]}
