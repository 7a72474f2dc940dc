"""CUDA-only branches, forced on the CPU (issue 23, item 4; helper-114's audit, docs/benchmarks.md "Since run 4
(session 31)"). A CUDA decision (``runtime.warms_up``, ``device_steps``, ``runtime.cudnn_autotune``, ...) is forced
here and the code behind it, which runs on any device, is checked against the CPU's own path: the same numbers, or
the documented behaviour. What only a GPU can run (streams and events, pinned memory, nvJPEG, the CUDA RNG,
``torch.cuda.mem_get_info``) is left to ``pytest -m gpu``."""
from __future__ import annotations

import pytest
import torch

from tests.finetune.test_train import DEVICES, cfg, data, needs_cuda, run, snapshot, tiny_model  # noqa: F401  (data)

METRICS = ("phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def _same_run(a, b) -> None:
    """Two runs that trained the same: every epoch's metrics and every weight, bit for bit."""
    assert [{k: r[k] for k in METRICS} for r in a.history] == [{k: r[k] for k in METRICS} for r in b.history]
    first, second = snapshot(a.model), snapshot(b.model)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k],
                                                                                                     second[k])]


@pytest.mark.parametrize("options", [
    dict(freeze="none", head_epochs=1, epochs=2, bn="train"),
    dict(freeze="none", micro_batch=4, class_weights="auto", label_smoothing=0.1),
    dict(freeze="none", mixup=0.4, ema=0.5),
], ids=["head-phase-then-all-bn-train", "micro-batch-class-weights", "mixup-ema"])
def test_the_cuda_warm_up_leaves_the_run_as_it_was(data, tmp_path, monkeypatch, options):  # noqa: F811
    """On CUDA each phase that trains through the network first passes blank batches of its shapes forward and
    backward (``runtime.warms_up``, ``steps.warm_up``): it must change nothing (gradients, BatchNorm statistics,
    modes, the dropout's generator). Forced here on the CPU, one process (torchrun's case: test_distributed), with
    dropout: the runs with and without it are the same, bit for bit."""
    from finetune.engine import epoch_steps

    warmed: list[tuple] = []
    real = epoch_steps.warm_up

    def spy(model, train_shape, eval_shape, *a, **k):
        warmed.append((train_shape, eval_shape, k.get("only_train") is not None))
        return real(model, train_shape, eval_shape, *a, **k)

    monkeypatch.setattr(epoch_steps, "warm_up", spy)
    plain = run(data, cfg(**options), model=tiny_model(drop_rate=0.3), run_dir=tmp_path / "plain")
    assert warmed == []                               # the CPU's own choice: no warm-up
    monkeypatch.setattr(epoch_steps, "warms_up", lambda device: True)
    forced = run(data, cfg(**options), model=tiny_model(drop_rate=0.3), run_dir=tmp_path / "warmed")
    phases = [r["phase"] for r in forced.history]
    assert [w[2] for w in warmed] == [p == "head" for p in dict.fromkeys(phases)]     # once per phase
    micro = int(options.get("micro_batch", 0))
    assert all(w[0] == ((3 if micro else 9), 3, 32, 32) and w[1] == w[0] for w in warmed), warmed
    _same_run(plain, forced)


def test_cudnn_autotunes_a_long_cuda_run_only(monkeypatch):
    """``cudnn.benchmark`` (process-wide) goes on for a CUDA run of at least CUDNN_AUTOTUNE_MIN_STEPS network
    steps and off for a shorter one; a CPU run leaves it as it is. The flag itself needs no GPU to be set."""
    from finetune.engine.runtime import CUDNN_AUTOTUNE_MIN_STEPS, cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda = torch.device("cuda", 0)
    assert cudnn_autotune(cuda, CUDNN_AUTOTUNE_MIN_STEPS) is True and torch.backends.cudnn.benchmark
    assert cudnn_autotune(cuda, CUDNN_AUTOTUNE_MIN_STEPS - 1) is False and not torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    assert cudnn_autotune(torch.device("cpu"), 10 * CUDNN_AUTOTUNE_MIN_STEPS) is False
    assert torch.backends.cudnn.benchmark        # untouched



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
    options = _config(hflip=0.0, brightness=0.0, contrast=0.0, crop_scale_min=0.5)

    def probe():
        return lr_find(_tiny_model(), STAGES, DATA_CONFIG, train, options, head="fc", start_lr=1e-5, end_lr=1.0,
                       steps=6).losses

    cpu = probe()
    seen = _cuda_steps(monkeypatch)
    assert probe() == cpu and len(cpu) == 6
    assert seen == [("DeviceAugment", torch.uint8, 0.0)] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_a_warm_up_leaves_no_trace(device):
    """``steps.warm_up`` itself, on the device the GPU session has (its CUDA case is the one CUDA runs: the CUDA
    generator forked by ``passes.as_before``, autocast in the device's precision): the BatchNorm statistics, the
    gradients, the modes and the random generators (the CPU's and, on CUDA, the device's) are as before, and a
    head-phase warm-up leaves the backbone in eval mode."""
    from finetune.engine.runtime import amp_policy
    from finetune.engine.steps import warm_up

    dev = torch.device(device)
    model = tiny_model(drop_rate=0.5).to(dev).to(memory_format=torch.channels_last)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)          # a gradient the warm-up must leave as it was
    model.train()
    model.stem.eval()
    before = snapshot(model)
    modes = [m.training for m in model.modules()]
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])
    for only_train in (None, model.fc):
        warm_up(model, (4, 3, 32, 32), (5, 3, 32, 32), torch.nn.CrossEntropyLoss().to(dev), dev,
                amp=amp_policy(dev, True), channels_last=True, only_train=only_train)
        after = snapshot(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight)) and model.fc.bias.grad is None
        assert model.stem[0].weight.grad is None
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(torch.get_rng_state(), rng[0])
        if dev.type == "cuda":
            assert torch.equal(torch.cuda.get_rng_state(dev), rng[1])


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
