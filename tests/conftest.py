"""Shared fixtures: every cache points at a temp dir; tiny image folders a tiny model can learn."""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import pytest

# One intra-op thread everywhere (this process and the subprocesses tests start): results that tests
# compare bit for bit across processes (resume, kill -9, torchrun) must not depend on the thread count,
# and on 2 shared cores a second OpenMP thread mostly spin-waits.
# Set, not defaulted: a machine's own OMP_NUM_THREADS=4 would compare runs across thread counts.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

# Tests never touch the network or the user's caches. huggingface_hub and timm read these at import, so the
# user's own Hugging Face and tqdm settings go before anything imports them: HF_DEBUG=1 or
# HF_HUB_VERBOSITY=debug logged every request (a traceback among them) to the stderr that tests read, and
# HF_HUB_ENABLE_HF_TRANSFER=1 (widely recommended) a FutureWarning. Set, not defaulted, like the threads.
for _var in [v for v in os.environ if v.startswith(("HF_", "HUGGINGFACE_", "TQDM_"))]:
    del os.environ[_var]
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Point ZOO_HOME and the HF cache at fresh temp dirs for every test."""
    home = tmp_path_factory.mktemp("zoo_home")
    monkeypatch.setenv("ZOO_HOME", str(home))
    # Temp files go under pytest's own temp folders (it prunes old ones), this process's and its subprocesses':
    # the tests that kill a run on purpose left its datasets' failure logs and torchrun's folders in the
    # machine's /tmp for good (about 850 files and as many folders a day of test runs).
    scratch = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    # huggingface_hub froze its cache folder when a test module imported it (timm does) before this fixture
    # ran: without this, timm's hf-hub downloads went to the user's ~/.cache/huggingface and a second run of
    # the suite found test_push's repo there (no download where the test expects one).
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        for name, value in (("HF_HOME", home / "hf"), ("HF_HUB_CACHE", home / "hf" / "hub"),
                            ("HUGGINGFACE_HUB_CACHE", home / "hf" / "hub")):
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, str(value))
    # The user's own zoo settings stay out (ZOO_HOME is set above): ZOO_DEBUG=1, the documented way to see a
    # traceback, turned every one-line error into one (140 tests of tests/zoo failed); ZOO_RANK_GRACE_S,
    # ZOO_MALLOC=system, ZOO_HTTP_TIMEOUT, ZOO_REGISTRY and ZOO_OFFLINE change what tests check. A test that
    # wants one sets it. Removed from os.environ, they stay out of the subprocesses tests start too.
    for var in [v for v in os.environ if v.startswith("ZOO_") and v != "ZOO_HOME"]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # The machine's launcher and proxy settings stay out: a SLURM/torchrun WORLD_SIZE or RANK would make
    # every run distributed (or a non-writing rank), a proxy would carry the loopback Hub's traffic.
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield home


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (160, 40, 200)]


def make_image(path: Path, cls: int, size: int = 32, rng: random.Random | None = None, fmt: str | None = None):
    """An image whose class is visible in its colour and shape: learnable by a tiny model."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    base = COLOURS[cls % len(COLOURS)]
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)
    img = Image.new("RGB", (size, size), tuple(255 - c for c in jitter))
    draw = ImageDraw.Draw(img)
    m = rng.randint(2, size // 6)
    if cls % 2 == 0:
        draw.ellipse([m, m, size - m, size - m], fill=jitter)
    else:
        draw.rectangle([m, m, size - m, size - m], fill=jitter)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def corrupt_jpeg(good: bytes) -> bytes:
    """A JPEG that every check short of a full decode accepts, made the same way for every Pillow, libjpeg
    and nvJPEG version: ``good``'s headers are kept but its scan header (SOS) names Huffman tables 3,
    which no segment defines, its entropy-coded data is replaced by a run of 0xFFC8 markers (reserved),
    and the end marker (EOI) closes the file. libjpeg stops on either with an error, where zeroed or
    truncated data only draws a warning; nvJPEG decoded the garbage data alone without complaint.
    """
    sos = good.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    header = bytearray(good[:start])
    for c in range(header[sos + 4]):          # each component's DC/AC table selectors
        header[sos + 5 + 2 * c + 1] = 0x33
    return bytes(header) + b"\xff\xc8" * max(8, (len(good) - start - 2) // 2) + b"\xff\xd9"


def fifo_with_a_late_writer(path: Path, after_s: float = 5.0):
    """A named pipe at ``path``, and a thread that opens it for writing (then closes it) after ``after_s``: a
    reader that opens the pipe (a regression) then fails on no data instead of waiting for good."""
    import threading
    import time

    os.mkfifo(path)

    def write_late() -> None:
        time.sleep(after_s)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)      # ENXIO when no reader waits: nothing to unblock
            os.close(fd)
        except OSError:
            pass

    thread = threading.Thread(target=write_late, daemon=True)
    thread.start()
    return thread


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 12, layout: str = "flat",
                      val_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/<class>/*.png`` (layout="flat") or ``root/{train,val}/<class>/*.png`` (layout="split")."""
    rng = random.Random(seed)
    for ci, name in enumerate(classes):
        if layout == "flat":
            for i in range(per_class):
                make_image(root / name / f"{name}_{i:03d}.png", ci, size, rng)
        else:
            for i in range(per_class):
                make_image(root / "train" / name / f"{name}_{i:03d}.png", ci, size, rng)
            for i in range(val_per_class):
                make_image(root / "val" / name / f"{name}_v{i:03d}.png", ci, size, rng)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three learnable classes, 12 PNGs each, 32x32, flat layout."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def split_image_folder(tmp_path) -> Path:
    """Three learnable classes in train/ (12 each) and val/ (4 each)."""
    return make_image_folder(tmp_path / "data", layout="split")


def unwritable_parent(tmp_path: Path, monkeypatch, how: str) -> Path:
    """A folder nothing can be written under: a regular file (``how="under_a_file"``), or a folder without
    write permission (any other ``how``). Tests run as root, where chmod 0o555 does not stop writes, so
    os.access is made to answer for it as it would for an ordinary user."""
    parent = tmp_path / "outputs"
    if how == "under_a_file":
        parent.write_text("not a folder")
        return parent
    parent.mkdir(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == parent and mode & os.W_OK
                        else real_access(p, mode, **k))
    return parent


def tiny_weights() -> bytes:
    """safetensors bytes of timm's ``test_resnet`` (seeded): stand-in "pretrained" weights."""
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    return save({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()})


def tiny_entry(name: str, source: dict, **extra) -> dict:
    """A registry entry (as YAML data) for timm's ``test_resnet`` at 32 px with the given weight source."""
    from zoo.resolve import describe_timm

    params, stages, classifier = describe_timm("test_resnet", 1000)
    return {"name": name, "family": "resnet", "builder": "timm:test_resnet", "license": "apache-2.0",
            "params": params, "classifier": classifier, "stages": [list(s) for s in stages],
            "preprocessing": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "origin": "test"},
            "sources": [source], **extra}


def write_registry(path: Path, entries: list[dict], monkeypatch=None) -> Path:
    """Write a user registry file; with ``monkeypatch``, point ZOO_REGISTRY at it."""
    import yaml

    path.write_text(yaml.safe_dump({"models": entries}))
    if monkeypatch is not None:
        monkeypatch.setenv("ZOO_REGISTRY", str(path))
    return path


def register_tiny(tmp_path: Path, monkeypatch, name: str = "tiny32") -> str:
    """A user registry entry ``name`` (test_resnet, 32 px) whose "pretrained" weights are a local file."""
    weights = tmp_path / f"{name}.safetensors"
    weights.write_bytes(tiny_weights())
    source = {"kind": "file", "path": str(weights), "sha256": None, "sha256_note": "test weights"}
    write_registry(tmp_path / "registry.yaml", [tiny_entry(name, source)], monkeypatch)
    return name


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forbid_model_builds(monkeypatch, message: str) -> None:
    """Make every way zoo builds a model (``zoo.build.create_model``/``build_architecture``, and each module's
    own ``from zoo.build import ...`` name for them) raise AssertionError(message), for this test only.

    Every zoo module is imported first: one that a command imports lazily (zoo.jobs.doctor) would otherwise
    take the stand-in as its name when this test happens to import it first, and keep it for the rest of
    the session (seen under random test order: a later `zoo doctor` "built a model before the output
    folder was checked"), while one imported earlier kept the real function, unguarded."""
    import importlib
    import pkgutil

    import zoo
    import zoo.build

    for info in pkgutil.walk_packages(zoo.__path__, "zoo."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)

    def forbidden(*a, **k):
        raise AssertionError(message)

    real = (zoo.build.create_model, zoo.build.build_architecture)
    for name, module in list(sys.modules.items()):
        if name == "zoo" or name.startswith("zoo."):
            for attr, value in list(vars(module).items()):
                if any(value is r for r in real):
                    monkeypatch.setattr(module, attr, forbidden)
