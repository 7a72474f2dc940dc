"""Apple MPS, simulated on the CPU (the Apple MPS audit, helper-125). Nothing here has run on Apple hardware: these
tests hold the code to MPS's documented limits, as ``finetune.core.devices`` states them.

The simulation (:class:`FakeMps`):

* The run's device is ``cpu:0``: the CPU, but named apart from the host's ``cpu``, so a copy to the device
  (``.to(device)``, ``device=device``) and one back to the host (``.cpu()``, ``.to("cpu")``) can be told apart.
* ``core.devices.NO_FLOAT64`` and ``BLOCKING_COPIES`` hold "cpu": each decision of the device's kind answers as on
  MPS (as test_cuda_branches forces CUDA's answers on the CPU).
* A ``TorchFunctionMode`` follows which tensors live on the device: those made or moved there, those a tensor there
  computes (or hands out: ``.grad``, ``.data``), and a module's parameters after ``.to(device)``; a copy to the host
  is a host tensor, as are tensors made from host ones only. A device tensor reports ``cpu:0`` as its device, so
  that ``device=t.device`` stays on the device, as on MPS. On the device it raises what MPS raises: a float64 (or
  complex128) tensor made there (MPS's TypeError, word for word), and a numpy view of a device tensor. Host-side
  float64 (the guard's bootstrap, the doctor's cosines, values widened after their copy) is left alone, as MPS
  leaves it. It counts the copies between host and device that ask ``non_blocking`` (unsafe on MPS:
  ``core.devices``).

What it does not simulate: ops MPS lacks (PYTORCH_ENABLE_MPS_FALLBACK), its allocator and memory errors, its
numerics (float32 sums round differently from float64), and work on other threads (``--decode device``'s thread).
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from tests.finetune.test_train import DATA_CONFIG, STAGES, cfg, tiny_model

DEVICE = torch.device("cpu", 0)
HOST = torch.device("cpu")
MPS_FLOAT64 = ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. "
               "Please use float32 instead.")
_DEVICE_ATTR = torch._C.TensorBase.device
_DATA_ATTR = torch._C.TensorBase.data


class FakeMps(TorchFunctionMode):
    """MPS's float64 ban on the tensors that live on the simulated device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._on: dict[int, weakref.ref] = {}
        self.float64_ops: list[str] = []
        self.async_copies = 0      # non_blocking copies between the host and the device (MPS: pytorch#189690)

    def on(self, t) -> bool:
        ref = self._on.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def mark(self, t: torch.Tensor) -> None:
        self._on[id(t)] = weakref.ref(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_ATTR and self.on(args[0]):       # t.device of a device tensor: the device
            return DEVICE
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and self.on(args[0]):
            raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        target = _target(func, args, kwargs)
        if func is torch.Tensor.to and _parse_to(args, kwargs)[2] and (target == DEVICE or self.on(args[0])):
            self.async_copies += 1
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on = target == DEVICE if target is not None else any(self.on(a) for a in inputs)
        out = func(*args, **kwargs)
        if owner is _DATA_ATTR and getattr(func, "__name__", "") == "__set__":     # p.data = moved
            if self.on(args[1]):
                self.mark(args[0])
            return out
        if not on:     # a copy to the host of a device tensor that torch returned as is (cpu:0 is the CPU)
            return tree_map(lambda t: t.clone() if self.on(t) else t, out) if target is not None else out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.dtype in (torch.float64, torch.complex128):
                    self.float64_ops.append(getattr(func, "__name__", str(func)))
                    raise TypeError(MPS_FLOAT64)
                self.mark(t)
        return out


def _target(func, args, kwargs) -> torch.device | None:
    """Where ``func`` puts its result, when it says: ``.to(...)``'s device, ``.cpu()``, a factory's ``device=``."""
    if func is torch.Tensor.to:
        device = _parse_to(args, kwargs)[0]
    elif func is torch.Tensor.cpu:
        device = HOST
    else:
        device = kwargs.get("device")
    return None if device is None else torch.device(device)


def _parse_to(args, kwargs) -> tuple:
    """``Tensor.to``'s arguments as torch reads them: (device, dtype, non_blocking, memory_format)."""
    return torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})


@pytest.fixture
def mps(monkeypatch):
    """The simulated MPS: the device-kind decisions forced to MPS's answers, the mode on; yields the mode."""
    import finetune.core.devices as devices

    monkeypatch.setattr(devices, "NO_FLOAT64", frozenset({"cpu", "mps"}))
    monkeypatch.setattr(devices, "BLOCKING_COPIES", frozenset({"cpu", "mps"}))
    mode = FakeMps()
    with mode:
        yield mode


def test_the_simulation_raises_what_mps_raises_on_the_device_only(mps):
    """The simulation itself: float64 made on the device raises MPS's TypeError; host float64, a device tensor's
    float32 copy widened on the host, and ``device=t.device`` of a device tensor behave as on MPS."""
    x = torch.ones(3).to(DEVICE)
    assert x.device == DEVICE and torch.zeros(1, device=x.device).device == DEVICE
    with pytest.raises(TypeError, match="MPS framework doesn't support float64"):
        x.double()
    with pytest.raises(TypeError, match="MPS framework doesn't support float64"):
        torch.zeros((), dtype=torch.float64, device=x.device)
    with pytest.raises(TypeError, match="to numpy"):
        x.numpy()
    host = x.cpu()
    assert host.device == HOST and host.double().sum().item() == 3.0
    assert torch.zeros(2, dtype=torch.float64).sum().item() == 0.0


def test_the_device_kind_decisions_answer_float32_sums_and_blocking_copies_on_mps_only():
    from finetune.core.devices import copies_async, sum_dtype

    assert [sum_dtype(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == [torch.float64] * 3 + [torch.float32]
    assert [copies_async(d) for d in ("cpu", "cuda:0", "mps", "mps:0")] == [True, True, False, False]


def _data(tmp_path):
    from finetune.data import scan_folder
    from tests.conftest import make_image_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, size=32), val_split=0.25, seed=0)
    return report.train, report.val


@pytest.mark.parametrize("freeze, fast_head", [("head", True), ("head", False), ("none", False)])
def test_fit_trains_and_validates_on_simulated_mps(tmp_path, mps, monkeypatch, freeze, fast_head):
    """A head-only run (on cached features: the feature pass, the L-BFGS head solve held on the device, and the
    gradient head) and a --freeze none run with a head phase train and validate with no float64 on the device:
    the epoch's sums in float32 there (``core.devices.sum_dtype``), the per-image validation losses widened on
    the host (the head guard's evidence). Before the fix, the first epoch's loss sum raised MPS's TypeError. Every
    copy between host and device blocks (``core.devices.copies_async``): none asks non_blocking."""
    import finetune.tools.features.head as head_module
    from finetune.tools.train import fit

    monkeypatch.setattr(head_module, "SOLVE_ON_CPU_UP_TO", -1)     # the solve where a big one runs: the device
    train, val = _data(tmp_path)
    config = cfg(device="cpu:0", freeze=freeze, fast_head=fast_head, head_epochs=1 if freeze == "none" else 0,
                 epochs=2, batch_size=8)
    result = fit(tiny_model(), STAGES, DATA_CONFIG, train, val, config, head="fc", run_dir=tmp_path / "run")
    assert mps.float64_ops == [] and mps.async_copies == 0     # (batches, features, validation outputs: blocking)
    rows = result.history
    assert rows and all(isinstance(r["train_loss"], float) and isinstance(r["val_loss"], float) for r in rows)
    assert all(r["val_loss"] == r["val_loss"] for r in rows)      # (not NaN)


def test_the_mirror_test_solved_on_the_device_scores_without_float64(mps):
    """The handedness test's per-image scores (0, 0.5 or 1) live where its L-BFGS fits run: on the device above
    SOLVE_ON_CPU_UP_TO. There in float32 on MPS (exact for these values); before the fix, float64 there raised."""
    from finetune.tools.features.handedness import handedness

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(40, 6, generator=g)
    labels = torch.arange(40) % 2
    out = handedness(plain.to(DEVICE), plain.flip(1).to(DEVICE), labels.to(DEVICE), 2, seed=0)
    assert mps.float64_ops == [] and 0.0 <= out.score <= 1.0 and out.images == 40


def test_evaluation_keeps_its_losses_float64_on_the_host(mps):
    """``engine.evaluate``'s per-image losses (the head guard pairs them) are float64 on the host whatever the
    device: widened after their copy, not on the device."""
    from finetune.engine.steps import evaluate

    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3).to(DEVICE)
    batches = [(torch.randn(n, 4), torch.tensor([0, 1, 2, 0][:n])) for n in (4, 3)]
    losses: list = []
    out = evaluate(linear, batches, torch.nn.CrossEntropyLoss(), DEVICE, ["a", "b", "c"], losses=losses)
    assert [(t.dtype, t.device, mps.on(t)) for t in losses] == [(torch.float64, HOST, False)] * 2
    assert torch.cat(losses).mean().item() == pytest.approx(out["loss"], rel=1e-6)


def test_device_decoding_puts_every_image_on_a_device_that_is_not_cuda():
    """``--decode device``: torchvision's ``decode_jpeg(..., device=d)`` decodes on the CPU and returns CPU tensors
    for any ``d`` but CUDA, so on MPS the decoded JPEGs stayed on the host beside the images the workers decoded (moved
    to the device). Every image lands on the device now. ``meta`` stands for a device that is not CUDA (and does not
    need one here)."""
    from torchvision.io import encode_jpeg

    from finetune.data.decode import DeviceTransform

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    decode = DeviceTransform(DATA_CONFIG, False, cfg()).decode
    out = decode([encode_jpeg(image), image], torch.device("meta"))
    assert [(im.device.type, tuple(im.shape)) for im in out] == [("meta", (3, 16, 16))] * 2


MPS_OUT_OF_MEMORY = ("MPS backend out of memory (MPS allocated: 9.00 GiB, other allocations: 464.00 KiB, max allowed: "
                     "9.32 GiB). Tried to allocate 1024.00 MiB on private pool. "
                     "Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
                     "(may cause system failure).")


def test_mps_out_of_memory_stops_a_run_as_cuda_s_does():
    """MPS's allocator raises a plain RuntimeError (``TORCH_CHECK(false, "MPS backend out of memory ...")`` in
    MPSAllocator.mm), not torch's OutOfMemoryError: it went through the generic error path (a traceback, no line on
    what is saved and how to resume in smaller passes). Now it is out of memory, shown without torch's advice to lift
    the allocator's watermark (which "may cause system failure")."""
    from finetune.core.errors import is_out_of_memory, memory_text, stops_run

    err = RuntimeError(MPS_OUT_OF_MEMORY)
    assert is_out_of_memory(err) and stops_run(err)
    assert memory_text(err) == ("MPS backend out of memory (MPS allocated: 9.00 GiB, other allocations: 464.00 KiB, "
                                "max allowed: 9.32 GiB). Tried to allocate 1024.00 MiB on private pool")
    assert not is_out_of_memory(RuntimeError("the hook failed after an MPS backend out of memory"))


def test_predict_s_batches_reach_the_device_by_blocking_copies_and_come_back_float32(mps):
    """``zoo predict``, ``zoo eval`` and ``zoo serve`` predict through ``zoo.predict.model_input`` on the model's
    device: no float64 there, and the batch copied there blocking on MPS (it was non_blocking: pytorch#189690)."""
    from PIL import Image

    from zoo.predict import predict_probs

    model = tiny_model().to(DEVICE).eval()
    images = [Image.new("RGB", (40, 36), colour) for colour in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    kept, probs = predict_probs(model, images, DATA_CONFIG, batch_size=2, threads=0)
    assert kept == [0, 1, 2] and probs.dtype == torch.float32 and not mps.on(probs)
    assert mps.float64_ops == [] and mps.async_copies == 0


def test_the_doctor_s_feature_pass_on_simulated_mps(tmp_path, mps):
    """``zoo doctor``'s features come off the device as float32 per batch; its float64 (the cosines, the label
    probe) is computed on the host from them: nothing float64 on the device, no numpy view of a device tensor."""
    from finetune.data import scan_folder
    from finetune.tools.doctor.run import folder_features
    from tests.conftest import make_image_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=4), val_split=0.25, seed=0)
    feats, valid, hits = folder_features(report, tiny_model(), "fc", DATA_CONFIG, cfg(), cache_dir=tmp_path / "cache",
                                         device="cpu:0")
    assert mps.float64_ops == [] and hits == 0
    assert {k: (v.dtype.name, int(m.sum())) for (k, v), m in zip(feats.items(), valid.values())} == \
        {"train": ("float32", 9), "val": ("float32", 3)}
