"""`zoo finetune` whose batch does not fit the device's memory (helper-117): the warm-up (CUDA's, forced here on
the CPU) lowers --micro-batch, the run trains in those passes, and a resume reads them from config.yaml: it does
not run out of memory first, says nothing of it, and ends as the run given that --micro-batch."""
from __future__ import annotations

import csv

import pytest
import yaml

from finetune.engine import epoch_steps
from finetune.engine.trainer import Trainer
from tests.conftest import make_image_folder, register_tiny
from tests.finetune.test_warm_up_memory import memory_of
from tests.zoo.test_cli_memory import invoke

OPTIONS = ["--freeze", "none", "--no-fast-head", "--epochs", "3", "--workers", "0", "--batch-size", "8",
           "--no-export", "--seed", "3"]


def _rows(run) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_a_resume_trains_in_the_passes_the_warm_up_settled_on(tmp_path, monkeypatch):
    import zoo.jobs.finetune
    import zoo.jobs.resume

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    monkeypatch.setattr(epoch_steps, "warms_up", lambda device: True)
    built = []
    real = zoo.jobs.finetune.build_for_training

    def limited(*args, **kwargs):       # a device that holds forward passes of at most 5 images
        built.append(memory_of(real(*args, **kwargs), 5))
        return built[-1]

    for module in (zoo.jobs.finetune, zoo.jobs.resume):
        monkeypatch.setattr(module, "build_for_training", limited)
    given = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "given", *OPTIONS, "--micro-batch", "4")
    assert given.exit_code == 0, given.output
    assert "out of memory" not in given.output

    run, real_epoch = tmp_path / "run", Trainer._run_epoch

    def interrupted_in_epoch_2(self, *args):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, *args)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_run_epoch", interrupted_in_epoch_2)
        first = invoke("finetune", tiny, "--data", data, "--out", run, *OPTIONS)
    assert first.exit_code == 130, first.output
    said = [ln for ln in first.output.splitlines() if "out of memory" in ln]
    assert said == ["out of memory in a pass of 8 images: training in passes of 4 (--micro-batch 4: the same steps)"]
    assert yaml.safe_load((run / "config.yaml").read_text())["micro_batch"] == 4

    resumed = invoke("finetune", "--resume", run, "--workers", "0", "--no-export")
    assert resumed.exit_code == 0, resumed.output
    assert "out of memory" not in resumed.output
    assert max(n for _, n in built[-1].passes) <= 4        # the resume's warm-up too: no pass ran out
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]
    for a, b in zip(_rows(run), _rows(tmp_path / "given"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key


def test_a_resume_s_micro_batch_is_kept_by_the_next_resume(tmp_path, monkeypatch):
    """helper-119: `--resume RUN --micro-batch 3` was not written to config.yaml: the next `--resume RUN` (the line an
    interruption prints) went back to passes of 8. It is recorded, as the warm-up's passes are (no step changes)."""
    import zoo.jobs.resume

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    built = []
    real = zoo.jobs.resume.build_for_training
    monkeypatch.setattr(zoo.jobs.resume, "build_for_training",
                        lambda *a, **k: built.append(memory_of(real(*a, **k), 1000)) or built[-1])
    run, real_epoch = tmp_path / "run", Trainer._run_epoch

    def interrupted_after(epoch: int):
        def run_epoch(self, *args):
            if self.epoch == epoch:
                raise KeyboardInterrupt
            return real_epoch(self, *args)
        return run_epoch

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_run_epoch", interrupted_after(1))
        assert invoke("finetune", tiny, "--data", data, "--out", run, *OPTIONS).exit_code == 130
        m.setattr(Trainer, "_run_epoch", interrupted_after(2))
        given = invoke("finetune", "--resume", run, "--workers", "0", "--micro-batch", "3")
    assert given.exit_code == 130, given.output
    assert max(n for _, n in built[-1].passes) == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["micro_batch"] == 3
    again = invoke("finetune", "--resume", run, "--workers", "0")
    assert again.exit_code == 0, again.output
    assert max(n for _, n in built[-1].passes) == 3
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]


def test_a_resume_given_micro_batch_0_names_the_passes_it_ran_out_in(tmp_path, monkeypatch):
    """Review (helper-123): `--resume RUN --micro-batch 0` takes the passes config.yaml records (2 here:
    ``RunFolder.resume_passes``), but the resume job kept 0: out of memory in fit's set-up, its line named passes of
    4 (half the whole batch of 8), larger than the 2 that ran out. The job takes the recorded passes first, as fit
    does: the line names passes of 1. The help says what 0 does on a resume."""
    import finetune.tools.train
    import torch

    from tests.zoo.test_cli_memory import TORCH_OOM, _stopped_out_of_memory

    run, *_ = _stopped_out_of_memory(tmp_path, monkeypatch, Trainer, "_run_epoch")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "micro_batch": 2}, sort_keys=False))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(finetune.tools.train, "build_setup", no_memory)
    result = invoke("finetune", "--resume", run, "--micro-batch", "0", "--workers", "0", "--quiet", "--no-export")
    assert result.stderr.splitlines()[-1].endswith(f"`zoo finetune --resume {run} --micro-batch 1`"), result.output
    assert "a resume given none (or 0) takes them" in " ".join(invoke("finetune", "--help").output.split())
