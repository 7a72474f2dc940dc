"""A device out of memory: one line saying what was tried, what is saved and what to do, never torch's traceback;
a run stopped so resumes in smaller passes (``--micro-batch``) and ends as the run that had the memory."""
from __future__ import annotations

import csv
import json
import shlex

import pytest
import torch
import yaml
from click.testing import CliRunner

from finetune.core.io import shell_command
from tests.conftest import make_image_folder, register_tiny
from tests.zoo.test_cli_export_predict_eval import bundle, runner  # noqa: F401 (fixtures)
from zoo.cli import cli

# torch's own text (torch 2.x, CUDA's caching allocator), advice on the allocator included
TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
             "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the "
             "allocated memory 77.01 GiB is allocated by PyTorch, and 512.00 MiB is reserved by PyTorch but "
             "unallocated. If reserved but unallocated memory is large try setting "
             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
SAID = ("out of memory in a forward pass of 8 image(s) (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 79.19 GiB of which 1.06 GiB is free)")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(run) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_out_of_memory_in_epoch_2_saves_epoch_1_and_resumes_in_smaller_passes_as_the_run_with_memory(
        tmp_path, monkeypatch):
    """The first step of epoch 2 runs out of GPU memory (torch's OutOfMemoryError in the forward pass): exit 1 and
    one line, torch's first sentences, what is saved, and the resume command in passes of half the images, which
    continues the run: its epochs are those of the run that had the memory (before: torch's traceback, and
    `--resume` could only run out of memory again, --batch-size being fixed by the run)."""
    from finetune.engine import passes

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    options = ["--freeze", "head", "--no-fast-head", "--epochs", "3", "--workers", "0", "--batch-size", "8",
               "--no-export", "--quiet", "--seed", "3"]
    real, calls = passes.train_forward, []

    def counted(model, x, *args):
        calls.append(int(x.shape[0]))
        return real(model, x, *args)

    def out_of_memory_in_epoch_2(model, x, *args):
        if len(calls) == steps_per_epoch:
            raise torch.OutOfMemoryError(TORCH_OOM)
        return counted(model, x, *args)

    with monkeypatch.context() as m:
        m.setattr(passes, "train_forward", counted)
        assert invoke("finetune", tiny, "--data", data, "--out", tmp_path / "whole", *options).exit_code == 0
    steps_per_epoch, sizes = len(calls) // 3, set(calls)
    assert sizes == {8, 7}                  # 15 training images at batch 8, 2 steps an epoch

    run = tmp_path / "run"
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(passes, "train_forward", out_of_memory_in_epoch_2)
        result = invoke("finetune", tiny, "--data", data, "--out", run, *options)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "PYTORCH_CUDA_ALLOC_CONF" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("zoo: error")]
    assert lines == [f"zoo: error: {SAID}: epochs up to 1 are saved in {run}; continue in passes of 4 images (the "
                     f"same steps) with `zoo finetune --resume {run} --micro-batch 4`"]
    assert [r["epoch"] for r in _rows(run)] == ["1"]

    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(passes, "train_forward", counted)
        resumed = invoke("finetune", "--resume", run, "--micro-batch", "4", "--workers", "0", "--quiet",
                         "--no-export")
    assert resumed.exit_code == 0, resumed.output
    assert set(calls) == {4, 3}            # every pass of the resumed epochs at most 4 images (8 = 4 + 4, 7 = 4 + 3)
    for a, b in zip(_rows(run), _rows(tmp_path / "whole"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key


def test_out_of_memory_of_another_command_is_one_line_naming_the_batch_size(  # noqa: F811 (bundle: a fixture)
        tmp_path, bundle, monkeypatch):
    """`zoo predict` (eval, serve, doctor...) out of GPU memory: one line with torch's first sentences and what to
    change, not a traceback (helper-104: naming the commands that take --micro-batch, zoo sweep and lr-find too)."""
    import zoo.predict

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(zoo.predict, "predict_probs", no_memory)
    image = make_image_folder(tmp_path / "img", per_class=1) / "cat"
    result = invoke("predict", bundle, image)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        "zoo: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 1.06 GiB is free): start again with a smaller --batch-size")


def test_the_out_of_memory_line_names_only_options_the_command_takes():
    """helper-106: the line of every command named --micro-batch and --img-size (zoo predict, eval and doctor take
    neither: the command it advised was refused, 'No such option'), and --batch-size to zoo export and serve. It
    names the options of the command that ran out of memory; one without any, the device."""
    import re

    import click

    for name, command in cli.commands.items():
        ctx = click.Context(cli)
        ctx.invoked_subcommand = name
        advice = cli._memory_advice(ctx)
        takes = {o for p in command.params for o in getattr(p, "opts", ())}
        assert set(re.findall(r"--[a-z-]+", advice)) <= takes, (name, advice)
    ctx = click.Context(cli)
    ctx.invoked_subcommand = "lr-find"
    assert cli._memory_advice(ctx) == ("start again with a smaller --batch-size, --micro-batch (the same steps in "
                                       "passes of fewer images) or a smaller --img-size")


class _Passes:
    """A run's forward passes as RunFolder.stopped reads them (LoaderSteps): ``images`` the largest, and the passes
    refused (``refused``: micro -> the option that lifts it)."""

    def __init__(self, images: int, refused: dict[int, str] | None = None) -> None:
        self.pass_images, self._refused = images, refused or {}

    def refused(self, micro: int) -> str | None:
        return self._refused.get(micro)


def _options() -> list[str]:
    return ["--freeze", "head", "--no-fast-head", "--epochs", "2", "--workers", "0", "--batch-size", "8",
            "--no-export", "--quiet", "--seed", "3"]


def _stopped_out_of_memory(tmp_path, monkeypatch, owner, name: str, *options: str):
    """(RUN, the CLI's result, the model's name, the data folder) of a 2-epoch run with ``options`` (after _options':
    they win) whose ``owner.name`` runs out of GPU memory (exit 1 asserted)."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    with monkeypatch.context() as m:
        m.setattr(owner, name, no_memory)
        result = invoke("finetune", tiny, "--data", data, "--out", run, *_options(), *options)
    assert result.exit_code == 1, result.output
    return run, result, tiny, data


def test_out_of_memory_in_the_first_step_continues_the_run_with_its_resume_command(tmp_path, monkeypatch):
    """helper-104: the first step out of memory (where a batch too big meets the device) named no command: `the run
    is in RUN; start again with --micro-batch 4`, and the same command again was refused (RUN holds a run). It
    names the resume of the run (epoch 0's checkpoint, on disk before the line), which trains it in passes."""
    from finetune.engine import passes

    run, result, _, _ = _stopped_out_of_memory(tmp_path, monkeypatch, passes, "train_forward")
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: {SAID}: before the first epoch ended; the run is in {run}; continue in passes of 4 images (the "
        f"same steps) with `zoo finetune --resume {run} --micro-batch 4`")
    resumed = invoke("finetune", "--resume", run, "--micro-batch", "4", "--workers", "0", "--quiet", "--no-export")
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_out_of_memory_after_training_names_the_resume_that_writes_the_end(tmp_path, monkeypatch):
    """helper-104: out of memory after the last epoch (the head guard's or the final evaluation, before
    summary.json) reached the handler of other commands: `start again with a smaller --batch-size`, as if nothing
    were saved. It says what is saved and the resume, which trains nothing and writes the run's end."""
    from finetune.engine.trainer import Trainer

    run, result, _, _ = _stopped_out_of_memory(tmp_path, monkeypatch, Trainer, "_guard_head")
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: {SAID}: epochs up to 2 are saved in {run}; continue in passes of 4 images (the same steps) "
        f"with `zoo finetune --resume {run} --micro-batch 4`")
    assert not (run / "summary.json").exists()
    resumed = invoke("finetune", "--resume", run, "--micro-batch", "4", "--workers", "0", "--quiet", "--no-export")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "summary.json").is_file() and [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_out_of_memory_on_another_rank_names_the_resume_command(tmp_path):
    """helper-104: under torchrun the rank that runs out of memory first may not be rank 0, and its line is the one
    seen: it said `rank 0 saves RUN; start again with --micro-batch 4` (the same command is refused: RUN holds a
    run); it names the resume in passes, as its interrupted line names the resume."""
    from finetune.core import distributed as ddp
    from finetune.engine.runfolder import RunFolder

    run = tmp_path / "run"
    other = RunFolder(run, ddp.DistInfo(rank=1, world_size=2, local_rank=1, enabled=True))
    said = str(other.stopped(1, torch.OutOfMemoryError(TORCH_OOM), _Passes(8)))
    assert said == (f"{SAID}: rank 0 saves {run}; continue in passes of 4 images (the same steps) with "
                    f"`zoo finetune --resume {run} --micro-batch 4`")


CUDA_ERROR = ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
              "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
              "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


def test_cuda_s_own_allocation_failing_is_out_of_memory_too(tmp_path, bundle, monkeypatch):  # noqa: F811
    """helper-104: CUDA's own allocations (the cuBLAS handle a first matmul creates on a full device, a stream)
    fail as a RuntimeError, not torch's OutOfMemoryError: a run stopped by one went through the generic error path
    (no resume in passes) and other commands showed a traceback; both say what the OutOfMemoryError says, with the
    error's first line (not torch's advice on CUDA_LAUNCH_BLOCKING)."""
    import zoo.predict
    from finetune.core.errors import is_out_of_memory, memory_text
    from finetune.engine import passes

    assert is_out_of_memory(RuntimeError(CUDA_ERROR)) and memory_text(RuntimeError(CUDA_ERROR)) == \
        "CUDA error: out of memory"
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    # helper-106: one that quotes it past its first line or mid-sentence is another error, its traceback kept
    worker = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              f"  File \"x.py\", line 1, in f\nRuntimeError: {CUDA_ERROR}")
    assert not is_out_of_memory(RuntimeError(worker))
    assert not is_out_of_memory(RuntimeError("the hook failed after an earlier CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))

    def no_memory(*args, **kwargs):
        raise RuntimeError(CUBLAS)

    monkeypatch.setattr(zoo.predict, "predict_probs", no_memory)
    image = make_image_folder(tmp_path / "img", per_class=1) / "cat"
    result = invoke("predict", bundle, image)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[-1].startswith(f"zoo: error: out of memory ({CUBLAS}): start again with")

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "full"

    def device_full(model, x, *args):
        raise RuntimeError(CUDA_ERROR)

    with monkeypatch.context() as m:
        m.setattr(passes, "train_forward", device_full)
        result = invoke("finetune", tiny, "--data", data, "--out", run, *_options())
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: out of memory in a forward pass of 8 image(s) (CUDA error: out of memory): before the first "
        f"epoch ended; the run is in {run}; continue in passes of 4 images (the same steps) with "
        f"`zoo finetune --resume {run} --micro-batch 4`")


def test_out_of_memory_in_fit_s_set_up_names_the_overwrite_the_same_command_needs(tmp_path, monkeypatch):
    """helper-106: the device out of memory in fit's set-up (the model moved to a full GPU), after the run folder
    got its scan.json and model.json: the line said `start again with a smaller --batch-size ...`, and that command
    was refused (RUN holds a run) as was its --resume (no config.yaml). It says nothing was trained and names
    --overwrite, as Ctrl-C at that moment does; the command it names then runs."""
    import finetune.tools.train

    run, result, tiny, data = _stopped_out_of_memory(tmp_path, monkeypatch, finetune.tools.train, "build_setup")
    assert "Traceback" not in result.output, result.output
    torch_said = SAID.split(" (", 1)[1][:-1]      # torch's first sentences
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: out of memory ({torch_said}) before training: nothing was trained, {run} holds its scan and no "
        "checkpoint; start it again with the same command and --overwrite, a smaller --batch-size, --micro-batch N "
        "or a smaller --img-size")
    again = invoke("finetune", tiny, "--data", data, "--out", run, *_options(), "--overwrite", "--micro-batch", "4")
    assert again.exit_code == 0, again.output


def test_out_of_memory_in_a_resume_s_set_up_names_the_resume_in_smaller_passes(tmp_path, monkeypatch):
    """helper-106: `zoo finetune --resume RUN` out of memory in fit's set-up (the checkpoint or the model moved to a
    full GPU) said `start again with a smaller --batch-size ...`, which a resume refuses (changed batch_size). It
    says the run keeps its epochs and names the resume in passes of half the batch, which then runs."""
    import finetune.tools.train
    from finetune.engine import passes

    run, *_ = _stopped_out_of_memory(tmp_path, monkeypatch, passes, "train_forward")

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    with monkeypatch.context() as m:
        m.setattr(finetune.tools.train, "build_setup", no_memory)
        result = invoke("finetune", "--resume", run, "--workers", "0", "--quiet", "--no-export")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    torch_said = SAID.split(" (", 1)[1][:-1]
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: out of memory before training went on ({torch_said}): {run} keeps its epochs as they were; "
        f"continue in passes of fewer images with `zoo finetune --resume {run} --micro-batch 4`")
    with monkeypatch.context() as m:      # a --micro-batch above the batch of 8: its passes are 8 too, halved
        m.setattr(finetune.tools.train, "build_setup", no_memory)
        above = invoke("finetune", "--resume", run, "--micro-batch", "16", "--workers", "0", "--quiet", "--no-export")
    assert above.stderr.splitlines()[-1].endswith(f"`zoo finetune --resume {run} --micro-batch 4`"), above.output
    resumed = invoke("finetune", "--resume", run, "--micro-batch", "4", "--workers", "0", "--quiet", "--no-export")
    assert resumed.exit_code == 0, resumed.output


def _filled(command: str, **fill: str) -> list[str]:
    """The words after `zoo` of a ``command`` a line named, its placeholders (``fill``: N) filled in."""
    words = shlex.split(command)
    assert words[0] == "zoo", command
    return [fill.get(w, w) for w in words[1:]]


def _start_over(run, tiny, data, *more) -> str:
    """The start-over of the out-of-memory runs as their folder records it (``rerun.start_over_command``): their
    model, data, options (config.yaml) and --no-export, then the option the line names (it wins over the file)."""
    return shell_command("zoo", "finetune", tiny, "--data", data, "--out", run, "--overwrite", "--config",
                         run / "config.yaml", "--no-export", *more)


def _recorded(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _out_of_memory_in_a_pass(tmp_path, monkeypatch, *options: str):
    """(RUN, the CLI's line, the model's name, the data folder) of a 2-epoch run with ``options`` (after _options':
    they win) whose first training forward pass runs out of GPU memory (exit 1 asserted)."""
    from finetune.engine import passes

    run, result, tiny, data = _stopped_out_of_memory(tmp_path, monkeypatch, passes, "train_forward", *options)
    assert "Traceback" not in result.output, result.output
    return run, result.stderr.splitlines()[-1], tiny, data


def test_out_of_memory_names_the_fewest_images_a_training_batchnorm_takes_per_pass(tmp_path, monkeypatch):
    """helper-107: a pass of 4 images out of memory named half of it, `--micro-batch 2`, which a run whose BatchNorm
    trains (the MLP head's) refuses (a batch of 3 would leave a pass of 1 image: `--micro-batch 3 or more`): one round
    trip more. It names 3, the fewest the run takes (``passes.smaller_pass``; a resume out of memory in its set-up
    too), and that resume runs."""
    run, line, _, _ = _out_of_memory_in_a_pass(tmp_path, monkeypatch, "--head", "mlp", "--batch-size", "4")
    said = SAID.replace("of 8 image(s)", "of 4 image(s)")
    assert line == (f"zoo: error: {said}: before the first epoch ended; the run is in {run}; continue in passes of 3 "
                    f"images (the same steps) with `zoo finetune --resume {run} --micro-batch 3`")
    refused = invoke("finetune", "--resume", run, "--micro-batch", "2", "--workers", "0", "--quiet", "--no-export")
    assert refused.exit_code == 2 and "--micro-batch 3 or more" in refused.output, refused.output    # (half: refused)
    import finetune.tools.train

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    with monkeypatch.context() as m:     # the resume's set-up out of memory names them too (zoo.jobs.resume)
        m.setattr(finetune.tools.train, "build_setup", no_memory)
        again = invoke("finetune", "--resume", run, "--workers", "0", "--quiet", "--no-export")
    assert again.stderr.splitlines()[-1].endswith(f"`zoo finetune --resume {run} --micro-batch 3`"), again.output
    resumed = invoke("finetune", "--resume", run, "--micro-batch", "3", "--workers", "0", "--quiet", "--no-export")
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_out_of_memory_at_the_fewest_images_a_batchnorm_takes_names_a_new_run_that_runs(tmp_path, monkeypatch):
    """helper-107: passes of 2 images where the MLP head's BatchNorm trains cannot shrink (1 image leaves it one
    value per channel): the line said `--micro-batch 1`, refused. It says these passes are the fewest and names the
    new run into the same folder with the option that stops that layer training (`--head linear`), which runs."""
    run, line, tiny, data = _out_of_memory_in_a_pass(tmp_path, monkeypatch, "--head", "mlp", "--batch-size", "2")
    said = SAID.replace("of 8 image(s)", "of 2 image(s)")
    over = _start_over(run, tiny, data, "--head", "linear")     # (helper-118: was MODEL --data DIR, options unsaid)
    assert line == (f"zoo: error: {said}: the run is in {run}, and passes of 2 images are the fewest it takes "
                    "(fewer would leave a BatchNorm layer that trains a pass of one image): start it over with "
                    f"--head linear, a smaller --img-size or a smaller model (`{over}`, its other options as before; "
                    "or another --out to keep this run)")
    again = invoke(*_filled(over))       # pasted as it is: the run's own options, --head linear over the file's mlp
    assert again.exit_code == 0, again.output
    assert {k: _recorded(run)[k] for k in ("head", "batch_size", "epochs", "seed")} == {
        "head": "linear", "batch_size": 2, "epochs": 2, "seed": 3}


def test_out_of_memory_in_a_pass_of_one_image_names_a_new_run_that_runs(tmp_path, monkeypatch):
    """helper-107: a pass of one image out of memory said `the run is in RUN; start again with a smaller --img-size,
    or a smaller model`, and the same command with --img-size was refused (RUN holds a run; a resume refuses a
    changed img_size). It names the new run into the same folder (--overwrite), which runs."""
    run, line, tiny, data = _out_of_memory_in_a_pass(tmp_path, monkeypatch, "--micro-batch", "1")
    said = SAID.replace("of 8 image(s)", "of 1 image(s)")
    over = _start_over(run, tiny, data, "--img-size", "N")
    assert line == (f"zoo: error: {said}: the run is in {run}, and a pass of one image is the fewest: start it over "
                    f"with a smaller --img-size or a smaller model (`{over}`, its other options as before; or "
                    "another --out to keep this run)")
    without = invoke("finetune", tiny, "--data", data, "--out", run, *_options(), "--img-size", "24")
    assert without.exit_code != 0      # (what the line named before: refused, RUN holds a run)
    again = invoke(*_filled(over, N="24"))       # the run's own options (--micro-batch 1 among them), N filled
    assert again.exit_code == 0, again.output
    assert {k: _recorded(run)[k] for k in ("img_size", "micro_batch", "epochs")} == {
        "img_size": 24, "micro_batch": 1, "epochs": 2}


def test_out_of_memory_in_the_export_after_training_names_the_resume_that_writes_the_end(tmp_path, monkeypatch):
    """helper-107: out of memory while the run wrote its bundle, after training finished and saved, got the line
    of other commands (`start again with a smaller --batch-size ...`), as if the run were lost. It says training
    finished and is saved and names the resume, which trains nothing and writes the bundle and the page."""
    import zoo.jobs.finetune as job

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    options = [o for o in _options() if o != "--no-export"]
    with monkeypatch.context() as m:
        m.setattr(job, "_export", no_memory)
        result = invoke("finetune", tiny, "--data", data, "--out", run, *options)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    torch_said = SAID.split(" (", 1)[1][:-1]
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: out of memory after training ({torch_said}): training finished and is saved in {run}; write "
        f"its bundle and its page with `zoo finetune --resume {run}`")
    assert (run / "summary.json").is_file() and not (run / "export" / "model.safetensors").exists()
    resumed = invoke("finetune", "--resume", run, "--workers", "0", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "export" / "model.safetensors").is_file() and (run / "report.html").is_file()
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_out_of_memory_without_last_pt_names_a_start_over_that_runs(tmp_path, monkeypatch):
    """helper-112: out of memory where RUN has no checkpoints/last.pt (its write failed) said `the run is in RUN;
    start again with --micro-batch 4`, and that command was refused (RUN holds a run: --overwrite, or another --out).
    It names the new run into RUN with --overwrite (``rerun.start_over_command``), which runs as pasted."""
    from finetune.engine.runfolder import RunFolder

    run, _, tiny, data = _out_of_memory_in_a_pass(tmp_path, monkeypatch)
    (run / "checkpoints" / "last.pt").unlink()
    line = str(RunFolder(run).stopped(1, torch.OutOfMemoryError(TORCH_OOM), _Passes(8)))
    over = _start_over(run, tiny, data, "--micro-batch", "4")
    assert line.endswith(f"the run is in {run} without a checkpoint to continue from; start it over in passes of 4 "
                         f"images with `{over}` (its other options as before)"), line
    without = invoke("finetune", tiny, "--data", data, "--out", run, *_options(), "--micro-batch", "4")
    assert without.exit_code != 0      # (what the line named before: refused, RUN holds a run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("micro_batch: 0", "micro_batch: 8"))
    again = invoke(*_filled(over))       # pasted as it is; --micro-batch 4 wins over the file's (8: made so here)
    assert again.exit_code == 0, again.output
    assert {k: _recorded(run)[k] for k in ("micro_batch", "epochs", "seed")} == {"micro_batch": 4, "epochs": 2, "seed": 3}
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_the_resume_a_no_export_run_is_told_continues_it_without_a_bundle(tmp_path, monkeypatch):
    """helper-112: a run started with --no-export, out of memory (or Ctrl-C, any line naming the resume), was told
    `zoo finetune --resume RUN --micro-batch 4`, and that resume wrote a bundle at the end: the run folder did not
    remember --no-export, and the resume's default is to export. model.json records it, and a resume given neither
    --export nor --no-export goes on as the run was started (given one, as it says)."""
    run, line, _, _ = _out_of_memory_in_a_pass(tmp_path, monkeypatch)
    resume = f"zoo finetune --resume {run} --micro-batch 4"
    assert line.endswith(f"`{resume}`"), line
    resumed = invoke(*shlex.split(resume)[1:], "--workers", "0", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "summary.json").is_file() and not (run / "export").exists()
    assert json.loads((run / "model.json").read_text())["export"] is False


def test_a_start_over_after_out_of_memory_is_named_once_the_handed_over_writes_are_on_disk(tmp_path):
    """Out of memory in a pass at its floor names a new run into the same folder (``RunFolder.start_over``) which
    clears it; the line was returned while checkpoint 0 could still be on its way to the disk (a background write),
    so a start-over run at once in the same process (the suite's loaded machine) found a last.pt the old run wrote
    after the clearing: "already holds a run". The line now comes once the writes handed over are done."""
    import threading

    from finetune.engine.runfolder import RunFolder

    class AtTheFloor:
        pass_images = 1

        def refused(self, micro):
            return None

    folder, release, done = RunFolder(tmp_path / "run"), threading.Event(), []

    def slow_write():
        release.wait(30)
        done.append(True)

    folder._background.submit(slow_write)
    threading.Timer(0.2, release.set).start()
    err = folder.stopped(1, torch.OutOfMemoryError(TORCH_OOM), AtTheFloor())
    assert "a pass of one image is the fewest" in str(err) and done == [True]
