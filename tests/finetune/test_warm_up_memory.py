"""A batch too big for the device's memory trains anyway, in passes (helper-117): the warm-up of a phase
(CUDA's, forced here on the CPU) that runs out of memory lowers ``--micro-batch`` itself, says so in one line,
records it in config.yaml, and the run takes the steps a run given that ``--micro-batch`` takes. The device's
memory is stood in for by a model that raises torch's OutOfMemoryError on a forward pass of more than ``k``
images (no GPU's numbers are claimed)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from finetune.core.checkpoint import BEST, load_weights
from finetune.core.errors import OutOfMemory
from finetune.engine import epoch_steps
from tests.conftest import make_image_folder
from tests.finetune.test_train import needs_cuda
from tests.finetune.test_distributed import TORCHRUN, _torchrun_fit
from tests.finetune.test_train import cfg, data, run, tiny_model  # noqa: F401 (data: a fixture)

TORCH_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


def memory_of(model: torch.nn.Module, k: int, *, training_too: bool = True) -> torch.nn.Module:
    """``model`` with a device memory that holds a forward pass of at most ``k`` images (``training_too`` False:
    only its evaluation passes are limited); the passes' sizes are kept in ``model.passes`` (meta-device forwards are none)."""
    model.passes = []

    def check(module, args):
        if args[0].is_meta:     # set-up's size checks (recipe.check_input_size) hold no memory: not a pass
            return
        n = int(args[0].shape[0])
        module.passes.append((module.training, n))
        if n > k and (training_too or not module.training):
            raise torch.OutOfMemoryError(TORCH_OOM)

    model.register_forward_pre_hook(check)
    return model


@pytest.fixture
def warms_up(monkeypatch):
    """The CUDA decision on the CPU: every phase that trains through the network warms up first."""
    monkeypatch.setattr(epoch_steps, "warms_up", lambda device: True)


def _fit(data, tmp_path, name: str, k: int | None, said: list[str] | None = None, **options):   # noqa: F811
    model = tiny_model() if k is None else memory_of(tiny_model(), k, training_too=options.pop("training_too", True))
    config = cfg(epochs=2, freeze="none", batch_size=9, **options)
    result = run(data, config, model=model, run_dir=tmp_path / name, log=(said if said is not None else []).append)
    return result, model


def _rows(path) -> list[dict]:
    return list(csv.DictReader(open(path / "metrics.csv")))


def test_a_warm_up_out_of_memory_trains_in_smaller_passes_as_the_run_given_them(data, tmp_path, warms_up):  # noqa: F811
    """Batch 9 where passes of 4 fit: the warm-up's pass of 9 runs out, the run trains in passes of 4 (9 = 3 + 3 + 3),
    one line says it, config.yaml records it; metrics.csv and the weights are those of `--micro-batch 4`
    (before: the first step ran out of memory and the run stopped, naming a resume with --micro-batch 4)."""
    said: list[str] = []
    _, model = _fit(data, tmp_path, "auto", 4, said)
    lines = [ln for ln in said if "out of memory" in ln]
    assert lines == ["out of memory in a pass of 9 images: training in passes of 4 (--micro-batch 4: the same steps)"]
    assert max(n for _, n in model.passes[2:]) == 3       # every pass after the one that ran out (and its retry)
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["micro_batch"] == 4
    _fit(data, tmp_path, "given", None, micro_batch=4)
    for a, b in zip(_rows(tmp_path / "auto"), _rows(tmp_path / "given"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    a, b = load_weights(tmp_path / "auto" / BEST), load_weights(tmp_path / "given" / BEST)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_a_validation_pass_out_of_memory_makes_the_passes_smaller_too(data, tmp_path, warms_up):  # noqa: F811
    """The training pass fits, the validation pass of 9 images does not: --micro-batch 4 (it sets both)."""
    said: list[str] = []
    _, model = _fit(data, tmp_path, "val", 4, said, training_too=False)
    assert [ln for ln in said if "out of memory" in ln] == [
        "out of memory in a validation pass of 9 images: validating in passes of 4 (--micro-batch 4: the same steps)"]
    assert max(n for training, n in model.passes[3:] if not training) <= 4


def test_compile_warms_up_eagerly_first_and_compiles_the_passes_that_fit(data, tmp_path, warms_up, monkeypatch):  # noqa: F811
    """Session 36: `--compile` skipped the warm-up, so a batch too big for the device stopped the run at its first
    step (docs said: give it --micro-batch yourself). The warm-up now runs eagerly before compiling: the same line,
    the same passes. (torch.compile stood in by the identity: what is tested is the order, not inductor.)"""
    compiled: list[int] = []
    monkeypatch.setattr(epoch_steps.torch, "compile", lambda net: compiled.append(1) or net)
    said: list[str] = []
    _, model = _fit(data, tmp_path, "compiled", 4, said, compile=True)
    assert [ln for ln in said if "out of memory" in ln] == [
        "out of memory in a pass of 9 images: training in passes of 4 (--micro-batch 4: the same steps)"]
    assert compiled and max(n for _, n in model.passes[2:]) == 3
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["micro_batch"] == 4


def test_passes_that_cannot_be_smaller_stop_with_the_line_of_today(data, tmp_path, warms_up):  # noqa: F811
    """The MLP head's BatchNorm trains: passes of 1 or 2 images are refused, so where 3 do not fit the run stops
    with the out-of-memory line naming the start-over (--head linear), as an out-of-memory in a step does."""
    said: list[str] = []
    with pytest.raises(OutOfMemory) as err:
        _fit(data, tmp_path, "mlp", 2, said, head="mlp")
    text = str(err.value)
    assert text.startswith(f"out of memory in a forward pass of 3 image(s) ({TORCH_OOM}): the run is in "
                           f"{tmp_path / 'mlp'}, and passes of 3 images are the fewest it takes"), text
    assert "--head linear" in text
    assert not [ln for ln in said if ln.startswith("out of memory")]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_under_torchrun_every_rank_takes_the_passes_of_the_rank_that_ran_out(tmp_path):
    """2 processes (gloo): only rank 1's device runs out of memory (passes of more than 4 images). Both ranks
    take the same smaller passes (one all-reduce each warm-up; a rank alone in passes would leave the other
    waiting in DDP's gradient all-reduce), rank 0 alone says so, once, and config.yaml records them."""
    from finetune.data import scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split"))
    out = _torchrun_fit(tmp_path, report.train, report.val, f"""
        import json
        from finetune.core import distributed
        from finetune.engine import epoch_steps
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, cfg, tiny_model
        from tests.finetune.test_warm_up_memory import memory_of
        epoch_steps.warms_up = lambda device: True
        info = distributed.setup("cpu")
        model = memory_of(tiny_model(), 4 if info.rank == 1 else 1000)
        fit(model, STAGES, DATA_CONFIG, train, val, cfg(epochs=2, freeze="none", batch_size=16), head="fc",
            run_dir={str(tmp_path / "ddp")!r}, log=print)
        json.dump(model.passes, open({str(tmp_path)!r} + f"/passes{{info.rank}}.json", "w"))
    """)
    assert out.count("out of memory in a pass of 8 images") == 1, out[-3000:]
    assert "training in passes of 4 (--micro-batch 4: the same steps)" in out
    assert yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())["micro_batch"] == 4
    for rank in (0, 1):     # after the first warm-up (rank 0: passes of 8 and 5 fitted; rank 1: 8 ran out), on both
        passes = json.loads((tmp_path / f"passes{rank}.json").read_text())     # ranks every pass at most 4 images
        assert passes[0] == [True, 8] and max(n for _, n in passes[2 - rank:]) == 4, (rank, passes[:4])


def test_sync_bn_that_trains_takes_no_smaller_passes_and_the_line_says_so(tmp_path):
    """helper-117: --sync-bn with --bn train under torchrun refuses --micro-batch (``runtime.check_sync_bn``), but
    ``setup.refused_passes`` did not know it: an out-of-memory line named `--resume RUN --micro-batch 4`, which
    the resume refused, and the warm-up would have trained in passes SyncBatchNorm cannot take. No pass is smaller
    now: the line names the start-over with --no-sync-bn."""
    from types import SimpleNamespace

    from finetune.core import distributed as ddp
    from finetune.engine.passes import smaller_pass
    from finetune.engine.runfolder import RunFolder
    from finetune.engine.setup import refused_passes

    setup = SimpleNamespace(config=cfg(sync_bn=True, bn="train", batch_size=16), device=torch.device("cuda"),
                            info=ddp.DistInfo(rank=0, world_size=2, local_rank=0, enabled=True))
    assert refused_passes(setup, 4) == "--no-sync-bn"
    assert smaller_pass(8, lambda micro: refused_passes(setup, micro)) == (None, "--no-sync-bn")
    said = RunFolder(tmp_path / "run").start_over(8, "--no-sync-bn")
    assert said.startswith(f"the run is in {tmp_path / 'run'}, and --sync-bn with --bn train takes no passes of fewer "
                           "images (every process would have to take as many): start it over with --no-sync-bn, a "
                           "smaller --img-size or a smaller model (`"), said
    assert "--overwrite --no-sync-bn`" in said


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_a_batch_beyond_its_memory_trains_in_smaller_passes(tmp_path, monkeypatch):
    """The real thing (``pytest -m gpu``; skipped without CUDA): the process may hold only what a pass of about 5
    images needs (``set_per_process_memory_fraction``, measured on one image first), so the warm-up's pass of 16 runs
    out in CUDA's caching allocator. After the fallback (the failed pass's blocks returned to the allocator) the run
    trains in passes that fit under the same cap, and config.yaml records them."""
    import timm

    from tests.conftest import register_tiny
    from tests.zoo.test_cli_memory import invoke

    tiny, size = register_tiny(tmp_path, monkeypatch), 384
    data = make_image_folder(tmp_path / "data", per_class=8)
    model = timm.create_model("test_resnet", num_classes=3).cuda()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(torch.zeros(1, 3, size, size, device="cuda")).sum().backward()
    one = torch.cuda.max_memory_allocated() - base       # a training pass of one image at this size
    del model
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_allocated() + 5 * one + (64 << 20)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        out = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", "--device", "cuda", "--freeze", "none",
                     "--no-fast-head", "--epochs", "1", "--batch-size", "16", "--img-size", size, "--workers", "0",
                     "--no-export")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert out.exit_code == 0, out.output
    said = [ln for ln in out.output.splitlines() if ln.startswith("out of memory")]
    assert len(said) == 1 and said[0].startswith("out of memory in a pass of 16 images: training in passes of "), said
    micro = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["micro_batch"]
    assert 1 <= micro < 16 and f"passes of {micro} " in said[0]


def test_a_resume_through_the_api_trains_in_the_passes_the_warm_up_settled_on(data, tmp_path, warms_up):  # noqa: F811
    """helper-119: config.yaml recorded the warm-up's passes for the CLI's resume only; ``fit(..., resume=True)``
    with the run's own config (micro_batch 0) ran out of memory once more and fell back again (a second line).
    The library's resume takes the recorded passes (``RunFolder.resume_passes``): no line, no pass above 4."""
    from finetune.core.errors import Interrupted

    config, said = cfg(epochs=3, freeze="none", batch_size=9), []
    stop = [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] == 1 else None]
    with pytest.raises(Interrupted):
        run(data, config, model=memory_of(tiny_model(), 4), run_dir=tmp_path / "run", log=said.append, callbacks=stop)
    assert [ln for ln in said if "out of memory" in ln] == [
        "out of memory in a pass of 9 images: training in passes of 4 (--micro-batch 4: the same steps)"]
    said.clear()
    model = memory_of(tiny_model(), 4)
    run(data, config, model=model, run_dir=tmp_path / "run", resume=True, log=said.append)
    assert not [ln for ln in said if "out of memory" in ln], said
    assert max(n for _, n in model.passes) <= 4
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2", "3"]


def test_a_resume_given_passes_records_them_for_the_next_resume(data, tmp_path):  # noqa: F811
    """helper-119: passes given to a resume (``micro_batch`` 3) are recorded in config.yaml, as the warm-up's are:
    the next resume given none (0) takes them (they change no step: the run's maths are the same either way)."""
    from finetune.core.errors import Interrupted

    config = cfg(epochs=3, freeze="none", batch_size=9)
    stop = [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] in (1, 2) else None]
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "run", callbacks=stop)
    with pytest.raises(Interrupted):
        run(data, config.replace(micro_batch=3), run_dir=tmp_path / "run", resume=True, callbacks=stop)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["micro_batch"] == 3
    model = memory_of(tiny_model(), 1000)
    run(data, config, model=model, run_dir=tmp_path / "run", resume=True)
    assert max(n for _, n in model.passes) == 3


def test_a_resume_given_passes_goes_on_without_a_config_yaml(data, tmp_path):  # noqa: F811
    """A resume through the API needs no config.yaml (the checkpoint holds the run's options): one gone is not
    recorded into, and the resume given passes goes on (before helper-119's recording: the same)."""
    from finetune.core.errors import Interrupted

    config = cfg(epochs=2, freeze="none", batch_size=9)
    stop = [lambda row: (_ for _ in ()).throw(KeyboardInterrupt()) if row["epoch"] == 1 else None]
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "run", callbacks=stop)
    (tmp_path / "run" / "config.yaml").unlink()
    run(data, config.replace(micro_batch=3), run_dir=tmp_path / "run", resume=True)
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2"]
