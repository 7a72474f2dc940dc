"""--decode device: JPEGs read by the workers, decoded and augmented on the training device.

On the CPU ``decode_jpeg`` is libjpeg-turbo (as PIL's decoder); the CUDA path (nvJPEG, its own stream)
is checked by the ``gpu`` mark and scripts/bench_gpu.py.
"""
from __future__ import annotations

import io
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from finetune.core.config import FinetuneConfig
from finetune.data import (DeviceAugment, ImageDataset, ImageSet, build_transform, close_loader, load_image,
                           make_loader, scan_folder, set_loader_epoch)
from finetune.data.decode import (DevicePrefetcher, DeviceTransform, EncodedImageDataset, collate_encoded,
                                  decoded_in_worker, device_decodable, unpack)
from finetune.core.errors import ConfigError, DataError, Interrupted
from finetune.core.seeding import sample_seed
from finetune.engine.setup import Setup
from tests.conftest import corrupt_jpeg, make_image
from tests.finetune.test_train import DEVICES

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
               "crop_mode": "center", "mean": (0.2, 0.4, 0.6), "std": (0.5, 0.25, 0.1)}
AUG = FinetuneConfig(crop_scale_min=0.35, hflip=0.5, brightness=0.4, contrast=0.4)


def photo(size=(60, 44), seed=0) -> Image.Image:
    """A smooth image (JPEG-friendly: decoders agree on it to a level or two)."""
    rng = random.Random(seed)
    w, h = size
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    dot = Image.new("RGB", (w // 2, h // 2), tuple(rng.randint(30, 220) for _ in range(3)))
    im.paste(dot, (w // 4, h // 4))
    return im


def jpeg_bytes(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def folder(root, n=4, classes=("a", "b")):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(jpeg_bytes(photo(seed=10 * ci + i)))
    return root


def test_device_decodable_only_plain_jpegs():
    im = photo()
    assert device_decodable(jpeg_bytes(im))
    assert device_decodable(jpeg_bytes(im.convert("L")))
    assert not device_decodable(jpeg_bytes(im, progressive=True))       # nvJPEG's slow host path
    assert device_decodable(jpeg_bytes(im), min_size=30)
    assert not device_decodable(jpeg_bytes(im), min_size=22)     # 44 px short side: the workers draft() it
    assert not device_decodable(jpeg_bytes(im.convert("CMYK")))          # decode_jpeg would drop K
    exif = Image.Exif()
    exif[0x0112] = 6                                                       # rotated 90 degrees
    assert not device_decodable(jpeg_bytes(im, exif=exif.tobytes()))
    png = io.BytesIO()
    im.save(png, "PNG")
    assert not device_decodable(png.getvalue())
    assert not device_decodable(b"\xff\xd8\xff garbage")


def test_dataset_sends_bytes_for_jpegs_and_pixels_for_the_rest(tmp_path):
    folder(tmp_path / "d", n=2)
    make_image(tmp_path / "d" / "a" / "x.png", 0, size=40)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "d" / "b" / "rot.jpg").write_bytes(jpeg_bytes(photo((60, 40)), exif=exif.tobytes()))
    report = scan_folder(tmp_path / "d", val_split=0.01)
    by_name = {}
    for image_set in (report.train, report.val):
        ds = EncodedImageDataset(image_set)
        by_name.update({p.split("/")[-1]: ds[i] for i, (p, _) in enumerate(image_set.items)})
    assert by_name["0.jpg"][0].dim() == 1 and by_name["0.jpg"][0].dtype == torch.uint8
    assert by_name["x.png"][0].shape == (3, 40, 40)
    assert by_name["rot.jpg"][0].shape == (3, 60, 40)          # EXIF rotation applied in the worker
    assert all(item[2] == i for i, item in enumerate(ds[j] for j in range(len(ds))))


@pytest.mark.parametrize("size", [(60, 44), (44, 90), (200, 30)])
def test_eval_transform_matches_the_worker_path(tmp_path, size):
    """Decode + resize + centre crop on the device == the PIL path, to a few levels (different resize
    kernels); the same geometry (no shift: a misplaced crop would differ by far more)."""
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes(photo(size)))
    ref = build_transform(DATA_CONFIG, False, output="uint8")(load_image(path))
    t = DeviceTransform(DATA_CONFIG, False)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    x, y = t([data], torch.tensor([1]), "cpu")
    mean = torch.tensor(DATA_CONFIG["mean"]).view(3, 1, 1)
    std = torch.tensor(DATA_CONFIG["std"]).view(3, 1, 1)
    pixels = (x[0] * std + mean) * 255
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [1]
    diff = (pixels - ref.float()).abs()
    assert float(diff.mean()) < 2.0 and float(diff.max()) < 24


def test_train_transform_is_seeded_and_varied():
    data = torch.frombuffer(bytearray(jpeg_bytes(photo())), dtype=torch.uint8)
    t = DeviceTransform(DATA_CONFIG, True, AUG)
    t.reseed(5)
    a = t([data] * 6, torch.zeros(6, dtype=torch.long), "cpu")[0]
    t.reseed(5)
    b = t([data] * 6, torch.zeros(6, dtype=torch.long), "cpu")[0]
    assert torch.equal(a, b)                                   # same seed, same crops/flips/jitter
    assert all(not torch.equal(a[i], a[j]) for i in range(6) for j in range(i))   # six different views
    off = DeviceTransform(DATA_CONFIG, True, FinetuneConfig(augment="none"))
    e = DeviceTransform(DATA_CONFIG, False)
    assert torch.equal(off([data], torch.zeros(1, dtype=torch.long), "cpu")[0],
                       e([data], torch.zeros(1, dtype=torch.long), "cpu")[0])


def test_with_sample_keys_each_image_is_augmented_the_same_in_any_batch():
    """--decode device: given the batch's sample keys (the prefetcher passes them), an image's crop,
    flip and jitter come from (epoch seed, its index) alone: split between 2 ranks (strided), or in
    another order, every image comes out the same; another epoch seed draws anew."""
    items = [torch.frombuffer(bytearray(jpeg_bytes(photo((60 + 7 * k, 44 + 3 * k), seed=k))), dtype=torch.uint8)
             for k in range(6)]
    labels, idx = torch.arange(6), [40, 41, 42, 43, 44, 45]
    t = DeviceTransform(DATA_CONFIG, True, AUG)

    def run(order, seed=7):
        t.reseed(1000 + len(order))          # the stream of key-less batches: not used
        return t([items[k] for k in order], labels[order], "cpu", keys=[sample_seed(seed, idx[k]) for k in order])[0]

    whole = run([0, 1, 2, 3, 4, 5])
    assert torch.equal(run([0, 2, 4]), whole[0::2]) and torch.equal(run([1, 3, 5]), whole[1::2])
    assert torch.equal(run([5, 3, 1]), whole[[5, 3, 1]])
    other = run([0, 1, 2, 3, 4, 5], seed=8)
    assert not any(torch.equal(other[k], whole[k]) for k in range(6))

def test_batched_colour_equals_torchvision_per_image():
    """Flip + brightness/contrast on the whole batch == torchvision's functional ops image by image."""
    from torchvision.transforms.v2 import functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 9, 7), dtype=torch.uint8, generator=g)
    flips = [True, False, True, False, False]
    ops = [[("b", 1.3), ("c", 0.7)], [("c", 1.4), ("b", 0.8)], [("b", 0.6)], [], [("c", 0.2), ("b", 1.0)]]
    got = DeviceAugment.apply(x, flips, ops)
    for i in range(5):
        ref = F.horizontal_flip(x[i]) if flips[i] else x[i]
        for kind, f in ops[i]:
            ref = F.adjust_brightness(ref, f) if kind == "b" else F.adjust_contrast(ref, f)
        assert int((got[i].int() - ref.int()).abs().max()) <= 1, i    # torchvision's blend may round a level off


def test_batched_colour_follows_torchvision_on_random_images():
    """Random images, factors and orders: torchvision's pixels, but for rare one-level differences (its
    contrast blend is one fused multiply-add)."""
    from torchvision.transforms.v2 import functional as F

    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    aug = DeviceAugment((0.5,) * 3, (0.5,) * 3, hflip=0.5, brightness=0.9, contrast=0.9)
    differ = total = 0
    for _ in range(20):
        n, h, w = rng.randint(1, 6), rng.randint(1, 20), rng.randint(1, 20)
        x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
        flips, ops = aug.draw(n)
        got = DeviceAugment.apply(x, flips, ops)
        for i in range(n):
            ref = F.horizontal_flip(x[i]) if flips[i] else x[i]
            for kind, f in ops[i]:
                ref = F.adjust_brightness(ref, f) if kind == "b" else F.adjust_contrast(ref, f)
            d = (got[i].int() - ref.int()).abs()
            assert int(d.max()) <= 1
            differ += int((d > 0).sum())
            total += d.numel()
    assert differ <= total * 1e-3, (differ, total)



def test_device_augment_gives_each_image_the_same_draws_on_any_number_of_ranks():
    """Under torchrun the ranks split each global batch strided (rank r: rows r, r + world, ...); each rank
    draws for the whole global batch and keeps its rows, so 2 ranks augment every image as 1 process does,
    epoch after epoch (the last batch partial)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g) for n in (8, 8, 4)]

    def augmented(rank: int, world: int) -> list[torch.Tensor]:
        aug = DeviceAugment((0.5,) * 3, (0.5,) * 3, hflip=0.5, brightness=0.4, contrast=0.4)
        out = []
        for epoch in (1, 2):
            aug.reseed(1000 + epoch, rank, world)
            out += [aug.augment(x[rank::world]) for x in batches]
        return out

    one = augmented(0, 1)
    ranks = [augmented(r, 2) for r in (0, 1)]
    for k, whole in enumerate(one):
        assert torch.equal(whole[0::2], ranks[0][k]) and torch.equal(whole[1::2], ranks[1][k])
    assert not torch.equal(one[0], batches[0])       # the draws did something

def test_epoch_reseed_accepts_any_seed():
    t = DeviceTransform(DATA_CONFIG, True, AUG)
    pre = DevicePrefetcher([], t, "cpu")
    pre.set_epoch(3, seed=2**62 + 12345)          # a mixed epoch seed times a multiplier: no overflow
    a = t._crop_box(100, 100)
    pre.set_epoch(3, seed=2**62 + 12345)
    assert t._crop_box(100, 100) == a


def test_crop_box_follows_random_resized_crop():
    t = DeviceTransform(DATA_CONFIG, True, AUG)
    for seed in range(50):
        t.reseed(seed)
        top, left, h, w = t._crop_box(120, 80)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 80
        assert 0.35 * 9600 * 0.7 <= h * w <= 9600                # area within the scale range (rounding)
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (h, w) in ((120, 80), (107, 80))


def test_corrupt_jpeg_is_dropped_with_its_label_and_logged(tmp_path):
    root = tmp_path / "d"
    folder(root / "train", n=3)
    folder(root / "val", n=1)
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    # passes the scan (intact headers, a scan, the end marker) but its entropy-coded data cannot decode
    (root / "train" / "a" / "1.jpg").write_bytes(corrupt_jpeg(good))
    report = scan_folder(root)
    bad = [i for i, (p, _) in enumerate(report.train.items) if p.endswith("1.jpg") and "/a/" in p]
    assert bad, "the scan should let this file through: the decoder is what meets it"
    ds = EncodedImageDataset(report.train)
    loader = make_loader(ds, 8, train=False, workers=0)
    assert loader.collate_fn is EncodedImageDataset.collate_fn
    batches = list(DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu"))
    x = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    expected = [y for i, (_, y) in enumerate(report.train.items) if i != bad[0]]
    assert labels.tolist() == expected and x.shape[0] == len(expected)
    assert [p for p, _ in ds.failures()] == [report.train.items[bad[0]][0]]


def test_prefetcher_yields_the_loader_batches_and_surfaces_errors(tmp_path):
    report = scan_folder(folder(tmp_path / "d", n=5), val_split=0.01)
    ds = EncodedImageDataset(report.train)
    loader = make_loader(ds, 3, train=False, workers=0)
    pre = DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu", channels_last=True)
    assert len(pre) == len(loader) and pre.dataset is ds
    got = list(pre)
    assert sum(len(y) for _, y in got) == len(ds)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in got)
    plain = ImageDataset(report.train, build_transform(DATA_CONFIG, False))
    ref = torch.cat([x for x, _ in make_loader(plain, 3, train=False, workers=0)])
    assert float((torch.cat([x for x, _ in got]) - ref).abs().mean()) < 0.1   # normalised units

    class Boom:
        failed: list = []

        def __call__(self, *a, **k):
            raise RuntimeError("device out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(DevicePrefetcher(loader, Boom(), "cpu"))
    it = iter(DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu", depth=1))
    next(it)
    it.close()                               # breaking out early stops the thread (no hang)


def test_a_pass_reads_from_iter_decodes_from_next_and_a_superseded_one_says_so(tmp_path):
    """iter() starts the loader (its workers read ahead) but decodes nothing: the device memory of
    decoded batches is taken from the first next(), as for a pass started on time. A pass started and
    never read does not block the next one; reading a pass after a newer one started raises, not hangs."""
    import threading

    report = scan_folder(folder(tmp_path / "d", n=6), val_split=0.01)
    ds = EncodedImageDataset(report.train)
    decoded = threading.Event()
    started = []

    class Spy(DeviceTransform):
        def __call__(self, *a, **k):
            decoded.set()
            return super().__call__(*a, **k)

    class Loader(list):
        dataset = ds

        def __iter__(self):
            started.append(1)
            return super().__iter__()

    loader = Loader(make_loader(ds, 2, train=False, workers=0))
    pre = DevicePrefetcher(loader, Spy(DATA_CONFIG, False), "cpu", depth=1)
    iter(pre)                                  # started ahead, never read
    assert started == [1] and not decoded.wait(timeout=0.5)
    got = list(pre)
    assert started == [1, 1] and sum(len(y) for _, y in got) == len(ds)
    old = iter(pre)
    next(old)
    newer = iter(pre)                          # stops the older pass's thread
    with pytest.raises(RuntimeError, match="a newer pass of the same loader started"):
        list(old)
    assert sum(len(y) for _, y in newer) == len(ds)


def test_a_batch_whose_every_image_failed_is_a_none_as_from_the_loader(tmp_path):
    """The prefetcher dropped such a batch (every file unreadable, or every JPEG failing at decode): under
    torchrun that rank took one training step fewer than the others and the job hung in DDP's all-reduce.
    Now it passes None on, as the loader does: one item per batch of the loader, on every rank."""
    root = tmp_path / "d"
    folder(root / "train", n=3)
    folder(root / "val", n=1)
    items = scan_folder(root).train.items       # batches of 2: [a/0, a/1], [a/2, b/0], [b/1, b/2]
    good = Path(items[2][0]).read_bytes()
    for path, _ in items[:2]:
        Path(path).write_bytes(b"not an image")          # fails in the dataset (the workers)
    for path, _ in items[4:]:
        Path(path).write_bytes(corrupt_jpeg(good))       # fails in the device decode
    ds = EncodedImageDataset(ImageSet(items, ["a", "b"]))
    loader = make_loader(ds, 2, train=False, workers=0)
    got = list(DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu"))
    assert len(got) == len(loader) == 3 and got[0] is None and got[2] is None
    assert got[1][1].tolist() == [items[2][1], items[3][1]]
    assert sorted(p for p, _ in ds.failures()) == sorted(p for p, _ in items[:2] + items[4:])


def test_collate_encoded_packs_one_tensor_and_skips_failures():
    a = torch.arange(5, dtype=torch.uint8)
    b = torch.arange(24, dtype=torch.uint8).view(3, 2, 4)
    assert collate_encoded([None, None]) is None
    (flat, shapes), labels, idx, keys = collate_encoded([(a, 1, 4, 11), None, (b, 0, 7, 12)])
    assert flat.shape == (29,) and labels.tolist() == [1, 0] and idx == [4, 7] and keys == [11, 12]
    x, y = unpack(flat, shapes)
    assert torch.equal(x, a) and torch.equal(y, b)


def test_worker_share_picks_images_by_key_and_changes_no_pixel(tmp_path):
    """--decode device with a share of the JPEGs decoded in the workers (both decoders at once): which
    images is a function of their sample keys, about the share of them, and on the CPU (libjpeg-turbo on
    both sides) the training batches are the ones nvJPEG's share-0 path gives, pixel for pixel, with a
    worker process too; a damaged JPEG among the worker's share is reported as load_image reports it."""
    keys = [sample_seed(7, i) for i in range(4000)]
    for share in (0.25, 0.5):
        picked = [decoded_in_worker(k, share) for k in keys]
        assert abs(sum(picked) / len(keys) - share) < 0.05
        assert picked == [decoded_in_worker(k, share) for k in keys]
    assert not any(decoded_in_worker(k, 0.0) for k in keys) and all(decoded_in_worker(k, 1.0) for k in keys)

    report = scan_folder(folder(tmp_path / "d", n=6), val_split=0.01)

    def epochs(share: float, workers: int) -> list[torch.Tensor]:
        ds = EncodedImageDataset(report.train, worker_share=share)
        kinds = {ds[i][0].dim() for i in range(len(ds))}
        assert kinds == ({1} if share == 0 else {3} if share == 1 else {1, 3})
        loader = make_loader(ds, 4, train=True, workers=workers, seed=3)
        pre = DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, True, AUG), "cpu")
        out = []
        for epoch in (1, 2):
            set_loader_epoch(loader, 3, epoch)
            out += [x for x, _ in pre]
        close_loader(loader)
        return out

    plain = epochs(0.0, 0)
    for share, workers in ((0.5, 0), (1.0, 0), (0.5, 1)):
        got = epochs(share, workers)
        assert len(got) == len(plain) and all(torch.equal(a, b) for a, b in zip(got, plain))

    bad = report.train.items[0][0]
    Path(bad).write_bytes(corrupt_jpeg(Path(report.train.items[1][0]).read_bytes()))
    ds = EncodedImageDataset(report.train, worker_share=1.0)
    assert ds[0] is None
    with pytest.raises(DataError) as said:
        load_image(bad)
    assert ds.failures() == [(bad, str(said.value))]


def test_loader_with_workers_delivers_packed_batches(tmp_path):
    report = scan_folder(folder(tmp_path / "d", n=6), val_split=0.01)
    ds = EncodedImageDataset(report.train)
    loader = make_loader(ds, 4, train=False, workers=2)
    got = list(DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu"))
    assert sum(len(y) for _, y in got) == len(ds)


def test_fit_with_device_decode_trains_and_resumes_identically(tmp_path):
    """The whole loop with decode="device" (on the CPU here): it learns, and a resumed run gives the
    same weights as an uninterrupted one (the augmentation generator is reseeded per epoch)."""
    from finetune.tools.train import fit
    from tests.finetune.test_train import STAGES, tiny_model
    from tests.finetune.test_train import DATA_CONFIG as LOOP_DC

    root = tmp_path / "d"
    for ci, c in enumerate(("red", "green", "blue")):
        for i in range(8):
            make_image(root / c / f"{i}.jpg", ci, size=40, rng=random.Random(i), fmt="JPEG")
    report = scan_folder(root, val_split=0.25)
    base = dict(epochs=3, batch_size=6, workers=0, lr=3e-2, fast_head=False, head_epochs=0, quiet=True,
                device="cpu", freeze="none", decode="device", patience=10)
    said = []
    full = fit(tiny_model(), STAGES, LOOP_DC, report.train, report.val, FinetuneConfig(**base), head="fc",
               run_dir=tmp_path / "full", log=said.append)
    assert any(m.startswith("warning: --decode device on cpu decodes in one thread") for m in said)
    assert full.history[-1]["val_acc"] > 0.5 and full.history[-1]["train_loss"] < full.history[0]["train_loss"]
    def stop_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):        # stopped with epoch 3's pass started ahead
        fit(tiny_model(), STAGES, LOOP_DC, report.train, report.val, FinetuneConfig(**base), head="fc",
            run_dir=tmp_path / "part", callbacks=[stop_after_epoch_2])
    assert not [t for t in threading.enumerate() if t.name == "zoo-device-decode" and t.is_alive()]
    resumed = fit(tiny_model(), STAGES, LOOP_DC, report.train, report.val, FinetuneConfig(**base), head="fc",
                  run_dir=tmp_path / "part", resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


def test_decode_option_is_validated():
    with pytest.raises(ConfigError, match="decode"):
        FinetuneConfig(decode="gpu")


@pytest.mark.parametrize("bad", [{"hflip": 1.5}, {"hflip": -0.1}, {"brightness": -1.0}, {"contrast": -0.5}])
def test_augmentation_strengths_are_validated(bad):
    """Checked once in the config: CPU (workers) and CUDA (DeviceAugment) runs refuse the same values."""
    with pytest.raises(ConfigError, match=f"invalid {next(iter(bad))}="):
        FinetuneConfig(**bad)


@pytest.mark.gpu
def test_device_decode_on_cuda_matches_cpu(tmp_path):
    """nvJPEG + device transforms == the same on the CPU, to a level or two; many batches through the
    prefetcher's side stream stay finite (the nvJPEG ordering bug showed up as NaN losses); a greyscale
    and a corrupt JPEG in the folder; a bare "cuda" device."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    root = folder(tmp_path / "d" / "train", n=40)
    folder(tmp_path / "d" / "val", n=1)
    (root / "a" / "grey.jpg").write_bytes(jpeg_bytes(photo(seed=99).convert("L")))
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "b" / "bad.jpg").write_bytes(corrupt_jpeg(good))
    report = scan_folder(tmp_path / "d")
    ds = EncodedImageDataset(report.train)
    loader = make_loader(ds, 16, train=False, workers=2, device="cuda")
    cpu = torch.cat([x for x, _ in DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cpu")])
    assert cpu.shape[0] == len(report.train.items) - 1
    for _ in range(3):
        got = list(DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cuda", channels_last=True))
        gpu = torch.cat([x.cpu() for x, _ in got])
        assert got[0][0].device.type == "cuda" and got[0][0].is_contiguous(memory_format=torch.channels_last)
        assert gpu.shape == cpu.shape and torch.isfinite(gpu).all()
        assert float((gpu - cpu).abs().mean()) < 0.05
    train = DevicePrefetcher(make_loader(ds, 16, train=True, workers=2, device="cuda"),
                             DeviceTransform(DATA_CONFIG, True, AUG), "cuda")
    for epoch in range(3):
        train.set_epoch(epoch)
        assert all(torch.isfinite(x).all() for x, _ in train)
    # half the JPEGs decoded in the workers (pinned pixels through the same stream): the same batches
    shared = EncodedImageDataset(report.train, worker_share=0.5)
    assert {shared[i][0].dim() for i in range(len(shared)) if shared[i] is not None} == {1, 3}
    loader = make_loader(shared, 16, train=False, workers=2, device="cuda")
    for _ in range(2):
        got = torch.cat([x.cpu() for x, _ in DevicePrefetcher(loader, DeviceTransform(DATA_CONFIG, False), "cuda")])
        assert got.shape == cpu.shape and torch.isfinite(got).all()
        assert float((got - cpu).abs().mean()) < 0.05


def test_cached_head_under_decode_device_takes_the_cuda_pipeline_on_the_cpu(tmp_path, monkeypatch):
    """On CUDA, ``--decode device`` leaves normalisation to the DevicePrefetcher (device_steps answers
    ("uint8", None, None)), but the cached head's feature passes read the files themselves: they must
    get the device normalisation, not hand raw uint8 to the first convolution. device_steps' CUDA answer
    is forced here on the CPU (the GPU-only branch, tested where CI runs): the head-only run then equals
    the same run with --decode workers, on the same features."""
    import finetune.engine.setup as setup_module
    from tests.finetune.test_train import cfg, run, sets

    real = setup_module.device_steps
    monkeypatch.setattr(setup_module, "device_steps", lambda config, data_config, device: real(config, data_config,
                                                                                              "cuda"))
    data = sets(tmp_path / "data")
    results = {}
    for decode in ("workers", "device"):
        results[decode] = run(data, cfg(freeze="head", fast_head=True, epochs=1, augment="none", decode=decode))
    assert [r.metrics["val_acc"] for r in results.values()] == [results["workers"].metrics["val_acc"]] * 2
    assert results["device"].metrics["val_loss"] == pytest.approx(results["workers"].metrics["val_loss"], abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_default_head_only_run_with_device_decode(tmp_path, monkeypatch, device):
    """The default head-only run (freeze auto on a small folder: L-BFGS on cached features, with the mirrored
    view) under --decode device, end to end. Its loaders are built to decode on the device (nvJPEG on CUDA),
    but a head-only run reads every image through the feature passes, in the workers' pipeline
    (device-normalised uint8 on CUDA): it solves the head of --decode workers on the same JPEGs and writes
    the same run folder, with a progressive JPEG (not for nvJPEG) and an undecodable one in it. Bit for bit
    on the CPU; on CUDA, within 1e-3 on the validation probabilities: the C=1e4 head this separable folder
    picks moves them by ~3e-5 when its features move by 1e-7 (test_features' device solve), a wrong
    normalisation or decode by tenths."""
    from finetune.core.checkpoint import BEST, LAST, load_checkpoint, load_weights
    from tests.finetune.test_train import cfg, run

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    root = tmp_path / "d"
    folder(root / "train", n=12)
    folder(root / "val", n=4)
    (root / "train" / "a" / "progressive.jpg").write_bytes(jpeg_bytes(photo(seed=99), progressive=True))
    (root / "train" / "b" / "corrupt.jpg").write_bytes(corrupt_jpeg(jpeg_bytes(photo(seed=98))))
    report = scan_folder(root)
    data = (report.train, report.val)
    got = {}
    for decode in ("workers", "device"):
        out = tmp_path / decode
        said = []
        got[decode] = run(data, cfg(freeze="auto", fast_head=True, epochs=0, decode=decode, device=device),
                          run_dir=out, log=said.append)
        result = got[decode]
        assert not [m for m in said if "--decode device" in m]    # no loader-path warning: the loaders never run
        assert [r["phase"] for r in result.history] == ["head"] and result.history[0].get("solver") == "L-BFGS"
        assert result.metrics["images"] == len(report.val.items) and result.val_probs is not None
        assert "corrupt.jpg" in (out / "bad_files.txt").read_text()
        assert load_checkpoint(out / LAST, map_location="cpu")["finished"] and load_weights(out / BEST)
    workers, dev = got["workers"], got["device"]
    assert dev.metrics["confusion"] == workers.metrics["confusion"]
    if device == "cpu":
        assert torch.equal(dev.val_probs, workers.val_probs)
        assert torch.equal(dev.model.fc.weight, workers.model.fc.weight)
    else:
        torch.testing.assert_close(dev.val_probs, workers.val_probs, rtol=0, atol=1e-3)


def test_every_reader_calls_a_file_gone_since_the_scan_missing(tmp_path):
    """PIL's path and the bytes path (--decode device, the tensor pipeline) say the same of a vanished file."""
    from finetune.data import load_image
    from finetune.data.images import load_image_tensor, read_image_bytes

    gone = tmp_path / "cat" / "gone.jpg"
    for read in (load_image, read_image_bytes, load_image_tensor):
        with pytest.raises(DataError, match=r"gone\.jpg is missing: moved or deleted since the scan$"):
            read(gone)
    # QA: a broken link in a folder given to zoo predict / eval (no scan there) read "missing: moved or deleted
    # since the scan"; every reader names the link and where it leads (finetune.core.io.broken_link)
    link = tmp_path / "cat" / "link.jpg"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "elsewhere.jpg")
    for read in (load_image, read_image_bytes, load_image_tensor):
        with pytest.raises(DataError, match=r"link\.jpg is a symbolic link to .*elsewhere\.jpg, which does not "
                                             r"exist .*; fix or remove it$"):
            read(link)


def test_device_decode_reads_a_big_jpeg_as_large_as_the_cpu_path_for_small_random_crops(tmp_path):
    # --decode device with --crop-scale-min 0.08: a JPEG too big for the device's full decode is drafted in the
    # worker; its training view must be decoded at the training transform's size (792 px for a 224 view), as the
    # CPU path's, not the evaluation's 256 (before: 600x450, whose smallest crops were enlarged ~2x).
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (10, 120, 200)).save(path, quality=80)
    data_config = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    setup = SimpleNamespace(data_config=data_config, config=FinetuneConfig(decode="device", crop_scale_min=0.08))
    images = ImageSet([(str(path), 0)], ["a"])
    train, val = Setup.dataset(setup, images, True), Setup.dataset(setup, images, False)
    assert isinstance(train, EncodedImageDataset) and (train.min_size, val.min_size) == (792, 256)
    assert tuple(train[0][0].shape) == (3, 900, 1200) and tuple(val[0][0].shape) == (3, 450, 600)


def _blocks(size, seed) -> Image.Image:
    """Ink blocks on paper, enlarged without smoothing: hard edges, where a resize overshoots most."""
    rng = random.Random(seed)
    ink = Image.new("L", (8, 8), 255)
    ink.putdata([rng.choice((0, 255, 255)) for _ in range(64)])
    return ink.resize(size, Image.Resampling.NEAREST).convert("RGB")


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_view_on_the_device_is_the_pil_paths_that_predict_and_eval_use(tmp_path, interpolation):
    """The run's validation under --decode device sees what `zoo eval`/`zoo predict` (PIL) see: each axis
    resampled in PIL's order and rounded to levels between the two. One rounding at the end (before)
    put hard edges' bicubic overshoot 25 levels from PIL's and 8% of the values (bilinear too) a level away."""
    cfg = {**DATA_CONFIG, "input_size": (3, 40, 40), "interpolation": interpolation}
    pil_view, device_view = build_transform(cfg, False), DeviceTransform(cfg, False)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    diffs = []
    for k, size in enumerate([(60, 44), (44, 90), (200, 30), (37, 61), (128, 128), (23, 19)]):
        for im in (photo(size, seed=k), _blocks(size, seed=k)):
            path = tmp_path / f"{k}.jpg"
            path.write_bytes(jpeg_bytes(im))
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            x, _ = device_view([data], torch.tensor([0]), "cpu")
            diffs.append(((x[0] - pil_view(load_image(path))) * std * 255).abs().flatten())
    diff = torch.cat(diffs)
    # measured: at most 1 level, on 0.2-1.1% of the values; a rare PIL fixed-point tie can make it 2
    assert float(diff.max()) < 2.5 and float((diff > 0.5).float().mean()) < 0.05
