"""The ``zoo`` click group and its error handling; the command modules add their commands to ``cli``.

Kept apart from ``zoo/cli/__init__.py`` so that the command modules import this module, and the package
imports them, without an import cycle.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time

import click

from finetune.core.errors import FinetuneError, is_out_of_memory, memory_text
from finetune.core.host import launcher_count
from finetune.core.io import no_room, printable
from finetune.core.signals import sigterm_as_interrupt
from zoo import __version__, process
from zoo.cli import console
from zoo.errors import UsageError, ZooError

__all__ = ["cli", "ZooGroup"]

RANK_GRACE_S = 5.0     # see _rank_0_ended_it; ZOO_RANK_GRACE_S sets it (a loaded machine, a slow shared disk)
# The commands that run under torchrun (DDP over its processes); any other, started by torchrun on several
# processes, is refused with one line: each rank ran all of it, writing the same folder (QA: `zoo lr-find`'s
# rank 1 wrote into --out before rank 0 had claimed it, which rank 0 then refused as a stranger's folder;
# `zoo sweep` ran every trial twice, each rank printing and appending to one results.jsonl).
ON_SEVERAL_PROCESSES = frozenset({"finetune"})


class ZooGroup(click.Group):
    """Maps library errors to one line + exit code; keeps commands in the order they were added.

    Every line goes through ``zoo.cli.console.echo``: a closed pipe ends a read-only command quietly
    (exit 0) and never stops a training one; a run's lines also land in its log.txt.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["zoo.args"] = list(args)     # the command line, for RUN/log.txt
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        asks_help = any(a in ctx.help_option_names for a in rest)     # (reads, writes nothing: let it through)
        if command is not None and command.name not in ON_SEVERAL_PROCESSES and not asks_help \
                and process.under_torchrun():
            raise UsageError(f"zoo {command.name} runs in one process: start it without torchrun (only zoo "
                             f"finetune trains on several processes)")
        return name, command, rest

    def invoke(self, ctx: click.Context):
        process.keep_freed_memory()      # process-wide settings belong to the entry point (zoo.process)
        process.fewer_collections()
        process.threads_within_quota()
        # SIGTERM (a scheduler, torchrun stopping the other ranks) ends every command as Ctrl-C does: its
        # finally blocks run and it says what was saved, not a silent exit 143
        with console.session(ctx.meta.get("zoo.args", [])), sigterm_as_interrupt():
            return self._invoke(ctx)

    def _memory_advice(self, ctx: click.Context) -> str:
        """What to change after the device ran out of memory: the options of the command run that take less of it
        (zoo eval has no --img-size, zoo export no --batch-size: naming them got the command refused)."""
        command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
        takes = {o for p in (command.params if command is not None else ()) for o in getattr(p, "opts", ())}
        ways = [way for option, way in (("--batch-size", "a smaller --batch-size"),
                                        ("--micro-batch", "--micro-batch (the same steps in passes of fewer images)"),
                                        ("--img-size", "a smaller --img-size")) if option in takes]
        if not ways:
            return "free the device's memory (other processes on it) and start again, or use a larger device"
        return "start again with " + (", ".join(ways[:-1]) + " or " if len(ways) > 1 else "") + ways[-1]

    def _invoke(self, ctx: click.Context):
        rank = process.launcher_rank()
        main, shared = rank == 0, process.under_torchrun()    # (a RANK without torchrun: every rank says it)
        try:
            return self._handled(ctx, main, shared)
        except _Failed as failed:
            if main or not shared:      # said while the error is handled: a stop put off then cannot cut it short
                lines = [f"zoo: error: {failed}"]
                if shared and failed.code == 130:    # stopped (its run saved): by torchrun, once another rank ended?
                    from finetune.core import lastwords   # lazy: torch, for a stopped torchrun job only
                    if peers := lastwords.peers_own_errors(launcher_count("WORLD_SIZE")):
                        said, goes_on = peers      # (their command is the way on: this line's is cut, one way)
                        lines = [f"zoo: error: {printable(said)}", *(map(_said_above, lines) if goes_on else lines)]
                with contextlib.suppress(console.OutputClosed):
                    for line in lines:
                        console.echo(line, err=True)
                ctx.exit(1 if len(lines) > 1 else failed.code)      # (another rank's error ended the job)
            said = failed
        # another rank under torchrun, once the handling is over: torchrun's SIGTERM, put off during it
        # (finetune.core.signals), is what ends _rank_0_ended_it's wait. Its line is left for rank 0 first, which
        # says it where it meets this rank's end in a collective (ddp.raise_if_peer_lost), or is stopped by torchrun.
        # Stopped (130: a Ctrl-C, torchrun's stop) it leaves "", no reason of its own: rank 0's wait for words ends
        from finetune.core.lastwords import leave_word    # lazy: torch, for a torchrun rank's failure only
        leave_word("" if said.code == 130 else said.usage.format_message() if said.usage is not None else str(said))
        if said.code == 130 or _rank_0_ended_it():   # 130: rank 0 says what is saved
            ctx.exit(said.code)
        if said.usage is not None:
            raise said.usage
        with contextlib.suppress(console.OutputClosed):
            console.echo(f"zoo: error (rank {rank}): {said}", err=True)
        ctx.exit(said.code)

    def _handled(self, ctx: click.Context, main: bool, shared: bool):
        """The command run, its errors turned into exits and :class:`_Failed` (one line to say, in ``_invoke``)."""
        def fail(message: str, code: int):
            raise _Failed(message, code)

        debug = os.environ.get("ZOO_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except console.OutputClosed:
            ctx.exit(0)      # the reader went away (`zoo list | head`): nothing more to say
        except click.ClickException as err:      # usage: click prints it, on rank 0 (see _rank_0_ended_it)
            if not main and shared:
                raise _Failed("", err.exit_code, err) from None
            raise
        except (ZooError, FinetuneError) as err:
            if debug:
                raise
            fail(printable(str(err)), getattr(err, "exit_code", 1))   # one line, whatever names it holds
        except KeyboardInterrupt:
            if debug:
                raise
            with contextlib.suppress(console.OutputClosed):
                if main or not shared:
                    console.echo("zoo: interrupted", err=True)
            ctx.exit(130)
        except (MemoryError, RuntimeError) as err:     # a batch too big for the device (not zoo finetune's steps:
            if debug or not is_out_of_memory(err):     # its runs say what is saved, finetune.engine.runfolder)
                raise
            fail(f"out of memory ({memory_text(err)}): {self._memory_advice(ctx)}", 1)
        except OSError as err:
            if console.is_broken_pipe(err) and err.filename is None:
                # a write to stdout/stderr outside console.echo (a library's own print) met a closed pipe
                console.pipe_closed()
                ctx.exit(0)
            if debug:
                raise
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            if err.errno == errno.ENOSPC:
                fail(f"no space left on device while writing{where}: free some disk space "
                     "or write elsewhere (--out, ZOO_HOME)", 1)
            if no_room(err):     # a quota, a file-size limit (FAT32, ulimit -f), a read-only mount
                fail(f"{err.strerror} while writing{where}: write elsewhere (--out, ZOO_HOME)"
                     + (" or free some space under your quota" if err.errno == errno.EDQUOT else ""), 1)
            if err.errno == errno.ENAMETOOLONG:    # a name no file can have (QA: "...; set ZOO_DEBUG=1")
                fail(f"{err.strerror}{where}: a name in the path is longer than the file system takes (255 bytes "
                     "on most); shorten it", 1)
            if err.errno in (errno.EACCES, errno.EPERM):     # (a review: a folder the user may not enter)
                fail(f"{err.strerror}{where}: this user may not use that path; change its permissions (or ask "
                     "its owner), or choose another (--out, ZOO_HOME)", 1)
            fail(f"{err.strerror or err}{where}; set ZOO_DEBUG=1 for details", 1)


class _Failed(Exception):
    """A command's error as its one line (``usage``: click's own, which click prints), and its exit code."""

    def __init__(self, message: str, code: int, usage: click.ClickException | None = None):
        super().__init__(message)
        self.code, self.usage = code, usage


def _said_above(line: str) -> str:
    """Rank 0's ``line`` (`interrupted: ...`, its run saved) up to the clause that names its command (`...`), pointing
    to the line above it, whose command goes on (``lastwords.names_a_way_on``); as it is where it names none."""
    head, tick, _ = line.partition("`")
    saved, cut, _ = head.rpartition("; ")
    return f"{saved}; continue as the line above says" if tick and cut else line


def _grace() -> float:
    try:
        return max(0.0, float(os.environ.get("ZOO_RANK_GRACE_S", RANK_GRACE_S)))
    except ValueError:
        return RANK_GRACE_S


def _rank_0_ended_it() -> bool:
    """Under torchrun (RANK) rank 0 alone says why a command failed: every rank meets the same error (the same
    options and data, or rank 0's refusal shared by ``ddp.entered_on_main``), and N copies of the line read as N
    problems. Another rank waits up to ``RANK_GRACE_S`` for torchrun to stop it, which it does once rank 0 has
    exited (with its line; a rank that exited first would get rank 0 stopped before it said a word). True when
    it was stopped (SIGTERM, as Ctrl-C): nothing to add. False when rank 0 went on: the error is this rank's
    own, and it says it. Each rank exits with its own code."""
    try:
        time.sleep(_grace())
    except KeyboardInterrupt:
        return True
    return False


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="zoo")
@click.option("--registry", "registry", type=click.Path(dir_okay=False), envvar="ZOO_REGISTRY",
              help="Extra registry YAML with your own entries (same schema); also ZOO_REGISTRY.")
@click.pass_context
def cli(ctx: click.Context, registry: str | None) -> None:
    """A zoo of pretrained vision models, and the lecture's finetuning recipe as one command.

    \b
    Examples:
      zoo list                               # the curated models, cached or not
      zoo pull resnet50                      # download + verify + cache as safetensors
      zoo finetune resnet50 --data ./photos  # train a classifier on your image folders
      zoo predict runs/resnet50-*/export cat.jpg
      zoo demo                               # the whole journey offline, on an embedded dataset

    Shell completion: eval "$(_ZOO_COMPLETE=bash_source zoo)"  (zsh: zsh_source, fish: fish_source)
    """
    ctx.ensure_object(dict)
    if registry:
        os.environ["ZOO_REGISTRY"] = registry
