"""One engine under every tool: fit (both head paths), lr-find, the overfit check and sweep trials
all stand on ``engine.build_setup``, so they ask the same device resolver, mixed-precision policy and
loss builder; lr-find probes a head-only setup on cached features; a sweep computes features once."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import finetune.engine.setup as engine_setup
from finetune.core.config import FinetuneConfig
from finetune.data import scan_folder
from finetune.tools.diagnostics import lr_find, overfit_check
from finetune.engine import AmpPolicy
from finetune.tools.sweep import sweep
from finetune.tools.train import fit
from tests.conftest import make_image_folder
from tests.finetune.test_train import DEVICES

ROOT = Path(__file__).resolve().parents[2]
STAGES = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return scan_folder(make_image_folder(tmp_path_factory.mktemp("d") / "data", per_class=8), val_split=0.25)


def _model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=5)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu", "seed": 1, **kw})


def test_every_tool_asks_the_same_policy(report, monkeypatch):
    """fit (cached head and ordinary path), lr-find (both modes) and the overfit check each build their
    setup once through build_setup: one device resolver, one AMP policy, one loss builder."""
    calls: list[tuple[str, str]] = []
    for name in ("resolve_device", "amp_policy", "build_loss"):
        real = getattr(engine_setup, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, tool))
            return _real(*args, **kwargs)

        monkeypatch.setattr(engine_setup, name, spy)
    autocasts: list[str] = []
    real_autocast = AmpPolicy.autocast
    monkeypatch.setattr(AmpPolicy, "autocast", lambda self: (autocasts.append(tool), real_autocast(self))[1])

    runs = {
        "fit cached head": lambda: fit(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                                       _cfg(freeze="head"), head="fc"),
        "fit ordinary": lambda: fit(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                                    _cfg(freeze="1", head_epochs=0), head="fc"),
        "lr-find head": lambda: lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="head"),
                                        head="fc", steps=6),
        "lr-find network": lambda: lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="1"),
                                           head="fc", steps=6),
        "overfit": lambda: overfit_check(_model(), STAGES, DATA_CONFIG, report.train, _cfg(), head="fc",
                                         batches=1, max_steps=2),
    }
    for tool, run in runs.items():
        run()
    for tool in runs:
        # build_loss twice: the training loss and the (never smoothed) evaluation loss, one builder
        assert [n for n, t in calls if t == tool] == ["resolve_device", "amp_policy", "build_loss", "build_loss"], tool
        assert tool in autocasts, tool          # every forward pass goes through the policy's autocast


def test_precision_loss_and_device_are_decided_in_one_module():
    """No second AMP policy, loss builder or device resolver anywhere in finetune or zoo."""
    patterns = {"torch.autocast(": "autocast", "GradScaler(": "GradScaler", "is_bf16_supported": "bf16 check",
                "get_device_capability": "bf16 check",
                "CrossEntropyLoss(": "loss", "def resolve_device": "device resolver",
                "def pick_device": "device resolver"}
    found = {}
    for path in list((ROOT / "finetune").rglob("*.py")) + list((ROOT / "zoo").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in patterns.items():
            if pattern in text:
                found.setdefault(what, set()).add(str(path.relative_to(ROOT)))
    assert found == {what: {"finetune/engine/runtime.py"} for what in set(patterns.values())}


def test_lr_find_head_only_probes_cached_features(report):
    logs: list[str] = []
    res = lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="head"), head="fc", steps=20,
                  log=logs.append)
    assert any("probing the head on cached features" in m for m in logs)
    assert sum("features: train" in m and "computed" in m for m in logs) == 1
    assert len(res.lrs) >= 5 and res.suggestion > 0
    logs.clear()
    lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="2", head_epochs=0), head="fc", steps=6,
            log=logs.append)
    assert any("probing the network" in m for m in logs) and not any("features:" in m for m in logs)


def test_lr_find_probes_from_the_head_the_run_trains_before_finetuning(report, monkeypatch):
    """helper-160 (docs/peers.md, "The lecture's tricks at medium size"): on medium digits `--lr auto` suggested a 5x
    lower LR than the default and tested 1.8 points lower: the range test grew the LR from a new random head (loss
    2.72, chance 2.30) while the run's finetune phase starts from the head its head phase solved. The test now runs
    that head phase first, as fit does (L2 strength picked on the validation split): its head is fit's, to the bit,
    and the curve starts at the trained head's loss, not chance's."""
    from finetune.engine import Trainer

    heads: dict[str, torch.Tensor] = {}
    real = Trainer.start_finetuning

    def spy(self):
        real(self)
        heads["lr-find"] = self.s.head_module.weight.detach().clone()

    monkeypatch.setattr(Trainer, "start_finetuning", spy)
    logs: list[str] = []
    trained = lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="2"), head="fc", val_set=report.val,
                      steps=20, end_lr=1e-2, log=logs.append)
    assert any(m.startswith("lr-find: head: L-BFGS on cached features") and "picked on the validation split" in m
               for m in logs), logs
    assert any("probing the network from the trained head" in m for m in logs), logs

    model = _model()

    def after_epoch(row):
        if row["epoch"] == 1:
            heads["fit"] = model.fc.weight.detach().clone()

    fit(model, STAGES, DATA_CONFIG, report.train, report.val, _cfg(freeze="2"), head="fc", callbacks=[after_epoch])
    assert torch.equal(heads["lr-find"], heads["fit"])

    new = lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="2", head_epochs=0), head="fc",
                  val_set=report.val, steps=20, end_lr=1e-2)
    assert trained.losses[0] < new.losses[0]     # (0.0066 against 1.14 here)
    assert trained.from_trained_head and not new.from_trained_head


def test_lr_find_features_serve_the_following_fit(report):
    """--lr auto: the range test's features are the fit's (one FeatureCache), computed once."""
    from finetune.tools.features import FeatureCache

    cache = FeatureCache(None)
    lr_find(_model(), STAGES, DATA_CONFIG, report.train, _cfg(freeze="head"), head="fc", steps=6,
            feature_cache=cache)
    fit(_model(), STAGES, DATA_CONFIG, report.train, report.val, _cfg(freeze="head"), head="fc", feature_cache=cache)
    assert (cache.computed, cache.hits) == (2, 1)      # train (lr-find) + val (fit); fit's train is a hit


def test_sweep_computes_backbone_features_once(report, tmp_path):
    logs: list[str] = []
    res = sweep(_model, STAGES, DATA_CONFIG, report.train, report.val, _cfg(freeze="head", head_solver="gradient"),
                head="fc",
                out_dir=tmp_path / "sweep", lrs=[1e-3, 1e-2, 1e-1], freezes=["head"], log=logs.append)
    assert len(res.trials) == 3 and all(t.status == "ok" for t in res.trials)
    (line,) = [m for m in logs if m.startswith("features:")]
    assert re.search(r"2 bank\(s\) computed once, reused 4 time\(s\)", line), line
    assert len({round(t.metric, 6) for t in res.trials}) == 3      # the trials really differ


def test_cpu_state_cache_copies_only_what_changed():
    """Frozen parameters are copied once; trained ones, loaded ones and every buffer (BatchNorm updates its
    statistics without bumping their version counter) are copied again; the result always equals the state."""
    from finetune.core.checkpoint import CpuStateCache

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.randn(2, 3, 6, 6))
    net[0].weight.requires_grad_(False)
    cache = CpuStateCache(net)
    first = cache()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    net(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    second = cache()
    assert second["0.weight"] is first["0.weight"]                    # frozen: not copied again
    assert second["3.weight"] is not first["3.weight"]                # trained: a new copy
    assert second["1.running_mean"] is not first["1.running_mean"]    # buffers: always copied
    for k, v in net.state_dict().items():
        assert torch.equal(second[k], v), k
    net.load_state_dict({k: torch.zeros_like(v) for k, v in net.state_dict().items()})
    assert all(torch.equal(cache()[k], v) for k, v in net.state_dict().items())


def test_amp_picks_bf16_only_where_the_device_computes_it(monkeypatch):
    """A V100/T4 (compute capability 7.x) only emulates bf16, though torch.cuda.is_bf16_supported() says yes
    there: AMP is fp16 with a GradScaler; an A100/H100 (8.x, 9.x) gets bf16. Each device answers for itself
    (--device cuda:1 on a machine whose GPU 0 is another kind); a bare "cuda" is the current device."""
    from finetune.engine.runtime import amp_policy

    capability = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)     # torch's answer on a T4
    t4 = amp_policy(torch.device("cuda", 0), True)
    assert t4.dtype == torch.float16 and t4.needs_scaler
    assert amp_policy(torch.device("cuda"), True).dtype == torch.float16
    h100 = amp_policy(torch.device("cuda", 1), True)
    assert h100.dtype == torch.bfloat16 and not h100.needs_scaler
    assert amp_policy(torch.device("cuda", 1), False).dtype is None


@pytest.mark.parametrize("others_bf16", [True, False])
def test_amp_is_one_precision_on_every_rank(monkeypatch, others_bf16):
    """Multi-GPU audit (helper-89): under torchrun each process chose its precision from its own GPU, so GPUs of
    two generations (an A100 beside a V100 or T4) trained in bf16 on some ranks and fp16 with a GradScaler on
    others, and DDP averaged the fp16 ranks' scaled gradients (x65,536) with the others' unscaled ones. The ranks
    now agree: bf16 only where every rank's GPU computes it (``ddp.all_true``, forced here on the CPU: this rank's
    GPU is an H100, the other's as ``others_bf16``); one process asks no other."""
    from finetune.core import distributed as ddp
    from finetune.engine import runtime

    asked: list = []

    def all_true(flag, device, info):
        asked.append((flag, device, info.world_size))
        return flag and others_bf16

    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    monkeypatch.setattr(ddp, "all_true", all_true)
    gpu = torch.device("cuda", 1)
    two = ddp.DistInfo(rank=1, world_size=2, local_rank=1, enabled=True)
    policy = runtime.amp_policy(gpu, True, two)
    assert asked == [(True, gpu, 2)]
    assert (policy.dtype, policy.needs_scaler) == ((torch.bfloat16, False) if others_bf16 else (torch.float16, True))
    asked.clear()
    assert runtime.amp_policy(gpu, True, ddp.DistInfo()).dtype == torch.bfloat16 and asked == []
    assert runtime.amp_policy(gpu, False, two).dtype is None and asked == []     # no AMP: nothing to agree on


@pytest.mark.parametrize("device", ["cpu", "cuda:0", "mps"])
@pytest.mark.parametrize("trains", [True, False])
@pytest.mark.parametrize("enabled", [True, False])
def test_one_layout_rule_nhwc_on_the_cpu_always_on_cuda_when_the_network_trains(device, trains, enabled):
    """One rule for every forward pass (QA session 18): on the CPU oneDNN's NHWC kernels are the faster ones
    for a training step and a forward alike, so NHWC whenever --channels-last is on; on CUDA a single pass
    (doctor, a head-only run's feature pass) pays cuDNN's first-use NHWC set-up for nothing, so only runs that
    train the network; MPS stays NCHW. Doctor had the CUDA rule upside down and the CPU head path NCHW."""
    from finetune.engine import nhwc

    expected = enabled and (device == "cpu" or (device == "cuda:0" and trains))
    assert nhwc(torch.device(device), enabled, trains=trains) is expected
    assert nhwc(device, enabled, trains=trains) is expected


def test_a_bare_cuda_is_this_process_gpu_and_torchrun_refuses_another(monkeypatch):
    """QA: a bare "cuda" outside the process group meant cuda:0, so under torchrun every rank's LR range test
    (--lr auto --device cuda) and overfit check ran on GPU 0; it is torch's current device, the one ddp.setup
    pinned to LOCAL_RANK. Under torchrun an explicit other index put every rank on one GPU (an NCCL
    error at the first collective): a ConfigError before anything is written."""
    from finetune.core.distributed import DistInfo
    from finetune.core.errors import ConfigError
    from finetune.engine.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)     # LOCAL_RANK 2, pinned by ddp.setup
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    second_node = DistInfo(rank=6, world_size=8, local_rank=2, enabled=True)
    assert resolve_device("cuda", second_node) == resolve_device("auto", second_node) == torch.device("cuda", 2)
    assert resolve_device("cuda:2", second_node) == torch.device("cuda", 2)
    with pytest.raises(ConfigError, match=r"^device=cuda:1 under torchrun: .*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1", second_node)
    with pytest.raises(ConfigError, match="only 4 CUDA device"):
        resolve_device("cuda:7")


def test_a_one_process_run_on_one_of_several_gpus_says_torchrun_would_use_them_all(monkeypatch):
    from finetune.core.distributed import DistInfo
    from finetune.engine.runtime import idle_gpus_note

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    note = idle_gpus_note(torch.device("cuda", 0))
    assert note == ("device: cuda:0, one of the 4 GPUs here; to train on all 4, start the same command as "
                    "`torchrun --nproc-per-node 4 -m zoo finetune ...`")
    assert idle_gpus_note(torch.device("cpu")) is None
    assert idle_gpus_note(torch.device("cuda", 1), DistInfo(rank=1, world_size=4, local_rank=1, enabled=True)) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert idle_gpus_note(torch.device("cuda", 0)) is None


def test_the_one_gpu_of_several_note_does_not_advise_torchrun_a_device_it_refuses(monkeypatch):
    # `zoo finetune --device cuda:1` on 2 GPUs: "the same command" under torchrun would be refused on rank 0
    # (resolve_device: another index than LOCAL_RANK); the line says to pass --device cuda there instead.
    from finetune.engine.runtime import idle_gpus_note

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert idle_gpus_note(torch.device("cuda", 1), None, " CUDA:1") == (
        "device: cuda:1, one of the 2 GPUs here; to train on all 2, start the same command as "
        "`torchrun --nproc-per-node 2 -m zoo finetune ...` with --device cuda in place of --device cuda:1")
    for asked in ("auto", "cuda", None):
        assert idle_gpus_note(torch.device("cuda", 0), None, asked).endswith("-m zoo finetune ...`"), asked


def test_cudnn_autotune_only_for_jobs_of_many_steps(monkeypatch):
    """cudnn.benchmark autotunes each new shape: on for a long CUDA run, off for a few batches (a small
    job's feature pass sees 4-5 shapes), never touched on a CPU run."""
    from finetune.engine.runtime import CUDNN_AUTOTUNE_MIN_STEPS, cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert cudnn_autotune(torch.device("cpu"), 10**6) is False and torch.backends.cudnn.benchmark is True
    assert cudnn_autotune(torch.device("cuda", 0), 3) is False and torch.backends.cudnn.benchmark is False
    assert cudnn_autotune(torch.device("cuda", 0), CUDNN_AUTOTUNE_MIN_STEPS) is True
    assert torch.backends.cudnn.benchmark is True


def test_gather_strided_in_one_process_is_the_rows():
    from finetune.core import distributed as ddp

    rows = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(ddp.gather_strided(rows, 6, ddp.DistInfo()), rows)
    assert ddp.gather_objects("x", ddp.DistInfo()) == ["x"]


class _Watched:
    """A loader that records when a pass starts and when its first batch is read."""

    def __init__(self, loader, name: str, events: list) -> None:
        self.loader, self.name, self.events = loader, name, events

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, attr):
        if attr == "loader":
            raise AttributeError(attr)
        return getattr(self.loader, attr)

    def __iter__(self):
        self.events.append(f"{self.name} starts")
        inner = iter(self.loader)

        def read():
            for k, batch in enumerate(inner):
                if k == 0:
                    self.events.append(f"{self.name} read")
                yield batch
        return read()


def test_each_pass_starts_ahead_of_its_turn_with_the_same_batches(report, monkeypatch):
    """With workers, validation's pass starts as an epoch starts training and the next epoch's pass as
    validation starts, so no worker waits at an epoch's edges; validation's batches, kept after its first
    pass, are read once; every epoch's numbers are those of a run that loads in the main process (batches
    depend on (seed, epoch, rank) only), and of one that reads validation's images every epoch."""
    import finetune.data.replay as replay
    from finetune.engine import build_setup
    from finetune.engine.epoch_steps import LoaderSteps

    def run(workers: int, events: list | None = None) -> list:
        s = build_setup(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                        _cfg(epochs=3, freeze="none", workers=workers), head="fc", distributed=False)
        if events is not None:
            s.train_loader = _Watched(s.train_loader, "train", events)
            s.val_loader = _Watched(s.val_loader, "val", events)
        steps = LoaderSteps(s)
        steps.begin_phase("finetune")
        opt = s.optimizer()
        rows = []
        try:
            for epoch in (1, 2, 3):
                if events is not None:
                    events.append(f"epoch {epoch}")
                tr = steps.train_epoch(epoch, "finetune", opt, s.scheduler(opt), None)
                rows.append((tr["loss"], tr["acc"], steps.evaluate()["loss"]))
        finally:
            s.close()
        return rows

    events: list = []
    ahead = run(1, events)
    assert events == ["epoch 1", "train starts", "val starts", "train read", "train starts", "val read",
                      "epoch 2", "train read", "train starts", "epoch 3", "train read"]
    assert ahead == run(0)
    monkeypatch.setattr(replay, "BUDGET_BYTES", 0)     # nothing kept: validation read every epoch
    events = []
    assert run(1, events) == ahead
    assert events == ["epoch 1", "train starts", "val starts", "train read", "train starts", "val read",
                      "epoch 2", "val starts", "train read", "train starts", "val read",
                      "epoch 3", "val starts", "train read", "val read"]


@pytest.mark.parametrize("flip_dropped", [False, True])
def test_the_run_starts_its_first_pass_before_its_own_set_up_and_keeps_passes_across_phases(report, monkeypatch,
                                                                                             flip_dropped):
    """The first training pass starts before the trainer writes its run folder (the workers decode while
    it gets ready); a pass started ahead in the head phase is the finetune phase's first when the loader
    is the same, and started afresh when the phase replaced it (the flip dropped); every epoch's numbers
    are those of a run that loads in the main process."""
    from finetune.engine import RunFolder, Trainer, build_setup

    def run(workers: int, events: list | None = None) -> list:
        s = build_setup(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                        _cfg(epochs=3, freeze="none", head_epochs=1, fast_head=False, workers=workers),
                        head="fc", distributed=False)
        trainer = Trainer(s, RunFolder(None, s.info))
        if events is not None:
            s.train_loader = _Watched(s.train_loader, "train", events)
            s.val_loader = _Watched(s.val_loader, "val", events)
            monkeypatch.setattr(RunFolder, "start", lambda *a, **k: events.append("run folder"))
            if flip_dropped:
                trainer.mirror = {"dropped": True}
                monkeypatch.setattr(type(s), "train_without_flip", lambda self: setattr(
                    self, "train_loader", _Watched(self.train_loader.loader, "train", events)))
        try:
            result = trainer.run()
        finally:
            s.close()
        monkeypatch.undo()
        return [(r["phase"], r["train_loss"], r["val_loss"]) for r in result.history]

    events: list = []
    ahead = run(1, events)
    assert [r[0] for r in ahead] == ["head", "finetune", "finetune"]
    assert events[:2] == ["train starts", "run folder"]
    # one pass per epoch (3), plus the head phase's pass for epoch 2 when the finetune phase's loader differs
    assert events.count("train starts") == 3 + flip_dropped
    assert ahead == run(0)


def test_background_writes_run_in_order_and_report_the_first_error_once():
    import threading

    from finetune.core.checkpoint import BackgroundWrites
    from finetune.core.errors import CheckpointError

    done: list[int] = []
    gate = threading.Event()
    w = BackgroundWrites()
    w.submit(lambda: (gate.wait(30), done.append(1)))
    w.submit(lambda: done.append(2))
    assert done == []                              # submit returns at once
    gate.set()
    w.wait()
    assert done == [1, 2]

    def full():
        raise CheckpointError("cannot write checkpoint x: No space left on device")
    w.submit(full)
    w.submit(lambda: done.append(3))               # later writes still run
    with pytest.raises(CheckpointError, match="No space left"):
        w.wait()
    assert done == [1, 2, 3]
    w.wait()                                       # reported once


def test_the_next_epoch_trains_while_the_last_checkpoint_is_written(report, tmp_path, monkeypatch):
    """last.pt reaches the disk on a background thread: epoch 2 reads its first batch while epoch 1's
    checkpoint is still being written, and the checkpoints on disk are whole (a resume reads the last)."""
    import threading

    import finetune.engine.runfolder as runfolder
    from finetune.core.checkpoint import load_checkpoint
    from finetune.engine import RunFolder, Trainer, build_setup

    events: list = []
    second_pass_read = threading.Event()
    real_save = runfolder.save_checkpoint
    overlapped: list[bool] = []

    def slow_save(path, state):
        if state["epoch"] == 1:            # epoch 1's checkpoint waits until epoch 2 has started reading
            overlapped.append(second_pass_read.wait(60))
        real_save(path, state)

    monkeypatch.setattr(runfolder, "save_checkpoint", slow_save)
    s = build_setup(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                    _cfg(epochs=2, freeze="none", head_epochs=0), head="fc", distributed=False)
    s.train_loader = _Watched(s.train_loader, "train", events)

    class _Second(list):
        def append(self, item):
            super().append(item)
            if item == "train read" and self.count("train read") == 2:
                second_pass_read.set()
    events = _Second()
    s.train_loader.events = events
    try:
        result = Trainer(s, RunFolder(tmp_path / "run", s.info)).run()
    finally:
        s.close()
    assert overlapped == [True]
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2


def test_sigterm_while_the_last_files_are_written_is_an_interruption(report, tmp_path, monkeypatch):
    """The last epoch's files are waited for while SIGTERM still means "stop cleanly": a SIGTERM then is
    an Interrupted that names the last epoch as saved, with no temp file left (never the default action,
    which would kill the process half-way through writing)."""
    import os
    import signal

    import finetune.engine.runfolder as runfolder
    from finetune.core.checkpoint import load_checkpoint
    from finetune.core.errors import Interrupted
    from finetune.engine import RunFolder, Trainer, build_setup

    def outside(signum, frame):
        raise RuntimeError("SIGTERM arrived after the run had put its handler back")

    real_save = runfolder.save_checkpoint

    def save(path, state):
        if state["finished"]:
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(path, state)

    monkeypatch.setattr(runfolder, "save_checkpoint", save)
    s = build_setup(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                    _cfg(epochs=2, freeze="none", head_epochs=0), head="fc", distributed=False)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(Interrupted, match="epochs up to 2 are saved"):
            Trainer(s, RunFolder(tmp_path / "run", s.info)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        s.close()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


def test_a_run_that_fails_waits_for_the_files_it_handed_over(report, tmp_path, monkeypatch):
    """Whatever ends a run (here an error in epoch 2), the files already handed to the background writer
    reach the disk before the error leaves fit: no writing thread outlives the run."""
    import threading
    import time

    import finetune.engine.runfolder as runfolder
    from finetune.core.checkpoint import load_checkpoint
    from finetune.engine import RunFolder, Trainer, build_setup
    from finetune.engine.epoch_steps import LoaderSteps

    real_save = runfolder.save_checkpoint

    def slow(path, state):
        if state["epoch"] == 1:
            time.sleep(0.5)
        real_save(path, state)

    real_train = LoaderSteps.train_epoch

    def train(self, epoch, *args):
        if epoch == 2:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return real_train(self, epoch, *args)

    monkeypatch.setattr(runfolder, "save_checkpoint", slow)
    monkeypatch.setattr(LoaderSteps, "train_epoch", train)
    s = build_setup(_model(), STAGES, DATA_CONFIG, report.train, report.val,
                    _cfg(epochs=3, freeze="none", head_epochs=0), head="fc", distributed=False)
    try:
        with pytest.raises(RuntimeError, match="stand-in"):
            Trainer(s, RunFolder(tmp_path / "run", s.info)).run()
    finally:
        s.close()
    assert not [t for t in threading.enumerate() if t.name == "zoo-checkpoint-writes"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_warm_up_runs_a_step_of_each_shape_and_changes_nothing(device):
    """``steps.warm_up`` (CUDA's first-use costs before epoch 1, forced here on the CPU; its CUDA case in ``pytest -m
    gpu``): one training forward and backward and one evaluation forward of the given shapes, and afterwards the
    weights, BatchNorm statistics, gradients (one already held: helper-114, the warm-up's backward added into it),
    modes and random generators (on CUDA the device's too: ``passes.as_before``) are as they were."""
    from finetune.engine.runtime import amp_policy
    from finetune.engine.steps import warm_up

    dev = torch.device(device)
    model = timm.create_model("test_resnet", num_classes=5, drop_rate=0.5).to(dev)
    model.train()
    model.get_submodule("fc").eval()            # a mixed set of modes must come back as it was
    held = torch.ones_like(model.get_submodule("fc").bias)
    model.get_submodule("fc").bias.grad = held.clone()     # left by an earlier phase's last step (the blank batch's
    #                                                        features are 0 here: of the head only its bias gets any)
    seen, backward = [], []
    model.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape), m.training)))
    model.get_submodule("fc").weight.register_hook(lambda g: backward.append(True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])
    warm_up(model, (4, 3, 32, 32), (3, 3, 32, 32), torch.nn.CrossEntropyLoss().to(dev), dev,
            amp=amp_policy(dev, True), channels_last=True)
    assert seen == [((4, 3, 32, 32), True), ((3, 3, 32, 32), False)] and backward == [True]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.get_submodule("fc").bias.grad, held)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.bias")
    assert [m.training for m in model.modules()] == modes and torch.equal(torch.get_rng_state(), rng[0])
    if dev.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(dev), rng[1])


def test_a_rank_whose_batch_failed_takes_the_step_with_zero_weight(tmp_path):
    """Under DDP a rank whose every image of a batch failed to decode used to skip the step while the others
    waited for its gradients (a hang; the two-process job is in test_distributed). It now takes the step on
    a blank batch weighing 0 (one rank here: what the step leaves behind, not the collectives): the weights
    move only by the real batch's gradient, the BatchNorm statistics, random generators and metrics are
    those of the real batch alone, and the LR schedule steps as every rank's does."""
    import torch.distributed as dist
    from finetune.core import distributed as ddp
    from finetune.engine.steps import train_one_epoch

    class Schedule:
        steps = 0

        def step_batch(self):
            self.steps += 1

        def current_lr(self):
            return 0.1

    def epoch(with_blank: bool):
        torch.manual_seed(0)
        model = ddp.wrap_model(timm.create_model("test_resnet", num_classes=3, drop_rate=0.5), cpu, info)
        blanks = []
        blank = lambda: blanks.append(1) or (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))  # noqa: E731
        optimizer, schedule = torch.optim.SGD(model.parameters(), lr=0.1), Schedule()
        batches = [(x, y), None] if with_blank else [(x, y)]
        out = train_one_epoch(model, batches, optimizer, schedule, torch.nn.CrossEntropyLoss(), cpu, info=info,
                              blank=blank)
        return model.module.state_dict(), out, schedule.steps, len(blanks), torch.get_rng_state()

    cpu = torch.device("cpu")
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = ddp.DistInfo(rank=0, world_size=1, enabled=True)
        state, out, steps, blanks, rng = epoch(True)
        one_state, one_out, one_steps, _, one_rng = epoch(False)
    finally:
        dist.destroy_process_group()
    assert (steps, blanks, one_steps) == (2, 1, 1)
    assert state.keys() == one_state.keys() and all(torch.equal(state[k], one_state[k]) for k in state)
    assert torch.equal(rng, one_rng)
    assert out["images"] == one_out["images"] == 4
    assert (out["loss"], out["acc"]) == (one_out["loss"], one_out["acc"])


def test_warm_up_meets_the_training_forwards_config_errors(report, monkeypatch):
    """On CUDA the warm-up makes the first training forward: a BatchNorm that trains on one image (--head mlp
    --batch-size 1) and a forward with auxiliary outputs were a ValueError / AttributeError traceback there,
    where the CPU's first epoch says what to change. Forced on here; the model comes back unchanged."""
    import finetune.engine.epoch_steps as epoch_steps
    from finetune.core.errors import ConfigError
    from finetune.engine.steps import warm_up

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.Linear(8, 2))
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ConfigError, match=r"^a BatchNorm layer cannot train on a batch of 1 image"):
        warm_up(mlp, (1, 3, 2, 2), None, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items()) and mlp.training

    class Aux(torch.nn.Module):       # torchvision's GoogLeNet/Inception v3 return a namedtuple while training
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 2)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            return (out, out) if self.training else out

    with pytest.raises(ConfigError, match="aux_logits=False"):
        warm_up(Aux(), (2, 3, 2, 2), None, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    monkeypatch.setattr(epoch_steps, "warms_up", lambda device: True)
    with pytest.raises(ConfigError, match=r"^a BatchNorm layer cannot train on a batch of 1 image"):
        fit(timm.create_model("test_resnet", num_classes=5), STAGES, DATA_CONFIG, report.train, report.val,
            _cfg(epochs=1, freeze="none", batch_size=1, head="mlp", head_epochs=0, fast_head=False), head="fc")


def test_a_run_that_warms_up_trains_exactly_as_one_that_does_not(report, monkeypatch):
    """With the warm-up forced on (it runs on CUDA only), each phase that trains through the network warms
    up its shapes first (the head phase with the backbone frozen in eval mode, as it trains), and every
    epoch's numbers and the final weights are those of a run without it (dropout on: the random
    generators too)."""
    import finetune.engine.epoch_steps as epoch_steps

    def run() -> tuple[list, dict]:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=5, drop_rate=0.3)
        result = fit(model, STAGES, DATA_CONFIG, report.train, report.val,
                     _cfg(epochs=3, freeze="none", head_epochs=1, fast_head=False), head="fc")
        return ([(r["phase"], r["train_loss"], r["val_loss"]) for r in result.history],
                {k: v.clone() for k, v in result.model.state_dict().items()})

    plain_history, plain_state = run()
    calls = []
    real = epoch_steps.warm_up
    monkeypatch.setattr(epoch_steps, "warms_up", lambda device: True)
    monkeypatch.setattr(epoch_steps, "warm_up", lambda model, train_shape, eval_shape, *a, only_train=None, **k: (
        calls.append((train_shape, eval_shape, only_train is not None)),
        real(model, train_shape, eval_shape, *a, only_train=only_train, **k))[1])
    warm_history, warm_state = run()
    n_val = min(8, len(report.val.items))
    train, val = (8, 3, 32, 32), (n_val, 3, 32, 32)       # one pass a call (which ran out of memory: helper-117)
    assert calls == [(train, None, True), (None, val, True), (train, None, False), (None, val, False)]
    assert warm_history == plain_history
    assert all(torch.equal(plain_state[k], v) for k, v in warm_state.items())


def test_the_class_weighted_validation_loss_is_one_mean_over_the_set_however_it_is_batched():
    """QA (session 18): evaluate averaged each batch's weighted mean by its image count, so the validation
    loss (early stopping, the best epoch) of --class-weights auto depended on the batch size and on how
    the set was split between ranks. It is now the weighted mean over the whole set."""
    from finetune.engine.steps import evaluate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=gen)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    weight = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight.float())
    model = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        whole = float(torch.nn.functional.cross_entropy(model(x.double()), y, weight=weight))
    for size in (1, 3, 10):
        batches = [(x[i:i + size].double(), y[i:i + size]) for i in range(0, 10, size)]
        out = evaluate(model, batches, loss_fn, torch.device("cpu"), ["a", "b", "c"])
        assert out["loss"] == pytest.approx(whole, rel=1e-6), size


def test_every_rank_takes_the_class_weight_all_reduce_whatever_its_batch(monkeypatch):
    """QA (review of session 18): under torchrun with --class-weights auto and --mixup, a rank whose whole batch
    failed to decode took its stand-in step on class targets and all-reduced the batch's class weight, while the
    other rank's mixed (probability) targets skipped it: gloo aborted the job ('collective mismatch'). The
    all-reduce now depends on the loss alone; for probability targets the shared weight is the image count."""
    from finetune.core import distributed as ddp
    from finetune.engine import passes as steps

    calls = []

    def two_equal_ranks(tensor, info):       # as if the other rank held the same batch
        calls.append(float(tensor))
        return tensor.mul_(2)

    monkeypatch.setattr(steps.ddp, "all_reduce_sum", two_equal_ranks)
    info = ddp.DistInfo(rank=0, world_size=2, enabled=True)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 4.0]))
    out = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    soft = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() * 0.7 + 0.1
    mixed = steps.batch_loss(loss_fn, out, soft, info)
    blank = steps.batch_loss(loss_fn, out, torch.zeros(4, dtype=torch.int64), info, pads=steps.Pads(0, 0))
    assert len(calls) == 2 and calls[0] == 4.0 and calls[1] == 0.0      # one collective each, as every rank's
    assert float(mixed) == pytest.approx(float(loss_fn(out, soft)), rel=1e-6)
    assert torch.isfinite(blank)


def test_a_batch_of_one_that_a_training_batchnorm_cannot_take_is_refused_at_set_up_and_a_last_one_is_dropped(
        report, monkeypatch):
    """QA (session 21, left as it was): `--batch-size 1 --bn train` where test_resnet's last maps are 1x1 (32 px)
    was refused only when that layer first trained (torch's "Expected more than 1 value per channel"). fit (and
    every tool on ``build_setup``) refuses it at set-up now, before any step, naming the layer and what to
    change. A last partial batch of one image (18 training images at batch 17) never reaches BatchNorm: the
    training loader drops it (``drop_last_partial``), every step takes 17 and the run ends."""
    from finetune.core.errors import ConfigError
    from finetune.engine import passes

    assert len(report.train.items) == 18
    seen, real = [], passes.train_forward
    monkeypatch.setattr(passes, "train_forward",
                        lambda model, x, amp, *masks: (seen.append(int(x.shape[0])), real(model, x, amp, *masks))[1])
    options = dict(epochs=1, freeze="none", bn="train", head_epochs=0, fast_head=False, augment="none")
    with pytest.raises(ConfigError, match=re.escape(
            "a BatchNorm layer cannot train on a batch of 1 image (layer4.0.bn1 gets one value per channel at 32x32 "
            "px under --bn train): start again with --batch-size 2 or more, or --bn eval")):
        fit(_model(), STAGES, DATA_CONFIG, report.train, report.val, _cfg(batch_size=1, **options), head="fc")
    assert seen == []                       # refused before the first step
    result = fit(_model(), STAGES, DATA_CONFIG, report.train, report.val, _cfg(batch_size=17, **options), head="fc")
    assert seen == [17] and [row["phase"] for row in result.history] == ["finetune"]


def test_fit_lets_the_kept_validation_batches_go_when_it_returns(report, monkeypatch):
    """A sweep runs many fits in one process: each fit's validation batches, kept in memory after its first
    pass (``finetune.data.replay``, up to 2 GiB or an eighth of the free GPU memory), go when the fit returns,
    not when a garbage collection finds its trainer (held in a reference cycle: the head guard calls back)."""
    import gc
    import weakref

    import finetune.data.replay as replay

    made: list = []
    real_init = replay.KeptPass.__init__
    monkeypatch.setattr(replay.KeptPass, "__init__", lambda self: (made.append(self), real_init(self))[1])
    refs: list = []

    def watch(_row: dict) -> None:
        if not refs:
            refs.extend(weakref.ref(t) for k in made for b in (k._batches or []) if b is not None for t in b)

    gc.collect()
    gc.disable()
    try:
        fit(_model(), STAGES, DATA_CONFIG, report.train, report.val, _cfg(freeze="none", head_epochs=0),
            head="fc", callbacks=[watch])
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert refs and alive == 0


@pytest.mark.parametrize("options", [dict(freeze="none", head_epochs=0),
                                     dict(freeze="none", head_epochs=1, fast_head=True, ema=0.9)])
def test_a_fits_trainer_and_its_setup_go_when_it_returns_without_a_garbage_collection(report, monkeypatch, options):
    """A sweep's trial drops its model after fit (``sweep.run._fit_split``), but the trainer held itself in a
    reference cycle (the head guard's callback, a bound method), and with it the setup: the model, the
    optimizer's state, the loaders, the cached features, until a garbage collection found them (GPU memory
    that Python's collector does not count, across many trials). Nothing of a fit outlives it but its result."""
    import gc
    import weakref

    import finetune.engine.trainer as trainer_module

    made: list = []
    real_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        made.append(weakref.ref(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    gc.collect()
    gc.disable()
    try:
        result = fit(_model(), STAGES, DATA_CONFIG, report.train, report.val, _cfg(epochs=3, **options), head="fc")
        alive = [ref() is not None for ref in made]
    finally:
        gc.enable()
    assert alive == [False] and result.history


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_val_rows_mark_an_unread_image_and_give_up_on_rows_they_cannot_match(rank, world):
    """helper-155: an evaluation's probabilities are this rank's images' rows (its strided shard of val under
    torchrun) in order, an image that failed to decode a row of NaN (before: no rows at all when one was
    missing); when the rows missing are not the failures listed (an image that failed in an earlier pass was
    read in this one), None rather than rows put against the wrong images."""
    from types import SimpleNamespace

    from finetune.core.distributed import DistInfo
    from finetune.engine.epoch_steps import LoaderSteps

    items = [(f"/d/{i}.png", 0) for i in range(7)]
    mine = items[rank::world]
    failed: dict[str, str] = {}
    steps = LoaderSteps.__new__(LoaderSteps)
    steps.s = SimpleNamespace(val_set=SimpleNamespace(items=items), classes=["a", "b"], failures=lambda: failed,
                              info=DistInfo(rank=rank, world_size=world, enabled=world > 1))
    rows = torch.rand(len(mine), 2).softmax(1)
    assert torch.equal(steps._val_rows([rows[:2], rows[2:]]), rows)
    failed[mine[1][0]] = "broken data stream"
    got = steps._val_rows([rows[:1], rows[2:]])
    assert got.shape == rows.shape and got[1].isnan().all()
    assert torch.equal(got[[0, *range(2, len(mine))]], rows[[0, *range(2, len(mine))]])
    failed[items[-1][0] if rank == 0 else items[-2][0]] = "gone, and back since"       # listed, read this pass
    assert steps._val_rows([rows[:1], rows[2:]]) is None
    assert steps._val_rows([]) is None and len(mine) > 2


def test_validation_probabilities_too_big_to_hold_on_every_rank_are_not_gathered(monkeypatch):
    """Session 36 (helper-157's review): at fit's end under torchrun every rank gathered every validation image's
    probabilities (8 ranks x 21k classes x 50,000 images: 4.4 GB of host memory a rank) for a file that needs a
    class and a probability an image. Beyond ``GATHER_PROBS_BYTES`` none is gathered (no collective: every rank
    decides it from the sizes alike) and report predicts again, as before helper-155."""
    from types import SimpleNamespace

    from finetune.core.distributed import DistInfo
    from finetune.engine import epoch_steps
    from finetune.engine.epoch_steps import LoaderSteps

    def collective(*args, **kwargs):
        raise AssertionError("no collective for a table beyond the budget")

    monkeypatch.setattr(epoch_steps.ddp, "all_true", collective)
    monkeypatch.setattr(epoch_steps, "GATHER_PROBS_BYTES", 7 * 2 * 4 - 1)
    steps = LoaderSteps.__new__(LoaderSteps)
    steps.s = SimpleNamespace(val_set=SimpleNamespace(items=[(f"/d/{i}.png", 0) for i in range(7)]), classes=["a", "b"],
                              info=DistInfo(rank=0, world_size=2, enabled=True), device=torch.device("cpu"))
    assert steps.all_val_probs(torch.rand(4, 2)) is None
    monkeypatch.setattr(epoch_steps, "GATHER_PROBS_BYTES", 7 * 2 * 4)
    with pytest.raises(AssertionError, match="no collective"):      # within it: gathered as before
        steps.all_val_probs(torch.rand(4, 2))
