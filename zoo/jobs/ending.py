"""What a ``zoo finetune`` run says when it is cut short: before its training (nothing to resume, judged by what is
on disk), or in the end written after its training (the bundle, then report.html): training finished and is saved
in the run folder, and only that end is missing."""
from __future__ import annotations

from pathlib import Path

from finetune.core.errors import FinetuneError, Interrupted, OutOfMemory, memory_text
from finetune.core.io import resume_command, shell_command
from zoo.outdir import folder_kind

__all__ = ["cut_short_after_training", "interrupted_before_training"]


def cut_short_after_training(why: BaseException, run_dir: Path, bundle: bool) -> FinetuneError:
    """The line for Ctrl-C (or SIGTERM), or the device out of memory (``why``: ``errors.stops_run``), while the run
    in ``run_dir`` wrote its end (``bundle``: its bundle not written yet). Ctrl-C names the commands that write each
    part (``zoo export``, ``zoo report``); out of memory names the resume (``io.resume_command``), which trains
    nothing and writes what the end left unwritten (``zoo.jobs.resume``: the bundle unless RUN/export holds the
    run's final export, then the page): the one command to run again, on the device once it has the memory."""
    if not isinstance(why, KeyboardInterrupt):
        return OutOfMemory(f"out of memory after training ({memory_text(why)}): training finished and is saved in "
                           f"{run_dir}; write {'its bundle and ' if bundle else ''}its page with "
                           f"`{resume_command(run_dir)}`")
    export = f"its bundle with `{shell_command('zoo', 'export', run_dir)}` and " if bundle else ""
    return Interrupted(f"interrupted after training: {run_dir} holds the finished run; write {export}its page with "
                       f"`{shell_command('zoo', 'report', run_dir)}`")


def interrupted_before_training(run_dir: Path | None, memory: BaseException | None = None) -> FinetuneError:
    """Ctrl-C (or SIGTERM), or the device out of ``memory``, that reached ``zoo.jobs.finetune.run_finetune``'s own
    handler: judged by what is on disk, not where it was caught. A checkpoint (checkpoints/last.pt) is resumed,
    never started over; else the folder claimed is gone again (or empty), or holds what a set-up cut short wrote
    (scan.json, model.json)."""
    what, smaller = ("interrupted", "") if memory is None else (f"out of memory ({memory_text(memory)})", ", a smaller "
                                                                "--batch-size, --micro-batch N or a smaller --img-size")
    kind = OutOfMemory if memory else Interrupted
    if run_dir is not None and (run_dir / "checkpoints" / "last.pt").is_file():
        return kind(f"{what}: {run_dir} holds its checkpoint; continue with `{resume_command(run_dir)}`")
    if run_dir is not None and folder_kind(run_dir) not in ("absent", "empty"):
        return kind(f"{what} before training: nothing was trained, {run_dir} holds its scan and no checkpoint; start "
                    f"it again with the same command and --overwrite{smaller}")
    return Interrupted("interrupted before training: nothing was trained or saved; run the same command again to "
                       "start it")
