"""DDP: a 2-process torchrun (gloo, CPU) run equals a single-process run up to float noise."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
import torch

from finetune.core import distributed as ddp, lastwords
from finetune.core.checkpoint import BEST, load_weights
from finetune.core.errors import ConfigError, FinetuneError
from tests.conftest import make_image_folder
from tests.finetune.test_train import cfg, run, tiny_model

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def ddp_cfg():
    # Augmentation on (each image's draws come from (seed, epoch, its index): the same on any number of
    # ranks); the only difference left between 1 and 2 processes is summation order.
    return cfg(epochs=2, freeze="none", head_epochs=1, batch_size=8, lr=1e-2)


def _torchrun_fit(tmp_path: Path, train, val, body: str, timeout: float = 240) -> str:
    """Run ``body`` under ``torchrun --nproc-per-node 2`` (gloo, CPU) with the ImageSets ``train`` and ``val``
    loaded under those names and the repository importable; asserts that the job succeeded within ``timeout``
    seconds, and returns its output. A rank still running then ends itself with its stack on the output (a
    rank blocked in a collective holds the test no longer than that)."""
    sets_file = tmp_path / "sets.json"
    sets_file.write_text(json.dumps({"train": train.items, "val": val.items, "classes": train.classes}))
    script = tmp_path / "torchrun_fit.py"
    script.write_text(textwrap.dedent(f"""
        import faulthandler, json, sys
        faulthandler.dump_traceback_later({timeout}, exit=True)
        sys.path.insert(0, {str(ROOT)!r})
        from finetune.data import ImageSet
        d = json.load(open({str(sets_file)!r}))
        train = ImageSet([tuple(i) for i in d["train"]], d["classes"])
        val = ImageSet([tuple(i) for i in d["val"]], d["classes"])
    """) + textwrap.dedent(body) + textwrap.dedent("""
        # leave the group together, as `zoo finetune` does (ddp.barrier before ddp.cleanup): a rank that destroys
        # it while the other still finishes the last collective makes that one abort in gloo
        import gc, os
        from finetune.core import distributed as _ddp
        gc.collect()   # the DDP wrapper's reducer (cyclic garbage) is freed now, not in the interpreter's teardown:
        _info = _ddp.setup("cpu")      # a gloo group freed there can abort the process ('terminate called
        _ddp.barrier(_info)            # without an active exception', pytorch/pytorch#179291); and the teardown
        _ddp.cleanup(_info)            # is skipped, as zoo's CLI skips its final collection
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = tmp_path / "torchrun.log"       # a file, not a pipe: a rank left behind would hold a pipe open
    with open(log, "w") as fh:
        proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script)], cwd=ROOT,
                              env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout + 60)
    out = log.read_text()
    assert "Timeout (" not in out, f"a rank was still running after {timeout} s (hung?):\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    return out


def test_global_batch_is_split_across_ranks():
    assert ddp.per_rank_batch(32, ddp.DistInfo(rank=1, world_size=4, enabled=True)) == 8
    assert ddp.per_rank_batch(32, ddp.DistInfo()) == 32
    with pytest.raises(ConfigError, match="use 8 or 10"):
        ddp.per_rank_batch(9, ddp.DistInfo(world_size=2, enabled=True))


def test_what_torchrun_refuses_is_refused_before_the_run_folder_is_written():
    """QA: an odd --batch-size under torchrun was refused by the loaders, after the run folder held scan.json
    and model.json but no config.yaml: the corrected command was told the folder holds a run (continue it with
    --resume), and --resume that it is not a run folder. (--sampler balanced, refused too then, runs under
    torchrun since session 19.)"""
    from finetune.core.config import FinetuneConfig
    from finetune.engine import check_machine

    two = ddp.DistInfo(rank=1, world_size=2, enabled=True)
    with pytest.raises(ConfigError, match="must divide by the 2 processes: use 6 or 8"):
        check_machine(FinetuneConfig(device="cpu", batch_size=7), two)
    check_machine(FinetuneConfig(device="cpu", batch_size=8, sampler="balanced"), two)    # the ranks share one draw
    check_machine(FinetuneConfig(device="cpu", batch_size=7, sampler="balanced"), ddp.DistInfo())


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = ddp.setup("cpu")
    assert not info.enabled and info.is_main and info.world_size == 1


@pytest.mark.parametrize("gpus,local_rank,said", [
    (0, 0, "no CUDA device is visible here; use --device cpu"),
    (2, 3, "local rank 3, but this machine shows 2 CUDA device(s) and each process trains on its own GPU: "
           "use --nproc-per-node 2 or fewer")])
def test_nccl_without_a_gpu_for_this_rank_is_one_line(monkeypatch, gpus, local_rank, said):
    """torchrun --device cuda on a machine without a GPU, or more processes per machine than GPUs: each rank
    met torch.cuda.set_device's RuntimeError (a traceback per rank, before any of zoo's checks). It is a
    ConfigError now, before set_device or the process group (the CUDA case is forced on this CPU)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    def never(*args, **kwargs):
        raise AssertionError("reached past the check")

    monkeypatch.setattr(torch.cuda, "set_device", never)
    monkeypatch.setattr(dist, "init_process_group", never)
    with pytest.raises(ConfigError) as err:
        ddp.setup("cuda")
    assert said in str(err.value)


@pytest.mark.parametrize("device,gpus,backend", [
    ("cpu", 2, "gloo"), (" CPU ", 2, "gloo"), ("cpu:0", 2, "gloo"), ("mps", 2, "gloo"),
    ("auto", 2, "nccl"), ("auto", 0, "gloo"), ("", 2, "nccl"), (None, 0, "gloo"),
    ("cuda", 2, "nccl"), (" CUDA ", 2, "nccl"), ("cuda:0", 2, "nccl")])
def test_setup_picks_the_backend_from_the_configured_device(monkeypatch, device, gpus, backend):
    """Review of the refactor that let ddp.setup read ``config.device`` itself (ddp.device_type went): a run
    configured for the CPU on a machine with GPUs joins a gloo group, unpinned; cuda (any spelling, any index)
    or auto with a GPU visible joins nccl with this process pinned to cuda:LOCAL_RANK (the CUDA case is forced
    on this CPU)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    calls: list = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("pinned", i)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = ddp.setup(device)
    pinned = [("pinned", 1)] if backend == "nccl" else []
    assert calls == [*pinned, (backend, {"init_method": "env://"})]
    assert (info.enabled, info.rank, info.world_size, info.local_rank) == (True, 1, 2, 1)


@pytest.mark.parametrize("backend,current,pinned", [("nccl", 0, [1]), ("nccl", 1, []), ("gloo", 0, [])])
def test_setup_pins_this_ranks_gpu_in_a_group_the_caller_joined(monkeypatch, backend, current, pinned):
    """Multi-GPU audit (helper-89): ``fit`` under torchrun in a script that joined an NCCL group itself, without
    torch.cuda.set_device: ddp.setup left the group as it found it, so every rank's object collectives and
    gather_strided took cuda:0 (NCCL: "Duplicate GPU detected") while its model sat on cuda:LOCAL_RANK. It pins
    cuda:LOCAL_RANK now, as for a group it joins itself (a gloo group, or a GPU already pinned: untouched; the
    CUDA answers are forced on this CPU)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    calls: list = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    info = ddp.setup("cuda")
    assert calls == pinned
    assert (info.enabled, info.rank, info.local_rank) == (True, 1, 1)


def test_gather_strided_moves_a_bounded_block_per_collective(monkeypatch):
    """Multi-GPU audit (helper-89): under NCCL gather_strided's rows travel through each rank's GPU, and a feature
    bank went in one collective (the whole bank received on every GPU, and copied again into the parts: 16 GB and
    more for 1M images x 2 views of 2,048 features, an out-of-memory where one process keeps the bank on the
    host). Now at most GATHER_BYTES per collective, the rows assembled as before: rank 0 of 2 here, with 9 items
    (rank 1 holds 4: its last block is padding), the other rank's rows made up by the stand-in collective."""
    import torch.distributed as dist

    info = ddp.DistInfo(rank=0, world_size=2, enabled=True)
    n, tail = 9, (2, 3)
    mine = torch.arange(5 * 6, dtype=torch.float32).reshape(5, *tail)          # items 0, 2, 4, 6, 8
    sizes: list[int] = []

    def all_gather(parts, tensor):
        sizes.append(sum(p.numel() * p.element_size() for p in parts))
        parts[0].copy_(tensor)
        parts[1].copy_(tensor + 1000)         # rank 1's rows: items 1, 3, 5, 7 (its 5th row is padding)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(ddp, "gather_objects", lambda obj, info: [obj, obj])
    row = 6 * 4
    monkeypatch.setattr(ddp, "GATHER_BYTES", 2 * row * 2, raising=False)     # two rows of each rank per collective
    out = ddp.gather_strided(mine, n, info)
    assert torch.equal(out[0::2], mine) and torch.equal(out[1::2], mine[:4] + 1000)
    assert sizes and max(sizes) <= ddp.GATHER_BYTES and len(sizes) == 3


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_match_single_process(tmp_path):
    from finetune.data import scan_folder

    # 24 training images (divisible by 2 ranks and by the batch of 8), 9 validation images (uneven shards).
    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split"))
    assert len(report.train) == 24 and len(report.val) == 9
    _torchrun_fit(tmp_path, report.train, report.val, f"""
        from tests.finetune.test_distributed import ddp_cfg
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        from finetune.tools.train import fit
        from finetune.core import distributed
        import finetune.engine.epoch_steps as epoch_steps
        epoch_steps.warms_up = lambda device: True      # CUDA's warm-up, under DDP: it must change nothing
        result = fit(tiny_model(drop_rate=0.3), STAGES, DATA_CONFIG, train, val, ddp_cfg(), head="fc",
                     run_dir={str(tmp_path / "ddp")!r})
        info = distributed.setup("cpu")
        assert info.world_size == 2, info
        if info.is_main:
            json.dump(result.history, open({str(tmp_path / "history.json")!r}, "w"))
    """)

    # with dropout before the classifier: its masks are drawn for the global batch (engine.drops.SharedDropout)
    single = run((report.train, report.val), ddp_cfg(), run_dir=tmp_path / "single", model=tiny_model(drop_rate=0.3))
    ddp_history = json.loads((tmp_path / "history.json").read_text())
    assert [r["phase"] for r in ddp_history] == ["head", "finetune"]
    for a, b in zip(ddp_history, single.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    ddp_best = load_weights(tmp_path / "ddp" / BEST)
    one_best = load_weights(tmp_path / "single" / BEST)
    assert ddp_best.keys() == one_best.keys()
    for k in one_best:
        assert torch.allclose(ddp_best[k].double(), one_best[k].double(), atol=1e-5), k
    # only rank 0 wrote the run folder
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["metrics"]["images"] == 9
    # the head guard counts each rank's validation images and sums them: the same decision as one process
    one = json.loads((tmp_path / "single" / "summary.json").read_text())["head_guard"]
    two = summary["head_guard"]
    assert one is not None
    for key in ("value", "loss_gain"):                  # float sums over images: equal up to rounding
        assert two.pop(key, None) == pytest.approx(one.pop(key, None), abs=1e-5), key
    assert two.pop("p_loss") == pytest.approx(one.pop("p_loss"), abs=0.01)    # the same draws on those
    assert two == one


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_every_rank_validates_with_rank_0s_batchnorm_statistics(tmp_path):
    """Multi-GPU audit (helper-89): DDP copies rank 0's buffers into every rank before each training forward only,
    so after an epoch's last step each rank's BatchNorm running statistics (--bn train) were its own: each rank
    validated its shard, and the weight average (--ema) its own copy of them, with statistics that were not those
    of the weights rank 0 saves, and the epoch's val loss/acc and the head guard mixed the two. Each rank now
    holds rank 0's buffers, the model's and the average's, whenever it validates (checked at every evaluation)."""
    from finetune.data import scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split"))
    _torchrun_fit(tmp_path, report.train, report.val, f"""
        import torch
        from tests.finetune.test_distributed import ddp_cfg
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        from finetune.tools.train import fit
        from finetune.core import distributed
        import finetune.engine.epoch_steps as epoch_steps
        seen = []
        real = epoch_steps.LoaderSteps.evaluate
        def checked(self, full=False):
            nets = {{"model": self.s.model, **({{"ema": self.ema.module}} if self.ema is not None else {{}})}}
            mine = {{name: [b.detach().cpu().clone() for b in net.buffers()] for name, net in nets.items()}}
            ranks = distributed.gather_objects(mine, self.s.info)
            seen.append({{name: all(torch.equal(a, b) for other in ranks for a, b in zip(other[name], mine[name]))
                         for name in mine}})
            return real(self, full)
        epoch_steps.LoaderSteps.evaluate = checked
        fit(tiny_model(), STAGES, DATA_CONFIG, train, val, ddp_cfg().replace(bn="train", head_epochs=0, ema=0.5),
            head="fc")
        if distributed.setup("cpu").is_main:
            json.dump(seen, open({str(tmp_path / "seen.json")!r}, "w"))
    """)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert len(seen) >= 2 and all("ema" in s for s in seen), seen
    assert all(all(s.values()) for s in seen), seen


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_drop_the_mirror_as_one_process(tmp_path):
    """--hflip auto under torchrun: rank 0's handedness test decides for every rank (the bank is gathered
    on each), so handed images train without flips on 2 processes as on one, to the same weights. The
    flip is the only random augmentation left (crop and jitter off), so a rank that kept it would differ."""
    from finetune.tools.train import fit
    from tests.finetune.test_features import DATA_CONFIG, _config, _halves, _Halves

    train, val = _halves(tmp_path / "d", per_class=12)     # 24 training images: 3 batches of 8 on 2 ranks
    options = dict(head_solver="lbfgs", epochs=2, freeze="none", lr=1e-3, batch_size=8, crop_scale_min=1.0,
                   brightness=0.0, contrast=0.0)
    _torchrun_fit(tmp_path, train, val, f"""
        import os
        from finetune.tools.train import fit
        from finetune.tools.features import FeatureCache
        from tests.finetune.test_features import DATA_CONFIG, _config, _Halves
        # two machines of one process each: each is its machine's first (LOCAL_RANK 0) with a cache of its own
        os.environ["LOCAL_RANK"] = "0"
        cache = FeatureCache({str(tmp_path)!r} + "/cache-rank" + os.environ["RANK"])
        fit(_Halves(), [["features"]], DATA_CONFIG, train, val, _config(**{options!r}), head="fc",
            run_dir={str(tmp_path / "ddp")!r}, feature_cache=cache)
    """)
    # every machine's cache got the gathered features, so that a re-run hits on every rank (only rank 0's did)
    saved = [sorted(p.name for p in (tmp_path / f"cache-rank{r}").iterdir()) for r in (0, 1)]
    assert saved[0] and saved[0] == saved[1]
    fit(_Halves(), [["features"]], DATA_CONFIG, train, val, _config(**options), head="fc",
        run_dir=tmp_path / "one")
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["mirror"]["dropped"] is True
    assert two["mirror"] == one["mirror"]
    # the default departure from the solved head (LR warm-up, EMA over one epoch of 3 steps) on both
    saved = [yaml.safe_load((tmp_path / run / "config.yaml").read_text()) for run in ("one", "ddp")]
    assert [(c["warmup_epochs"], c["ema"]) for c in saved] == [(1.0, pytest.approx(2 / 3))] * 2
    assert two["best_epoch"] == one["best_epoch"]
    assert two["metrics"]["val_acc"] == one["metrics"]["val_acc"]
    rows = [list(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("one", "ddp")]
    assert [r["phase"] for r in rows[0]] == ["head", "finetune"]
    for a, b in zip(*rows):      # the finetune epoch's training loss: a flipping rank would raise it
        for key in ("train_loss", "train_acc", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key
    a, b = load_weights(tmp_path / "ddp" / BEST), load_weights(tmp_path / "one" / BEST)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_take_the_steps_of_one_process_on_an_odd_set(tmp_path):
    """QA: each rank decided on its own shard whether to drop its last partial batch: 63 training images at
    batch 4 took 16 steps an epoch on 2 processes (32 padded images a rank, no remainder) and 15 in one (3
    left over, under 5%: dropped), so the two trained other batches to other weights."""
    from finetune.data import scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=21, val_per_class=2, layout="split"))
    config = ddp_cfg().replace(epochs=1, head_epochs=0, batch_size=4)
    _torchrun_fit(tmp_path, report.train, report.val, f"""
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        fit(tiny_model(), STAGES, DATA_CONFIG, train, val, FinetuneConfig.from_dict({config.to_dict()!r}),
            head="fc", run_dir={str(tmp_path / "ddp")!r})
    """)
    single = run((report.train, report.val), config, run_dir=tmp_path / "one")
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert len(rows) == len(single.history) == 1
    for key in ("train_loss", "train_acc", "val_loss"):      # over the same 60 images (15 steps of 4)
        assert float(rows[0][key]) == pytest.approx(single.history[0][key], abs=1e-5), key
    a, b = load_weights(tmp_path / "ddp" / BEST), load_weights(tmp_path / "one" / BEST)
    assert all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)


_ONE_PASS = """
    # one pass of a training loader, forward only (a linear model: no BatchNorm, so batches of 2 or 4 give the
    # same per-image losses), over 11 images at 2 a rank: DistributedSampler pads them to 12
    import torch
    from finetune.core import distributed
    from finetune.data import ImageDataset, build_transform, train_share, make_loader, set_loader_epoch
    from finetune.engine.steps import train_one_epoch
    from tests.finetune.test_train import DATA_CONFIG

    def one_pass(train, info):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
        loader = make_loader(ImageDataset(train, build_transform(DATA_CONFIG, False)), 4 // info.world_size,
                             train=True, workers=0, world_size=info.world_size, rank=info.rank)
        set_loader_epoch(loader, 0, 1, info.rank)
        return train_one_epoch(model, loader, None, None, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                               info=info, share=train_share(loader))
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_train_metrics_count_each_image_once_not_the_padding_copies(tmp_path):
    """QA (session 21): under torchrun DistributedSampler pads the training order with copies so that every
    rank takes the same steps (11 images on 2 ranks: 12); the train loss and accuracy of metrics.csv counted
    the copies. They still train (the gradients see what they saw), but the metrics count each image once, as
    validation's unpadded shards do: an epoch's images are 11, and a forward-only pass gives the loss and
    accuracy of one process over the same 11 images."""
    from finetune.data import scan_folder
    from finetune.core.distributed import DistInfo

    report = scan_folder(make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4,
                                           val_per_class=1, layout="split"))
    train = report.train.__class__(report.train.items[:11], report.train.classes)
    assert len(train) == 11
    _torchrun_fit(tmp_path, train, report.val, textwrap.dedent(_ONE_PASS) + textwrap.dedent(f"""
        import finetune.engine.epoch_steps as epoch_steps
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, cfg, tiny_model
        images, real = [], epoch_steps.train_one_epoch
        epoch_steps.train_one_epoch = lambda *a, **k: (lambda out: (images.append(out["images"]), out)[1])(real(*a, **k))
        fit(tiny_model(), STAGES, DATA_CONFIG, train, val, cfg(epochs=2, batch_size=4, freeze="none"), head="fc")
        info = distributed.setup("cpu")
        out = one_pass(train, info)
        if info.is_main:
            json.dump({{"fit": images, "pass": out}}, open({str(tmp_path / "two.json")!r}, "w"))
    """))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["fit"] == [11, 11]                    # both epochs: 12 with the padding copy
    namespace: dict = {}
    exec(textwrap.dedent(_ONE_PASS), namespace)
    one = namespace["one_pass"](train, DistInfo())
    assert two["pass"]["images"] == one["images"] == 11
    assert two["pass"]["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert two["pass"]["acc"] == pytest.approx(one["acc"], abs=1e-9)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
@pytest.mark.parametrize("option", [{"class_weights": "auto"}, {"sampler": "balanced"}])
def test_torchrun_two_processes_weigh_the_classes_as_one_process(tmp_path, option):
    """QA (session 18): with --class-weights auto each rank's loss was torch's weighted mean over its own
    half of the batch, and DDP averaged the two means: the rare class weighed otherwise than in one process
    (Lite0, imbalanced digits: first epoch's train loss 0.3682 vs 0.3661, best epoch 5 vs 6). Each rank now
    divides by the whole batch's class weight; the validation loss is the weighted mean over the whole set.
    Session 19: --sampler balanced, refused under torchrun before, shares one draw between the ranks."""
    from finetune.data import ImageSet, scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=20, val_per_class=3, layout="split"))
    classes = report.train.classes
    kept = [item for item in report.train.items if item[1] != 1 or item[0].endswith(("_000.png", "_001.png",
                                                                                      "_002.png", "_003.png"))]
    train = ImageSet(kept, classes)                  # 20 + 4 + 20 images: the middle class is rare
    config = ddp_cfg().replace(epochs=1, head_epochs=0, batch_size=4, **option)
    _torchrun_fit(tmp_path, train, report.val, f"""
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        fit(tiny_model(), STAGES, DATA_CONFIG, train, val, FinetuneConfig.from_dict({config.to_dict()!r}),
            head="fc", run_dir={str(tmp_path / "ddp")!r})
    """)
    single = run((train, report.val), config, run_dir=tmp_path / "one")
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    for key in ("train_loss", "train_acc", "val_loss"):
        assert float(rows[0][key]) == pytest.approx(single.history[0][key], abs=1e-5), key
    a, b = load_weights(tmp_path / "ddp" / BEST), load_weights(tmp_path / "one" / BEST)
    assert all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_mix_the_pairs_of_one_process(tmp_path):
    """Session 31: --mixup/--cutmix paired each image with the batch reversed, so a rank paired within its own
    shard (rank r holds global positions r, r + 2, ...) and trained on other mixed images than one process
    (epoch 1's train loss, mixup: 1.12154 on 2 processes, 1.11584 in one; CutMix's epoch 3: 1.08602 / 1.09748,
    train accuracy 41.7 / 37.5%). The partner is now the image half a batch away, on the same rank whenever the
    per-rank batch is even (engine.mixing.partner): the same pairs, the same run. Both kinds: mixup alone,
    CutMix alone (each step's kind, lambda and box were already shared)."""
    from finetune.data import scan_folder

    # 24 training images at batch 8: 4 a rank, 3 steps an epoch; a head epoch (through the network) + 2 more
    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split"))
    options = {"mixup": dict(mixup=0.4), "cutmix": dict(cutmix=1.0)}
    configs = {name: ddp_cfg().replace(epochs=3, **kw) for name, kw in options.items()}
    _torchrun_fit(tmp_path, report.train, report.val, f"""
        from finetune.core import distributed
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        histories = {{name: fit(tiny_model(), STAGES, DATA_CONFIG, train, val, FinetuneConfig.from_dict(config),
                               head="fc").history
                     for name, config in {({k: c.to_dict() for k, c in configs.items()})!r}.items()}}
        if distributed.setup("cpu").is_main:
            json.dump(histories, open({str(tmp_path / "histories.json")!r}, "w"))
    """)
    two = json.loads((tmp_path / "histories.json").read_text())
    for name, config in configs.items():
        one = run((report.train, report.val), config).history
        assert [r["phase"] for r in two[name]] == [r["phase"] for r in one] == ["head", "finetune", "finetune"]
        for epoch, (a, b) in enumerate(zip(two[name], one), 1):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (name, epoch, key)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_torchrun_cached_head_takes_the_steps_its_schedule_counts(tmp_path, sampler):
    """QA (session 19): the cached head iterated the one-process order while the LR schedule counted the
    loaders' steps, which drop a last partial batch that would leave a rank one image: 18 images at batch 8
    took 3 steps an epoch against a schedule of 2 (`zoo finetune --freeze head --head-solver gradient` on 2
    processes, 34 images: epoch 2 at LR 0.00063 instead of 0.00075). The head now takes the loaders' steps."""
    from tests.finetune.test_features import _config, _fit, _model, _sets

    train, val = _sets(tmp_path / "d")           # 18 training images: 2 left over at batch 8
    options = dict(epochs=3, patience=5, batch_size=8, sampler=sampler)
    _torchrun_fit(tmp_path, train, val, f"""
        from tests.finetune.test_features import _config, _fit, _model
        _fit(_model(), train, val, _config(**{options!r}), run_dir={str(tmp_path / "ddp")!r})
    """)
    _fit(_model(), train, val, _config(**options), run_dir=tmp_path / "one")
    rows = [list(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("one", "ddp")]
    assert [r["phase"] for r in rows[1]] == ["head"] * 3
    assert [r["lr"] for r in rows[1]] == [r["lr"] for r in rows[0]]     # cosine, at each epoch's start


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_cache_the_augmented_views_of_one_process(tmp_path):
    """QA: with --aug-views each rank drew its shard's views from one random stream of its own, so the bank
    (and the head solved on it) differed from one process's: `zoo finetune --freeze head --aug-views 2` on
    60 digits, val acc 0.525 on 2 processes against 0.35 on one. Each image's views are now its own draws."""
    from tests.finetune.test_features import _config, _fit, _model, _sets

    train, val = _sets(tmp_path / "d")           # 18 training images: 9 per rank
    options = dict(epochs=2, aug_views=2, crop_scale_min=0.5, head_solver="lbfgs", batch_size=6)
    _torchrun_fit(tmp_path, train, val, f"""
        from tests.finetune.test_features import _config, _fit, _model
        _fit(_model(), train, val, _config(**{options!r}), run_dir={str(tmp_path / "ddp")!r})
    """)
    _fit(_model(), train, val, _config(**options), run_dir=tmp_path / "one")
    a, b = load_weights(tmp_path / "ddp" / BEST), load_weights(tmp_path / "one" / BEST)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)
    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "ddp"))
    assert two["world_size"] == 2 and two["metrics"]["val_acc"] == one["metrics"]["val_acc"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_cached_head_extracts_features_in_each_ranks_training_passes(tmp_path, monkeypatch):
    """helper-107: the cached head's feature pass took min(--micro-batch, --batch-size) images at once on each rank,
    the global batch (8 here on 2 ranks), where training forwards its share (4): a rank needed more memory for the
    features than for a step, and the out-of-memory line named the training pass. It takes the training pass
    (``Setup.pass_images``); the features gathered are one process's (up to float order)."""
    from tests.finetune.test_features import _config, _fit, _model, _sets
    import finetune.tools.features.head as head_module

    train, val = _sets(tmp_path / "d")           # 18 training images, 6 validation
    options = dict(epochs=1, batch_size=8, head_solver="lbfgs")
    _torchrun_fit(tmp_path, train, val, f"""
        import torch
        from tests.finetune.test_features import _config, _fit, _model
        import finetune.tools.features.head as head_module
        from finetune.core import distributed
        rank = distributed.setup("cpu").rank
        real, real_gather, sizes, banks = head_module._extract, head_module._gather_bank, [], []
        def extract(model, head, dataset, batch_size, *args, **kwargs):
            sizes.append(batch_size)
            return real(model, head, dataset, batch_size, *args, **kwargs)
        def gather(*args):
            banks.append(real_gather(*args))
            return banks[-1]
        head_module._extract, head_module._gather_bank = extract, gather
        _fit(_model(), train, val, _config(**{options!r}))
        json.dump(sizes, open({str(tmp_path)!r} + f"/sizes{{rank}}.json", "w"))
        torch.save([b.features for b in banks], {str(tmp_path)!r} + f"/banks{{rank}}.pt")
    """)
    assert [json.loads((tmp_path / f"sizes{rank}.json").read_text()) for rank in (0, 1)] == [[4, 4], [4, 4]]
    real_gather, banks = head_module._gather_bank, []
    monkeypatch.setattr(head_module, "_gather_bank", lambda *args: banks.append(real_gather(*args)) or banks[-1])
    _fit(_model(), train, val, _config(**options))
    for rank in (0, 1):      # train's bank, then val's, on every rank
        ddp_banks = torch.load(tmp_path / f"banks{rank}.pt")
        assert [b.shape for b in ddp_banks] == [b.features.shape for b in banks]
        assert all(torch.allclose(a, b.features, atol=1e-5) for a, b in zip(ddp_banks, banks))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_ranks_load_cached_features_only_when_every_rank_holds_the_same_bank(tmp_path):
    """Multi-GPU audit (helper-89): a head on cached features under torchrun on machines that each cached the bank
    of their own (earlier runs on each, other GPUs or precisions: the same key, other last bits) loaded each
    machine's: each rank solved and judged the head on its own features, and early stopping on its own numbers could
    send the ranks different ways. The banks' recorded sha256 are compared now: any difference, and every rank
    extracts its shard again (rank 1's machine holds another bank here, made up by a stand-in load)."""
    from tests.finetune.test_features import _sets

    train, val = _sets(tmp_path / "d")
    _torchrun_fit(tmp_path, train, val, f"""
        import torch
        from tests.finetune.test_features import _config, _fit, _model
        from finetune.core import distributed
        from finetune.tools.features.cache import FeatureBank, FeatureCache
        import finetune.tools.features.head as head_module
        info = distributed.setup("cpu")
        cache = {str(tmp_path / "cache")!r}
        _fit(_model(), train, val, _config(epochs=1, batch_size=6), cache_dir=cache)   # the bank, by local rank 0
        real_load, real_begin, seen = FeatureCache.load, head_module.CachedHeadSteps.begin_phase, []
        def load(self, key):
            bank = real_load(self, key)
            if bank is None or info.rank == 0:
                return bank
            other = FeatureBank(bank.features + 0.01, bank.labels, bank.feature_shape)
            other.digest = "another machine's bank"
            return other
        def begin_phase(self, phase):
            real_begin(self, phase)
            mine = self.train_feats.cpu()
            seen.append(all(torch.equal(mine, theirs) for theirs in distributed.gather_objects(mine, info)))
        FeatureCache.load, head_module.CachedHeadSteps.begin_phase = load, begin_phase
        _fit(_model(), train, val, _config(epochs=1, batch_size=6), cache_dir=cache)
        if info.is_main:
            json.dump(seen, open({str(tmp_path / "seen.json")!r}, "w"))
    """)
    assert json.loads((tmp_path / "seen.json").read_text()) == [True]


# (first run's hflip, second run's, what the second says where every rank reuses, the views of its bank)
_REUSED = {"plain_for_mirrored": (0.0, 0.5, "features: train 18 images x 1 view(s)", 2),
           "mirrored_for_plain": (0.5, 0.0, "features: train loaded from cache (1 view(s), 18 images, the plain view "
                                  "of the mirrored bank)", 1)}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
@pytest.mark.parametrize("case", list(_REUSED))
def test_torchrun_ranks_reuse_a_cached_bank_of_the_other_view_all_or_none(tmp_path, case):
    """A training bank built from the cached bank of the other flip setting, on every rank or none. helper-151
    (plain_for_mirrored): a mirrored bank whose plain view is cached (a --hflip 0 run's) forwards only the mirror on
    every rank, the shards gathered and joined to the plain bank. helper-154 (mirrored_for_plain): a plain bank
    (a --hflip 0 run's, zoo doctor's) whose mirrored bank is cached (a default run's) is its view 0. Where one
    rank's machine lacks the cached bank (a stand-in load), every rank forwards the whole bank: one branch for
    all, no rank left waiting."""
    from tests.finetune.test_features import _sets

    first, second, reused_line, views = _REUSED[case]
    train, val = _sets(tmp_path / "d")
    _torchrun_fit(tmp_path, train, val, f"""
        import torch
        from tests.finetune.test_features import _config, _fit, _model
        from finetune.core import distributed
        from finetune.tools.features.cache import FeatureCache
        import finetune.tools.features.head as head_module
        info = distributed.setup("cpu")
        real_load, real_begin, seen = FeatureCache.load, head_module.CachedHeadSteps.begin_phase, []
        def begin_phase(self, phase):
            real_begin(self, phase)
            seen.append(self.train_feats.cpu())
        head_module.CachedHeadSteps.begin_phase = begin_phase
        lines = []
        for cache, lacking in (("a", False), ("b", True)):
            cache = {str(tmp_path)!r} + "/" + cache
            options = dict(epochs=1, batch_size=6, head_solver="lbfgs", augment="standard")
            _fit(_model(), train, val, _config(hflip={first}, **options), cache_dir=cache)
            if lacking:      # rank 1's machine holds no training bank
                FeatureCache.load = lambda self, key: (None if info.rank == 1 and key.startswith("train")
                                                       else real_load(self, key))
            said = []
            _fit(_model(), train, val, _config(hflip={second}, **options), cache_dir=cache, log=said.append)
            lines.append([m.split(" computed")[0] for m in said if m.startswith("features: train")])
        torch.save(seen[1::2], {str(tmp_path)!r} + f"/banks{{info.rank}}.pt")
        json.dump(lines, open({str(tmp_path)!r} + f"/lines{{info.rank}}.json", "w"))
    """)
    said = json.loads((tmp_path / "lines0.json").read_text())      # (rank 0 speaks)
    assert said == [[reused_line], [f"features: train 18 images x {views} view(s)"]]
    banks = [torch.load(tmp_path / f"banks{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(b, c) for b, c in zip(banks[0], banks[1]))     # every rank holds the same banks
    reused, computed = banks[0]
    assert reused.shape == computed.shape == (views, 18, 8) and torch.allclose(reused, computed, atol=1e-5)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
@pytest.mark.parametrize("decode", ["workers", "device"])
def test_torchrun_goes_on_when_every_image_of_one_ranks_batch_fails(tmp_path, decode):
    """CUDA audit: when every image of one rank's batch failed to decode (damaged after the scan), that rank
    skipped the step while the other waited in DDP's gradient all-reduce: the job hung for good (with
    --decode device the prefetcher dropped the batch, so that rank also took one step fewer). Now it takes
    the step on a zero-weight batch and both ranks end with the same weights; rank 1's whole validation
    shard failing is fine too, and rank 0 reports every rank's failures once (rank 1's were never said); the
    result's validation probabilities are every image's, rank 1's shard's rows NaN (helper-155)."""
    from finetune.data import ImageDataset, scan_folder
    from finetune.data.loaders import set_epoch_order, train_batches

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split"))
    config = ddp_cfg().replace(epochs=1, head_epochs=0, decode=decode)
    order = train_batches(ImageDataset(report.train), 4, seed=config.seed, world_size=2, rank=1)
    set_epoch_order(order.sampler, config.seed, 1)
    damaged = [report.train.items[i][0] for i, _seed in next(iter(order))]      # rank 1's first batch
    damaged += [path for path, _ in report.val.items[1::2]]                         # rank 1's validation shard
    for path in damaged:
        Path(path).write_bytes(b"not an image")
    out = _torchrun_fit(tmp_path, report.train, report.val, f"""
        import torch
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        from finetune.core import distributed
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        info = distributed.setup("cpu")
        config = FinetuneConfig.from_dict({config.to_dict()!r})
        result = fit(tiny_model(), STAGES, DATA_CONFIG, train, val, config, head="fc",
                     run_dir={str(tmp_path / "ddp")!r}, log=lambda line: print(f"rank {{info.rank}}: {{line}}"))
        torch.save(result.model.state_dict(), {str(tmp_path)!r} + f"/rank{{info.rank}}.pt")
        torch.save(result.val_probs, {str(tmp_path)!r} + f"/probs{{info.rank}}.pt")
    """, timeout=120)     # ~8 s on the loaded 2-core machine; a hang is what the bound is for
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])     # the ranks stayed in step
    # helper-155: every image's probabilities on every rank, in val_set order, rank 1's unread shard rows of NaN
    for r in (0, 1):
        probs = torch.load(tmp_path / f"probs{r}.pt", weights_only=True)
        assert probs.shape == (len(report.val.items), len(report.classes))
        assert probs[1::2].isnan().all() and not probs[0::2].isnan().any()
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["metrics"]["images"] == 5       # rank 0's validation shard
    warnings = [line for line in out.splitlines() if "failed to load during training" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"rank 0: warning: {len(damaged)} image(s) failed"), out
    listed = (tmp_path / "ddp" / "bad_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(damaged)


def test_sync_bn_needs_gpus_under_torchrun():
    """torch's SyncBatchNorm has no CPU kernel: asked for on several CPU processes, --sync-bn is refused before
    the run writes anything; in one process it has nothing to synchronise and is accepted anywhere."""
    from finetune.core.config import FinetuneConfig
    from finetune.engine import check_machine

    two = ddp.DistInfo(rank=0, world_size=2, enabled=True)
    with pytest.raises(ConfigError, match="--sync-bn needs GPUs"):
        check_machine(FinetuneConfig(device="cpu", batch_size=8, bn="train", sync_bn=True), two)
    check_machine(FinetuneConfig(device="cpu", batch_size=8, bn="train", sync_bn=True), ddp.DistInfo())



def test_sync_bn_with_micro_batches_is_refused_before_any_work(monkeypatch):
    """helper-104: SyncBatchNorm gathers each forward pass's statistics from every process, so with --micro-batch a
    rank that lost images to decoding (fewer passes) or stands in for a failed batch (one pass) would hang the job
    in a collective the others never join: refused before the run writes anything; one process takes both."""
    from finetune.core.config import FinetuneConfig
    from finetune.engine import check_machine, runtime

    monkeypatch.setattr(runtime, "resolve_device", lambda device, info=None: torch.device("cuda", 0))
    two = ddp.DistInfo(rank=0, world_size=2, enabled=True)
    config = FinetuneConfig(device="cuda", batch_size=8, bn="train", sync_bn=True)
    check_machine(config, two)
    with pytest.raises(ConfigError, match="--sync-bn and --micro-batch do not go together"):
        check_machine(config.replace(micro_batch=2), two)
    check_machine(config.replace(device="cpu", micro_batch=2), ddp.DistInfo())


def test_sync_bn_with_micro_batches_and_frozen_statistics_runs(monkeypatch):
    """helper-106: with --bn eval (the default with pretrained weights, which the refusal names as the way out)
    --sync-bn synchronises no layer (a note says so), so --micro-batch beside it is no hang: not refused (was
    refused, and with the very option the line told the user to use)."""
    from finetune.core.config import FinetuneConfig
    from finetune.engine import check_machine, runtime

    monkeypatch.setattr(runtime, "resolve_device", lambda device, info=None: torch.device("cuda", 0))
    two = ddp.DistInfo(rank=0, world_size=2, enabled=True)
    check_machine(FinetuneConfig(device="cuda", batch_size=8, bn="eval", sync_bn=True, micro_batch=2), two)


def test_leave_ends_the_group_once(tmp_path):
    """ddp.leave: a barrier, then the group is destroyed; a second call (the job's end after _finish left) is a
    no-op, as is a run outside torchrun."""
    import torch.distributed as dist

    ddp.leave(ddp.DistInfo())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    one = ddp.DistInfo(rank=0, world_size=1, enabled=True)
    ddp.leave(one)
    assert not dist.is_initialized()
    ddp.leave(one)
    ddp.cleanup(one)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_computed_on_main_gives_every_rank_rank_0s_value_or_error(tmp_path):
    """ddp.computed_on_main (the data folder's scan under torchrun): only rank 0 calls the function, every rank
    gets its value, also when rank 0 takes longer than the default group's timeout (NCCL's 10 minutes ended the
    others in a long first scan; here gloo's, set to 2 s); its error is raised on every rank with its message and
    exit code, an interrupt as exit code 130, and nobody hangs."""
    body = """
        import time
        from datetime import timedelta
        import torch.distributed as dist
        from finetune.core import distributed as ddp
        from finetune.core.errors import DataError, FinetuneError
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=2))
        info = ddp.setup("cpu")
        calls = []
        def look():
            calls.append(info.rank)
            time.sleep(4)
            return {"seen by": info.rank, "files": ["a.jpg", "b.jpg"]}
        got = ddp.computed_on_main(look, info)
        assert got == {"seen by": 0, "files": ["a.jpg", "b.jpg"]}, got
        assert calls == ([0] if info.rank == 0 else []), calls
        def refuse():
            err = DataError("class 'x' has no images: add some")
            err.exit_code = 7
            raise err
        def interrupted():
            raise KeyboardInterrupt
        for fn, said, code in ((refuse, "class 'x' has no images: add some", 7),
                               (interrupted, "rank 0 was interrupted", 130)):
            try:
                ddp.computed_on_main(fn, info)
            except KeyboardInterrupt:
                assert info.rank == 0 and fn is interrupted
            except FinetuneError as e:
                assert str(e) == said and e.exit_code == code, (e, e.exit_code)
                assert isinstance(e, DataError) == (info.rank == 0), type(e)
            else:
                raise AssertionError("no error")
        print(f"rank {info.rank} ok", flush=True)
    """
    from finetune.data import ImageSet

    empty = ImageSet([], ["a"])
    out = _torchrun_fit(tmp_path, empty, empty, body, timeout=120)
    assert "rank 0 ok" in out and "rank 1 ok" in out


@pytest.mark.parametrize("text, said", [
    # gloo's words, seen on torch 2.14: the peer killed, then a peer alive but past the group's timeout
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:21181. "
     "This is typically caused by a remote worker crashing.", "stopped, and the connection to it broke "
     "(Connection closed by peer [127.0.0.1]:21181)"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for recv "
     "operation to complete", "did not reach the same step within the process group's timeout (Timed out waiting "
     "1800000ms for recv operation to complete): it is stuck or far slower"),
    # NCCL's (as DistBackendError): every work it names carries "Timeout(ms)=", a peer lost or not
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL version "
     "2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote process exiting "
     "prematurely. WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=4, NumelOut=4, Timeout(ms)=600000)",
     "stopped, and the connection to it broke (NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited"),
    ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=4, "
     "NumelOut=4, Timeout(ms)=600000) ran for 600085 milliseconds before timing out.", "within the process "
     "group's timeout (Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12"),
])
def test_a_collective_cut_off_says_whether_the_other_process_ended_or_timed_out(tmp_path, text, said):
    """helper-100: raise_if_peer_lost said "another process ... stopped, and the connection to it broke; torchrun's
    summary names its rank and exit code" of a gloo timeout too, where the other process is alive (stuck, or
    waited for longer than the group's 30 minutes): there is no exit code to find. A timeout now says so."""
    info = ddp.DistInfo(rank=0, world_size=2, local_rank=0, enabled=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    error = (torch.distributed.DistBackendError if "NCCL" in text else RuntimeError)(text)
    with pytest.raises(FinetuneError) as err:
        ddp.raise_if_peer_lost(error, info, tmp_path)
    assert said in str(err.value) and str(err.value).endswith(f"continue with `zoo finetune --resume {tmp_path}`")
    assert ("torchrun's summary names its rank" in str(err.value)) == ("timing out" not in text.lower()
                                                                       and "timed out" not in text.lower())
    ddp.raise_if_peer_lost(RuntimeError("CUDA out of memory"), info, tmp_path)      # its own error: not told


@pytest.mark.parametrize("env,launch", [
    ({}, "zoo"),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "zoo"),      # a launcher other than torchrun: not known
    ({"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, "zoo"),
    ({"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc-per-node 2 -m zoo"),
    ({"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
     "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m zoo")])
def test_the_resume_command_is_the_launch_the_job_was_started_with(monkeypatch, tmp_path, env, launch):
    """helper-107: under torchrun every line naming the resume (out of memory, Ctrl-C, a peer lost) said
    `zoo finetune --resume RUN`, one process. It names torchrun with the job's process count (``launch.zoo_launch``,
    read from the environment torchrun sets); on several machines, with a rendezvous left to fill in (HOST:PORT)."""
    from finetune.core.io import resume_command

    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resume_command(tmp_path, "--micro-batch", 2) == f"{launch} finetune --resume {tmp_path} --micro-batch 2"


def test_every_line_naming_a_new_run_names_the_launch_the_job_was_started_with(monkeypatch, tmp_path):
    """helper-112: under torchrun the lines naming a new run (into the run folder with --overwrite, or another model)
    said `zoo finetune MODEL ...`, one process, while the resume's named torchrun: they share ``io.new_run_command``
    (``rerun.start_over_command``), which names the job's launch as ``io.resume_command`` does."""
    from finetune.core.checkpoint import load_checkpoint
    from finetune.core.errors import CheckpointError
    from zoo.jobs.resume import _missing_checkpoint

    for name, value in {"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    over = f"torchrun --nproc-per-node 2 -m zoo finetune MODEL --data DIR --out {run} --overwrite"
    assert f"start the run over with `{over}`" in _missing_checkpoint(run)     # (nothing recorded: placeholders)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run / "checkpoints" / "last.pt")
    assert str(err.value).endswith(f"start the run over with `{over}`")


@pytest.mark.parametrize("words,said", [
    ({1: "out of memory in a forward pass of 4 image(s) (CUDA out of memory): rank 0 saves RUN; continue in passes "
         "of 2 images (the same steps) with `torchrun --nproc-per-node 2 -m zoo finetune --resume RUN --micro-batch 2`"},
     "rank 1 of this torchrun job stopped on its own error: out of memory in a forward pass of 4 image(s) (CUDA out "
     "of memory): rank 0 saves RUN; continue in passes of 2 images (the same steps) with `torchrun --nproc-per-node 2 "
     "-m zoo finetune --resume RUN --micro-batch 2`"),
    ({1: "", 3: "no space left on device while writing: free some disk space or write elsewhere (--out, ZOO_HOME)"},
     "rank 3 of this torchrun job stopped on its own error: no space left on device while writing: free some disk "
     "space or write elsewhere (--out, ZOO_HOME); RUN keeps its last checkpoint: continue with `zoo finetune "
     "--resume RUN`"),
    ({1: "", 3: ""}, "rank 2 of this torchrun job stopped without a word (killed, by the out-of-memory killer or a "
                     "signal, or a crash: torchrun's summary gives its exit code), and the connection to it broke "
                     "(Connection reset by peer); RUN keeps its last checkpoint: continue with `zoo finetune --resume RUN`"),
    ({1: ""}, "another process of this torchrun job stopped, and the connection to it broke (Connection reset by "
              "peer); torchrun's summary names its rank and exit code, and its own lines say why; RUN keeps"),
    (None, "another process of this torchrun job stopped, and the connection to it broke (Connection reset by "
           "peer); torchrun's summary names its rank and exit code, and its own lines say why; RUN keeps"),
])
def test_rank_0_names_the_process_that_ended_from_the_others_last_words(tmp_path, monkeypatch, words, said):
    """helper-145: rank 0's line for a peer lost in a collective named no rank ("another process of this torchrun
    job stopped"; torchrun's summary did), and a rank that ended on its own error (out of memory, a full disk) said
    why only in its own lines, on its own machine. Each rank that ends leaves its line in the job's store (its word;
    "" where it ends on another's end), and rank 0 names the rank that ended on its own error, with its line (which,
    naming a command, says how to go on), or the one rank that left no word (killed); else the line as before
    (two ranks silent, or no store: words None)."""
    world = 4 if words and 3 in words else 2
    info = ddp.DistInfo(rank=0, world_size=world, local_rank=0, enabled=True)
    store = torch.distributed.HashStore()
    for r, word in (words or {}).items():
        store.set(f"zoo/last-word/0/{r}", word)
    monkeypatch.setattr(lastwords, "_job_store", lambda: None if words is None else store)
    monkeypatch.setattr(lastwords, "WORDS_WAIT_S", 0.2)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("RANK", "0")
    run = tmp_path / "RUN"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
    with pytest.raises(FinetuneError) as err:
        ddp.raise_if_peer_lost(error, info, run)
    assert str(err.value).replace(str(run), "RUN").startswith(said), str(err.value)
    if words is not None:       # rank 0's own word: it ended on another's end
        assert store.get("zoo/last-word/0/0") == b""


def test_a_process_leaves_its_first_word_only(monkeypatch):
    """helper-145: a rank that met another's end in a collective leaves "" first (ddp.raise_if_peer_lost), then
    the CLI's line for that end: the first stays, so rank 0 does not read "another process ... stopped" as a rank's
    own error."""
    store = torch.distributed.HashStore()
    monkeypatch.setattr(lastwords, "_job_store", lambda: store)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lastwords.leave_word("")
    lastwords.leave_word("another process of this torchrun job stopped, ...")
    assert store.get("zoo/last-word/1/2") == b""
