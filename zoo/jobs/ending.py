"""What a ``zoo finetune`` run says when the end written after its training (the bundle, then report.html) is cut
short: training finished and is saved in the run folder, and only that end is missing."""
from __future__ import annotations

from pathlib import Path

from finetune.core.errors import FinetuneError, Interrupted, OutOfMemory, memory_text
from finetune.core.io import resume_command, shell_command

__all__ = ["cut_short_after_training"]


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
