"""The run folder's writers: config.yaml, manifest.json, metrics.csv, curves.png, best weights,
checkpoints/last.pt, bad_files.txt, summary.json, confusion.csv, TensorBoard. Only the main process writes."""
from __future__ import annotations

import contextlib

import csv
import hashlib
import io
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

import torch

from finetune.core import distributed as ddp
from finetune.core.checkpoint import (BEST, HEAD_BEST, LAST, BackgroundWrites, load_checkpoint, save_checkpoint,
                                     save_weights)
from finetune.core.config import RESUME_FREE, FinetuneConfig, load_resume_config, save_config
from finetune.core.confusion import CONFUSION_CSV, FULL_MAX_CLASSES, confusion_csv_text
from finetune.core.errors import (CheckpointError, ConfigError, FinetuneError, Interrupted, OutOfMemory,
                                  memory_text)
from finetune.core.io import (atomic_write_text, json_safe, new_run_command, printable, printable_name,
                              read_json_object, resume_command, write_json)
from finetune.core.rerun import recorded_run, start_over_command
from finetune.core.monitor import TensorBoardLogger, write_curves
from finetune.data.files import class_key
from finetune.data.imageset import name_list
from finetune.engine.passes import smaller_pass

__all__ = ["RunFolder", "HISTORY_KEYS", "CHECKPOINT_FORMAT", "RESUME_FREE"]

HISTORY_KEYS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                "images_per_s", "data_wait")
CHECKPOINT_FORMAT = 1
# Options that may differ between a run and its resumption: FinetuneConfig's resume_free ones. device,
# gpu_normalize and decode move the augmentation draws (DeviceAugment, DeviceTransform draw on the device,
# the workers path per sample): changed on resume, the remaining epochs get other draws from the same
# distributions.

Log = Callable[[str], None]


class Passes(Protocol):
    """What :meth:`RunFolder.stopped` reads of a run's forward passes (``LoaderSteps``): the most images one takes,
    and whether the run refuses passes of ``micro`` images (the option that lifts it, or None)."""

    pass_images: int

    def refused(self, micro: int) -> str | None: ...


def _summary_json(summary: dict) -> str:
    """``summary`` as strict, indent=2 JSON with ``metrics.confusion`` one matrix row per line (indent=2 alone
    puts every number on its own line: 44 MB at 2,000 classes)."""
    doc = json_safe(summary)
    metrics = doc.get("metrics")
    rows = metrics.get("confusion") if isinstance(metrics, dict) else None
    if not rows:
        return json.dumps(doc, indent=2) + "\n"
    mark = "\0confusion"        # no class name or path holds a NUL: the placeholder is unique in the text
    doc = {**doc, "metrics": {**metrics, "confusion": mark}}
    matrix = "[\n" + ",\n".join("      " + json.dumps(row) for row in rows) + "\n    ]"
    return json.dumps(doc, indent=2).replace(json.dumps(mark), matrix, 1) + "\n"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist_name in ("zoo-finetune", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[dist_name] = None
    return out


def _files_hash(train_set, val_set) -> str:
    h = hashlib.sha256()
    for split, s in (("train", train_set), ("val", val_set)):
        for path, label in sorted(s.items):
            h.update(f"{split}\t{path}\t{s.classes[label]}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _classes_differ(run: Path, trained: list[str], found: list[str]) -> str:
    """Which classes the data lacks and which it has besides those ``run`` trained on (a few, then how many more)."""
    keys, found_keys = {class_key(c) for c in trained}, {class_key(c) for c in found}
    gone, new = [c for c in trained if class_key(c) not in found_keys], [c for c in found if class_key(c) not in keys]
    what = "; ".join(([f"not in the data: {name_list(gone)}"] if gone else [])
                     + ([f"not trained on: {name_list(new)}"] if new else [])) or "the same names in another order"
    return (f"the classes of the data differ from those {run} trained on ({what}); resume with the data folder it "
            "trained on, its class folders named as they were (rename them back), or start a new run")


class RunFolder:
    """One run's folder, or nothing at all (``path`` None, or a rank other than 0): every writer is then a
    no-op, so the training loop calls them unconditionally."""

    def __init__(self, path: str | Path | None, info: ddp.DistInfo | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.writes = self.path is not None and (info or ddp.DistInfo()).is_main
        self.tensorboard: TensorBoardLogger | None = None
        self._background = BackgroundWrites()

    # --- resume
    def load_resume(self, classes: list[str], config: FinetuneConfig) -> dict:
        """The checkpoint to continue from, checked against this run's classes and options.

        Raises:
            CheckpointError: missing/foreign checkpoint, other classes, the best weights missing. ConfigError:
                changed options, or an unfinished run given no epoch left to train.
        """
        if self.path is None:
            raise ConfigError("resume needs the run folder: pass run_dir")
        ckpt = load_checkpoint(self.path / LAST)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.path / LAST} was written by another version; start a new run")
        # By class_key: folders renamed into the other Unicode form since (copied through macOS) are the same classes.
        if [class_key(c) for c in ckpt["classes"]] != [class_key(c) for c in classes]:
            raise CheckpointError(_classes_differ(self.path, list(ckpt["classes"]), classes))
        done = int(ckpt["epoch"])
        if not ckpt.get("finished") and done >= int(config.epochs):   # it trained one more epoch and ended the run
            raise ConfigError(f"{self.path} has trained {done} epochs, and --epochs counts them all (here "
                              f"{config.epochs}: none is left): pass more than {done} to continue, or leave "
                              "--epochs out")
        current = config.to_dict()
        differ = sorted(k for k, v in ckpt["config"].items()
                        if k in current and k not in RESUME_FREE and current[k] != v)
        if differ:
            raise ConfigError(self._changed(differ, ckpt["config"], current))
        best = int((ckpt.get("early_stop") or {}).get("best_epoch", -1))     # (an epoch > 0: validated)
        if best > 0 and not (self.path / BEST).is_file():   # deleted: the run trained on, then had no best to export
            over = start_over_command(self.path)
            raise CheckpointError(f"{self.path / BEST} is missing, and only it holds the weights of the run's best "
                                  f"epoch so far (epoch {best}): put it back to continue the run, or start the run "
                                  f"over with `{over}`")
        return ckpt

    def _changed(self, differ: list[str], trained: dict, current: dict) -> str:
        """Why ``differ`` stops the resume: RUN/config.yaml edited since the checkpoint (the file holds the
        new value), else options given to the resume itself."""
        try:    # typed as the run reads it (plain YAML reads `lr: 1e-4` as the text '1e-4'), and read as the
            # resume read it: a resume-free option out of bounds (workers: 1000) does not hide an edit
            on_disk = load_resume_config(self.path / "config.yaml")[0].to_dict()
        except ConfigError:
            on_disk = {}
        edited = [k for k in differ if k in on_disk and on_disk[k] == current[k]]
        shown = ", ".join(f"{k}: {current[k]!r} (the checkpoint's: {trained[k]!r})" for k in (edited or differ))
        if edited:
            rec = recorded_run(self.path)     # (its model, data and flags; the config is the edited file)
            new_run = new_run_command("--config", self.path / "config.yaml", *rec.flags, "--out", "NEW",
                                      model=rec.model, data=rec.data)
            return (f"{self.path / 'config.yaml'} differs from the options {self.path / LAST} was trained with: "
                    f"{shown}; put the checkpoint's values back in config.yaml to continue the run, or train "
                    f"with the new ones in a new run (`{new_run}`)")
        return (f"cannot resume with changed option(s) {shown}: drop them (the run's config.yaml is used) or "
                "start a new run")

    def finished_note(self, epoch: int, stopped_early: bool, asked: int, trained: int) -> str | None:
        """What a resume of a run that had finished after ``epoch`` says: without summary.json (stopped after its
        last checkpoint) it writes the end of the training; ``--epochs`` (``asked``, not the ``trained`` it ran
        with) changes nothing, its LR schedule having ended, and summary.json's max_epochs stays ``trained``."""
        epochs = (f"--epochs {asked} does not {'extend' if asked > trained else 'change'} a finished run (its LR "
                  f"schedule ended; max_epochs stays {trained}): start a new run to train longer")
        if not (self.path / "summary.json").is_file():    # (no path: fit refuses resume without a run_dir)
            return (f"note: the training of this run had finished (after epoch {epoch}), not its end: this resume "
                    "trains nothing, and writes summary.json" + (f"; {epochs}" if asked != trained else ""))
        if asked == trained:
            return None
        return (f"note: this run had finished (after epoch {epoch}{', stopped early' if stopped_early else ''}): "
                f"resuming it trains nothing more, {epochs}")

    def refuse_existing_run(self) -> None:
        if self.writes and (self.path / LAST).exists():
            raise ConfigError(f"{self.path} already holds a run: continue it with resume=True (from the command "
                              f"line: `{self.resume_command()}` for a run it made), or pass another run_dir")

    def resume_command(self) -> str:
        """The command that continues this run, quoted to paste into a shell."""
        return resume_command(self.path)

    # --- writers
    def start(self, config: FinetuneConfig, train_set, val_set, device: torch.device, info: ddp.DistInfo,
              resume: bool, epoch: int = 0, in_effect: dict | None = None) -> None:
        """config.yaml (new runs), manifest.json (resumes are appended: each with the epoch it goes on after, its
        device, ``in_effect``, the setup's device options, and ``asked``, those the process was given: a resume's
        may differ from config.yaml; :meth:`summary` reads them), the TensorBoard writer."""
        if not self.writes:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:      # a file of that name, a file above it, no permission
            raise ConfigError(f"cannot use {self.path} as the run folder ({err.strerror or err}); pass a "
                              "run_dir that is a folder or does not exist yet") from None
        if not resume:
            save_config(config, self.path / "config.yaml")
        elif int(config.micro_batch):      # passes given to the resume (``resume_passes``): the next one keeps them
            self.record_passes(int(config.micro_batch))
        self._write_manifest(config, train_set, val_set, device, info, resume,
                             {"after_epoch": int(epoch), "device": str(device), "in_effect": in_effect,
                              "asked": {k: bool(getattr(config, k)) for k in in_effect or {}}})
        if config.tensorboard:
            self.tensorboard = TensorBoardLogger(self.path)

    def resume_passes(self, config: FinetuneConfig) -> FinetuneConfig:
        """The passes a resume of this run takes, one rule for ``fit(..., resume=True)`` and `zoo finetune --resume`
        (which hands fit config.yaml's options and the flags given): ``config``'s ``micro_batch`` when it gives one
        (> 0; :meth:`start` records it in config.yaml, so the next resume without one keeps it), else (0) those
        config.yaml records: a warm-up's that ran out of device memory (:meth:`record_passes`), an earlier resume's,
        the run's own. The passes change no step (same batches, same maths), only the memory a forward pass takes:
        they belong to the run on its machine, as the options config.yaml records do, not to one process. Whole
        batches again after passes were recorded: ``micro_batch`` of the batch size. A config.yaml missing or
        unreadable records none (the checkpoint check says what is wrong with the folder)."""
        if int(config.micro_batch) or self.path is None:
            return config
        try:
            recorded = int(load_resume_config(self.path / "config.yaml")[0].micro_batch)
        except ConfigError:
            return config
        return config.replace(micro_batch=recorded) if recorded else config

    def record_passes(self, micro: int) -> None:
        """config.yaml records ``--micro-batch micro``, where a resume reads the run's options
        (:meth:`resume_passes`): the passes a warm-up that ran out of device memory settled on (``LoaderSteps``),
        or those given to a resume. Only that option changes (a resume's other flags, e.g. ``--workers``, stay its
        own); last.pt records it with the run's config from the next epoch on. A config.yaml gone or damaged
        (edited, a resume through the API needs none) stays as it is: the run goes on in these passes."""
        if not self.writes:
            return
        path = self.path / "config.yaml"
        try:
            saved, _ = load_resume_config(path)
        except ConfigError:
            return
        if int(saved.micro_batch) != int(micro):
            save_config(saved.replace(micro_batch=int(micro)), path)

    def _write_manifest(self, config, train_set, val_set, device, info, resume: bool, where: dict) -> None:
        path = self.path / "manifest.json"
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.argv), **where}
        if resume and path.is_file():
            manifest = read_json_object(path)       # {} when damaged; a "resumed" that is no list: started anew
            resumed = manifest.get("resumed")
            manifest["resumed"] = [*(resumed if isinstance(resumed, list) else []), entry]
        else:
            manifest = {"created": entry["time"], "command": entry["command"], "seed": config.seed,
                        "files_sha256": _files_hash(train_set, val_set),
                        "images": {"train": len(train_set.items), "val": len(val_set.items)},
                        "classes": list(train_set.classes), "versions": _versions(),
                        "world_size": info.world_size, **where}
        write_json(path, manifest, indent=2)

    def metrics(self, history: list[dict]) -> None:
        """After every epoch: metrics.csv (cheap) and TensorBoard."""
        if not self.writes:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(HISTORY_KEYS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(history[-1])

    def curves(self, history: list[dict], best_epoch: int | None) -> None:
        if self.writes:
            write_curves(history, self.path / "curves.png", best_epoch=best_epoch)

    # The weights files and last.pt are written in the background (``BackgroundWrites``): pass values that
    # nothing changes afterwards; ``flush`` before anything reads them, and before the next epoch's.
    def best(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if self.writes:
            self._background.submit(lambda: save_weights(self.path / BEST, state, metadata))

    def head(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """The head phase's best weights, kept for the head guard of a run that is resumed later."""
        if self.writes:
            self._background.submit(lambda: save_weights(self.path / HEAD_BEST, state, metadata))

    def checkpoint(self, state: dict) -> None:
        if self.writes:
            self._background.submit(lambda: save_checkpoint(self.path / LAST, {"format": CHECKPOINT_FORMAT,
                                                                                **state}))

    def flush(self) -> None:
        """Wait until the weights and checkpoints handed over so far are on disk. Raises CheckpointError
        when one could not be written (the previous version of that file is intact)."""
        self._background.wait()

    def decode_failures(self, failed: dict[str, str], say: Log) -> None:
        """Images that passed the scan but failed to decode while training (each was dropped from its
        batch): one warning, and appended to ``bad_files.txt`` (absolute paths)."""
        if not failed:
            return
        names = ", ".join(printable_name(os.path.basename(p)) for p in list(failed)[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        say(f"warning: {len(failed)} image(s) failed to load during training and were skipped: {names}{more}"
            + (" (see bad_files.txt)" if self.writes else ""))
        if not self.writes:
            return
        path = self.path / "bad_files.txt"
        try:
            old = path.read_text(encoding="utf-8")
        except OSError:
            old = ""
        new = [f"{printable(p)}\t{printable(r)} (failed to load during training)\n" for p, r in failed.items()
               if f"{printable(p)}\t" not in old]
        atomic_write_text(path, old + "".join(new))

    def summary(self, summary: dict) -> None:
        """summary.json, and confusion.csv: the validation confusion matrix whole (``summary["metrics"]
        ["confusion"]``, rows: true class, in ``summary["classes"]`` order), named by summary.json's
        ``confusion_csv``. Up to ``FULL_MAX_CLASSES`` classes summary.json keeps the matrix too, one row per
        line; above, it leaves it out (2,000 classes: 4 million numbers) and readers take the CSV. A run whose
        epochs ran with other device options in another process (begun on the CPU, resumed on CUDA) gets
        ``in_effect_by_epochs`` (:func:`in_effect_by_epochs`): ``in_effect`` is the last process's."""
        if not self.writes:
            return
        if parts := in_effect_by_epochs(read_json_object(self.path / "manifest.json"), summary.get("epochs_run")):
            summary = {**summary, "in_effect_by_epochs": parts}
        metrics = summary.get("metrics") or {}
        conf = metrics.get("confusion")
        if conf is not None:
            atomic_write_text(self.path / CONFUSION_CSV, confusion_csv_text(summary.get("classes") or [], conf))
            summary = {**summary, "confusion_csv": CONFUSION_CSV}
            if len(conf) > FULL_MAX_CLASSES:
                summary["metrics"] = {k: v for k, v in metrics.items() if k != "confusion"}
        atomic_write_text(self.path / "summary.json", _summary_json(summary))

    def close(self) -> None:
        """The TensorBoard writer closed (the weights and checkpoints: :meth:`flush`)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def interrupted(self, epoch: int) -> Interrupted:
        """What Ctrl-C (or SIGTERM) in ``epoch`` of the run, or after its last one, says: which epochs are
        saved, and how to continue."""
        if self.path is None:
            return Interrupted(f"interrupted in epoch {epoch}; nothing was saved: pass a run folder to be able "
                               "to resume")
        if not self.writes:      # another rank under torchrun: rank 0 says what it saved (QA)
            return Interrupted(f"interrupted: rank 0 saves {self.path}; continue with `{self.resume_command()}`")
        saved = self.saved_epoch(epoch)
        done = f"epochs up to {saved} are saved in" if saved > 0 else "before the first epoch ended; the run is in"
        return Interrupted(f"interrupted: {done} {self.path}; continue with `{self.resume_command()}`")

    def stopped(self, epoch: int, why: BaseException, passes: Passes) -> FinetuneError:
        """What ends the run in ``epoch`` when ``why`` stopped it: Ctrl-C or SIGTERM (:meth:`interrupted`), or the
        device out of memory in a forward pass of ``passes.pass_images`` images (:func:`out_of_memory`), with what is
        saved and the resume command in passes of half as many images (``--micro-batch``: the same steps), or of the
        fewest above that the run takes (``passes.smaller_pass``: 3 where a BatchNorm layer that trains refuses 2).
        Where no pass can be smaller (one image; 2 or 3 for such a layer) the run can only start over, on less
        memory: ``--bn eval`` or ``--head linear`` (that layer's), a smaller ``--img-size`` or a smaller model, which
        a resume refuses: the line names the new run into the same folder (``--overwrite``), as its own line for an
        existing folder does (``load_resume``)."""
        if isinstance(why, KeyboardInterrupt):
            return self.interrupted(epoch)
        per_pass = passes.pass_images
        smaller, way = smaller_pass(per_pass, passes.refused)
        if smaller is None:
            return out_of_memory(why, per_pass, self.start_over(per_pass, way))
        if self.path is None:
            return out_of_memory(why, per_pass, f"nothing was saved; start again with --micro-batch {smaller}")
        go_on = (f"continue in passes of {smaller} images (the same steps) with "
                 f"`{resume_command(self.path, '--micro-batch', smaller)}`")
        if not self.writes:      # another rank under torchrun (often the one whose line is seen): as interrupted()
            return out_of_memory(why, per_pass, f"rank 0 saves {self.path}; {go_on}")
        self.close()
        done = self.saved_epoch(epoch)      # (once written: epoch 0's checkpoint may still be, in epoch 1)
        if not (self.path / LAST).is_file():     # (its write failed): nothing to resume, RUN holds a run all the same
            over = start_over_command(self.path, "--micro-batch", smaller)
            return out_of_memory(why, per_pass, f"the run is in {self.path} without a checkpoint to continue from; "
                                                f"start it over in passes of {smaller} images with `{over}` (its other "
                                                "options as before)")
        saved = f"epochs up to {done} are saved in" if done > 0 else "before the first epoch ended; the run is in"
        return out_of_memory(why, per_pass, f"{saved} {self.path}; {go_on}")

    def start_over(self, per_pass: int, way: str | None) -> str:
        """What to do after a pass of ``per_pass`` images, the fewest the run takes, ran out of memory (``way``: the
        option that lets a BatchNorm layer take fewer, ``--bn eval``, ``--head linear``; ``--no-sync-bn``, that lets
        the run take passes at all: ``setup.refused_passes``)."""
        fewest = ("a pass of one image is the fewest" if way is None else "--sync-bn with --bn train takes no "
                  "passes of fewer images (every process would have to take as many)" if way == "--no-sync-bn" else
                  f"passes of {per_pass} images are the fewest it takes (fewer would leave a BatchNorm layer that "
                  "trains a pass of one image)")
        first = way.split() if way else ["--img-size", "N"]
        others = "a smaller --img-size or a smaller model" if way is None else \
            f"{way}, a smaller --img-size or a smaller model"
        if self.path is None:
            return f"nothing was saved, and {fewest}; start again with {others}"
        over = start_over_command(self.path, *first)
        where = f"rank 0 saves {self.path}" if not self.writes else f"the run is in {self.path}"
        if self.writes:
            self.close()
            with contextlib.suppress(Exception):    # (a failed write: the start-over replaces the run all the same)
                self.flush()       # the writes handed over are on disk before the line names the start-over, which
                # clears the folder: one still running would write last.pt into the new run (in one process, refused)
        return (f"{where}, and {fewest}: start it over with {others} (`{over}`, its other options as before; "
                "or another --out to keep this run)")

    def saved_epoch(self, fallback: int) -> int:
        """The epoch recorded in last.pt (what a resume continues after)."""
        try:
            self.flush()
        except Exception:   # the last write failed: last.pt is the one before it
            pass
        try:
            return int(load_checkpoint(self.path / LAST, mmap=True)["epoch"])    # (its tensors neither read nor hashed)
        except Exception:  # an unreadable checkpoint: say the epoch before the interrupted one
            return max(0, fallback - 1)


def in_effect_by_epochs(manifest: dict, epochs_run: object) -> list[dict] | None:
    """The device options each run of epochs trained with, from manifest.json's processes (the first, then each
    resume from the epoch after the one it went on after: it trains those again): ``[{"epochs": [1, 2], "device":
    "cpu", "in_effect": {...}, "asked": {...}}, {"epochs": [3, 8], "device": "cuda:0", ...}]`` (``asked``: the options
    given, where recorded). None where one device and set of options trained them all, or the manifest does not
    say (a run begun before it recorded them, a damaged file)."""
    starts: list[list] = []
    for entry in [manifest, *(manifest.get("resumed") if isinstance(manifest.get("resumed"), list) else [])]:
        after = entry.get("after_epoch") if isinstance(entry, dict) else None
        if not isinstance(after, int) or not isinstance(entry.get("in_effect"), dict):
            return None
        asked = {"asked": entry["asked"]} if isinstance(entry.get("asked"), dict) else {}
        starts = [s for s in starts if s[0] <= after] + [[after + 1, entry.get("device"), entry["in_effect"], asked]]
    if not isinstance(epochs_run, int) or not starts or starts[0][0] != 1:
        return None
    parts: list[dict] = []
    for (first, device, used, asked), nxt in zip(starts, [s[0] for s in starts[1:]] + [epochs_run + 1]):
        # (a process that did not record ``asked``, a run begun before it was, is alike in it to any)
        if parts and (parts[-1]["device"], parts[-1]["in_effect"]) == (device, used) and \
                asked.get("asked", parts[-1].get("asked")) == parts[-1].get("asked", asked.get("asked")):
            parts[-1]["epochs"][1] = min(nxt - 1, epochs_run)
        elif first <= min(nxt - 1, epochs_run):
            parts.append({"epochs": [first, min(nxt - 1, epochs_run)], "device": device, "in_effect": used, **asked})
    return parts if len(parts) > 1 else None


def out_of_memory(err: BaseException, per_pass: int, then: str) -> OutOfMemory:
    """One line for ``err`` (torch's ``OutOfMemoryError``, Python's ``MemoryError``): what was tried and what the
    device holds (``memory_text``), the forward pass's images and ``then``: what is saved and what to do."""
    return OutOfMemory(f"out of memory in a forward pass of {per_pass} image(s) ({memory_text(err)}): {then}")
