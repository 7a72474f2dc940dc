"""CUDA-only paths (issue 23, item 4; helper-114's audit, docs/benchmarks.md "Since run 4 (session 31)"). The tools
run on ``device_steps``' CUDA answer, forced on the CPU: the uint8 pipeline normalised (and augmented) on the device
gives the CPU pipeline's numbers. What only a GPU can run (the CUDA generator, autocast, zoo doctor's and predict's
CUDA layout) is checked under ``pytest -m gpu``. The other forced CUDA decisions have their tests beside their code
(``warms_up`` and ``cudnn_autotune``: test_engine; ``amp_policy``, ``idle_gpus_note``, ``resolve_device``:
test_engine; ``replay.budget``: test_replay; the cached head's and overfit check's device steps: test_decode,
test_diagnostics)."""
from __future__ import annotations

import pytest
import torch

from tests.finetune.test_train import needs_cuda, snapshot

METRICS = ("phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def _same_run(a, b) -> None:
    """Two runs that trained the same: every epoch's metrics and every weight, bit for bit."""
    assert [{k: r[k] for k in METRICS} for r in a.history] == [{k: r[k] for k in METRICS} for r in b.history]
    first, second = snapshot(a.model), snapshot(b.model)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k],
                                                                                                     second[k])]


def _cuda_steps(monkeypatch) -> list:
    """``device_steps``' CUDA answer (gpu_normalize on), forced on the CPU where ``build_setup`` asks it: the workers
    send uint8 batches, normalised (for training also flipped and jittered) on the device. Returns, per batch the
    device normalisation took, its kind, dtype and flip probability (None: evaluation's)."""
    import finetune.engine.setup as setup_module
    from finetune.data import DeviceNormalize

    real_steps, real_call = setup_module.device_steps, DeviceNormalize.__call__
    seen: list = []

    def call(self, x, *a, **k):
        seen.append((type(self).__name__, x.dtype, getattr(self, "hflip", None)))
        return real_call(self, x, *a, **k)

    monkeypatch.setattr(DeviceNormalize, "__call__", call)
    monkeypatch.setattr(setup_module, "device_steps",
                        lambda config, data_config, device: real_steps(config, data_config, "cuda"))
    return seen



def test_the_lr_range_test_on_the_cuda_pipeline_probes_the_cpu_ones_batches(tmp_path, monkeypatch):
    """lr-find trains fit's batches: on CUDA uint8 ones, normalised (and augmented) on the device. With the random
    crop (drawn in the workers either way) and no flip or jitter, those are the CPU pipeline's batches bit for bit
    (``DeviceNormalize``: the float pipeline's own operations), so the range test finds the same losses."""
    from finetune.data import scan_folder
    from finetune.tools.diagnostics import lr_find
    from tests.conftest import make_image_folder
    from tests.finetune.test_diagnostics import DATA_CONFIG, STAGES, _config, _tiny_model

    train = scan_folder(make_image_folder(tmp_path / "data", per_class=8), val_split=0.25, seed=0).train
    # (no head phase first: its feature passes, normalised on the device too, are the cached head's tests')
    options = _config(hflip=0.0, brightness=0.0, contrast=0.0, crop_scale_min=0.5, head_epochs=0)

    def probe():
        return lr_find(_tiny_model(), STAGES, DATA_CONFIG, train, options, head="fc", start_lr=1e-5, end_lr=1.0,
                       steps=6).losses

    cpu = probe()
    seen = _cuda_steps(monkeypatch)
    assert probe() == cpu and len(cpu) == 6
    assert seen == [("DeviceAugment", torch.uint8, 0.0)] * 6


def test_a_handed_run_on_the_cuda_pipeline_stops_the_device_flip(tmp_path, monkeypatch):
    """--hflip auto on handed images (each class the other's mirror): the cached head's handedness test drops the
    mirror and ``Setup.train_without_flip`` rebuilds the training pipeline, on CUDA its ``DeviceAugment``
    (``device_steps`` asked again). With the jitter off, the CUDA pipeline (forced here) then trains on the CPU
    pipeline's batches: the same run, bit for bit, and no training batch of the finetune phase is flipped."""
    import json

    from finetune.tools.train import fit
    from tests.finetune.test_features import DATA_CONFIG, _config, _halves, _Halves

    train, val = _halves(tmp_path / "d")
    config = _config(head_solver="lbfgs", epochs=2, freeze="none", lr=1e-3, brightness=0.0, contrast=0.0)
    runs = {}
    for pipeline in ("cpu", "cuda"):
        seen = _cuda_steps(monkeypatch) if pipeline == "cuda" else []
        runs[pipeline] = fit(_Halves(), [["features"]], DATA_CONFIG, train, val, config, head="fc",
                             run_dir=tmp_path / pipeline)
        assert json.loads((tmp_path / pipeline / "summary.json").read_text())["mirror"]["dropped"] is True
    _same_run(runs["cpu"], runs["cuda"])
    training = [hflip for kind, dtype, hflip in seen if kind == "DeviceAugment"]
    assert training == [0.0] * (len(train.items) // config.batch_size) and {d for _, d, _ in seen} == {torch.uint8}


# -- what only a GPU runs (``pytest -m gpu``; skipped here): the CUDA branches no GPU test ran before

@pytest.mark.gpu
@needs_cuda
def test_preserved_rng_puts_the_cuda_generator_back():
    """lr-find and the overfit check run inside ``seeding.preserved_rng``: on CUDA it restores the GPU's
    generator too (``torch.cuda.set_rng_state_all``), so ``fit`` after them draws what it would have drawn."""
    from finetune.core.seeding import preserved_rng

    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    with preserved_rng():
        torch.rand(8, device="cuda")
        assert not torch.equal(torch.cuda.get_rng_state(), state)
    assert torch.equal(torch.cuda.get_rng_state(), state)


CUDA_UNINITIALISED = """
import torch
from finetune.core.seeding import preserved_rng, seed_everything
torch.manual_seed(1234)
with preserved_rng():
    seed_everything(7)
assert not torch.cuda.is_initialized(), "the guard initialised CUDA"
with preserved_rng():
    seed_everything(7)
    torch.rand(4, device="cuda")
after = torch.cuda.get_rng_state()
torch.cuda.manual_seed(1234)
assert torch.equal(after, torch.cuda.get_rng_state()), "the run's CUDA stream left to the caller"
print("ok")
"""


@pytest.mark.gpu
@needs_cuda
def test_preserved_rng_leaves_cuda_uninitialised_and_seeds_it_as_the_caller_did():
    """In a fresh process (CUDA not initialised): the guard does not initialise CUDA to read its generators, and a
    run inside it that starts CUDA leaves the GPU's generator as the caller's ``torch.manual_seed`` would have
    started it (the CPU simulation: test_host_process.py::test_the_rng_guard_neither_initialises_cuda_nor_leaves_the_
    runs_seed_for_it). Written by helper-129 without a GPU: not yet run on one."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", CUDA_UNINITIALISED], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
def test_doctor_features_on_cuda_are_the_cpu_ones(tmp_path):
    """`zoo doctor` on a GPU: one forward pass per image under autocast (``config.amp``: bf16 or fp16) in NCHW
    (``runtime.nhwc``: a single pass), in banks of their own (device, amp and layout are in the key). Each image's
    features point where the CPU's do: bf16 keeps ~3 digits, a wrong normalisation or layout moves them far more."""
    import copy

    import timm

    from finetune.core.config import FinetuneConfig
    from finetune.data import scan_folder
    from finetune.tools.doctor import folder_features
    from tests.conftest import make_image_folder
    from tests.finetune.test_doctor import DATA_CONFIG

    report = scan_folder(make_image_folder(tmp_path / "data", layout="split", per_class=6, val_per_class=2))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    config = FinetuneConfig(batch_size=8, workers=0, epochs=1, quiet=True)
    cache = tmp_path / "features"
    cpu = folder_features(report, copy.deepcopy(model), "fc", DATA_CONFIG, config, cache_dir=cache)
    gpu = folder_features(report, copy.deepcopy(model), "fc", DATA_CONFIG, config, cache_dir=cache, device="cuda")
    assert gpu[2] == 0                     # not the CPU's banks
    for split in cpu[0]:
        assert (gpu[1][split] == cpu[1][split]).all()
        a, b = torch.from_numpy(cpu[0][split]), torch.from_numpy(gpu[0][split])
        assert a.shape == b.shape and torch.isfinite(b).all()
        assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.99


@pytest.mark.gpu
@needs_cuda
def test_predict_on_cuda_gives_the_cpu_probabilities(tmp_path):
    """`zoo predict` / `zoo eval` / the run's report on a GPU: batches in NCHW (``zoo.predict.model_input``: NHWC is
    the CPU's), probabilities back on the host, a file that does not decode skipped as on the CPU."""
    from zoo.predict import predict_probs
    from tests.zoo.test_predict import DC, MeanColour, _gradient

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    images = [_gradient(16, 12), broken, _gradient(10, 10)]
    got = {}
    for device in ("cpu", "cuda"):
        model = MeanColour().eval().to(device)
        got[device] = predict_probs(model, images, DC, batch_size=2, on_error=lambda item, why: None)
    assert got["cuda"][0] == got["cpu"][0] == [0, 2]
    assert got["cuda"][1].device.type == "cpu"
    assert torch.allclose(got["cuda"][1], got["cpu"][1], atol=1e-5)
