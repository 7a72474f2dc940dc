"""``zoo finetune`` orchestration: validate the data, resolve and build the model, write ``model.json``,
run ``finetune.fit``, export a bundle. The CLI (``zoo.cli.finetune``) only parses options and prints.

Order matters: the image folder is scanned (and fatal data problems reported) before any model is built
or downloaded, so a typo in ``--data`` costs a second, not a download.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

import torch

from finetune.core import distributed as ddp
from finetune.tools import diagnostics
from finetune.core.config import FinetuneConfig
from finetune.core.confusion import FULL_MAX_CLASSES, SHOWN_CLASSES
from finetune.data import scan_folder, with_input_size, write_scan
from finetune.data.imageset import name_list
from finetune.data.scan import IMBALANCE_ADVICE
from finetune.tools.doctor import exclude_items, exclude_list_text, read_exclude_file
from finetune.core.errors import is_out_of_memory, stops_run
from finetune.core.policy import batchnorm_batch, lr_unused, parse_freeze
from finetune.tools.features import FeatureCache
from finetune.core.io import atomic_write_text, json_safe, printable_name, shell_command, write_json
from finetune.core.recipe import check_batchnorm_batch, check_input_size, prepare_model
from finetune.engine import check_machine, idle_gpus_note, resolve_device
from finetune.tools.train import fit
from zoo import build as zbuild, process
from zoo.jobs import report as zreport
from zoo.jobs.ending import cut_short_after_training, interrupted_before_training
from zoo.bundle import export_run
from zoo.cache import features_dir, read_manifest, scan_memo
from zoo.errors import RegistryError, UsageError, ZooError
from zoo.outdir import check_outside, claim_out, default_out, folder_kind
from zoo.registry import weights_tag
from zoo.resolve import check_stages
from zoo.hub import resolve_early, resolve_entry
from zoo.network import meta_network

__all__ = ["RunOutcome", "default_run_dir", "feature_cache", "scan_lines", "scan_on_main", "build_for_training",
           "check_batch_early", "model_info", "run_finetune", "run_data_config", "MODEL_JSON", "EXCLUDE_TXT"]

MODEL_JSON = "model.json"
EXCLUDE_TXT = "exclude.txt"      # paths (relative to the data folder) left out by --exclude
EXPORT_WAIT_S = 300.0          # how long the run's own export waits for another process writing RUN/export
Log = Callable[[str], None]


@dataclass
class RunOutcome:
    """What a ``zoo finetune`` call produced (None fields: not applicable on this rank / this run)."""
    run_dir: Path | None
    result: Any = None              # finetune.engine.FitResult
    export_dir: Path | None = None
    overfit: Any = None             # finetune.tools.diagnostics.OverfitResult with --overfit-batches
    scan: Any = None                # finetune.data.ScanReport of the data it trained on


def _slug(name: str) -> str:
    """A model name as a folder name: "timm:resnet50.a1_in1k" -> "timm-resnet50.a1_in1k"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def default_run_dir(model_name: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<YYYYmmdd-HHMMSS>`` (``zoo.outdir.default_out``: a numeric suffix when two runs start in
    the same second)."""
    return default_out(root, _slug(model_name))


def scan_lines(report, config: FinetuneConfig | None = None) -> list[str]:
    """The scan summary the CLI prints: layout and what was held out, the counts per split and class, skipped
    files, warnings. Above ``FULL_MAX_CLASSES`` classes only the ``SHOWN_CLASSES`` with the fewest training images
    get a line, then one line for the rest (scan.json in the run folder has every class)."""
    counts = report.counts()
    split = "train/val folders" if report.layout == "split" else _held_out(report)
    sizes = " / ".join(f"{len(s)} {name}" for name, s in report.sets().items())
    lines = [f"data: {report.root} ({split}): {len(report.classes)} classes, {sizes} images"]
    shown = report.classes
    if len(shown) > FULL_MAX_CLASSES:
        shown = sorted(shown, key=lambda c: [counts[name][c] for name in counts])[:SHOWN_CLASSES]
        lines.append(f"  the {len(shown)} classes with the fewest training images:")
    for cls in shown:
        per = ", ".join(f"{name} {counts[name][cls]}" for name in counts)
        lines.append(f"  {cls}: {per}")
    if len(shown) < len(report.classes):
        listed = set(shown)
        rest = sorted(n for c, n in counts["train"].items() if c not in listed)
        each = f"{rest[0]} to {rest[-1]} training images" if rest[0] != rest[-1] else \
            f"{rest[0]} training image{'s' if rest[0] != 1 else ''}"
        lines.append(f"  ... and {len(rest)} more classes, {each} each")
    # skipped files among them (once, with bad_files.txt)
    lines += [f"warning: {w}" for w in scan_warnings(report, config)]
    return lines


def scan_warnings(report, config: FinetuneConfig | None = None) -> list[str]:
    """The scan's warnings for a run with ``config``: one that already balances the classes (``--sampler
    balanced`` or ``--class-weights auto``) is not advised to add the other, which would count the imbalance twice."""
    chosen = None if config is None else ("--sampler balanced" if config.sampler == "balanced" else
                                          "--class-weights auto" if config.class_weights == "auto" else None)
    if chosen is None:
        return list(report.warnings)
    return [w.replace(IMBALANCE_ADVICE, f" ({chosen} weighs them alike)") for w in report.warnings]


def _held_out(report) -> str:
    """What a flat folder's split held out: the fraction asked when that is what came out; else what did
    (val_split is rounded per class, and a class of 2 or more images holds out at least 1)."""
    n_val, n = len(report.val), len(report.train) + len(report.val)
    asked, seed = report.val_split, f"seed {report.seed}"
    if asked is None or not n or round(100 * n_val / n) == round(100 * asked):
        return f"flat folder, {asked or n_val / max(n, 1):.0%} held out per class ({seed})"
    return (f"flat folder, {n_val / n:.0%} held out: {n_val} of {n} images, as val_split {asked:g} is rounded per "
            f"class with at least 1 image of each class that has 2 or more; {seed}")


def model_info(entry, classes: list[str], config: FinetuneConfig, pretrained: bool,
               builder_kwargs: dict[str, Any] | None = None, export: bool = True) -> dict[str, Any]:
    """The ``model.json`` contract (docs/internals.md): enough to rebuild the finetuned model for export, and
    where its weights came from: ``source_sha256`` is the digest of the file as downloaded or imported,
    ``source_weights_sha256`` that of the cached safetensors; ``pretrained_cfg`` (tag, licence, paper, source) is
    the registry entry's, for the bundle's config.json."""
    source, digest, weights_digest = None, None, None
    if pretrained and entry.sources:
        src = entry.sources[0]
        source, digest = src.id(), src.sha256
        manifest = read_manifest(entry.name) or {}
        # The cache records what was actually loaded (trust-on-first-use entries have no pinned digest).
        # (a file imported from a path that is not UTF-8: its surrogates escaped, model.json being UTF-8)
        source = printable_name(str(manifest["source"])) if manifest.get("source") else source
        digest = manifest.get("sha256_download") or digest
        weights_digest = manifest.get("sha256")
    cfg = {"tag": weights_tag(entry), "license": entry.license, "paper_ids": entry.paper or None,
           "source": source} if pretrained else {}   # random init: no weights to credit
    return {
        "model": entry.name, "builder": entry.builder, "builder_kwargs": dict(builder_kwargs or {}),
        "source": source, "source_sha256": digest, "source_weights_sha256": weights_digest,
        "pretrained": pretrained, "pretrained_cfg": {k: v for k, v in cfg.items() if v is not None},
        "stages": [list(s) for s in entry.stages], "classifier": entry.classifier,
        "classes": list(classes), "num_classes": len(classes), "export": export,    # (--no-export: its resume too)
        "data_config": json_safe(run_data_config(entry, config)),
        "head": {"kind": config.head, "hidden": config.mlp_hidden, "dropout": config.mlp_dropout,
                 "activation": config.mlp_activation},
    }


def _export(run_dir: Path, log: Log) -> Path:
    # RUN/export belongs to the run: a re-export replaces it (the one folder the rule lets zoo replace); a `zoo
    # export RUN` of a best epoch so far may be writing it: waited for, then replaced by the run's final best.
    with claim_out(run_dir / "export", "export", overwrite=True, note=log, wait=EXPORT_WAIT_S,
                   option=f"`{shell_command('zoo', 'export', run_dir)} --out`"):
        # (not named here: the run's last line, "bundle: PATH  (zoo predict ...)", says where it is and how to use it)
        return export_run(run_dir, run_dir / "export", note=log)


def feature_cache(log: Log | None = None) -> FeatureCache:
    """The backbone feature banks on disk (ZOO_HOME/features): the one store of zoo finetune (and --resume),
    lr-find, sweep and doctor, so that the command a `next:` line prints loads what the last one computed.
    ``log`` hears of a damaged bank (recomputed) and of a cache that cannot be written (kept in memory)."""
    return FeatureCache(features_dir(), log=log)


def run_data_config(entry, config: FinetuneConfig) -> dict[str, Any]:
    """The preprocessing a run trains and evaluates with: the entry's, at ``--img-size`` when given."""
    return with_input_size(entry.preprocessing.data_config(), int(config.img_size))


def build_for_training(entry, pretrained: bool, seed: int, fc_dropout: float | None = None):
    """The network that finetune (and its resume), lr-find and sweep train: seeded, so that a random-init
    baseline (--no-pretrained) is the same network in every process and every run.

    Raises:
        RegistryError: the entry's stages do not fit the network (``zoo.resolve.check_stages``), checked on a
            network without memory before any download: a user registry's stages that left out the last layers
            made `--freeze K` unfreeze other ones, silently (QA).
    """
    # (a network the meta device cannot build is checked as built for training: that build comes next anyway)
    skeleton = meta_network(entry, fc_dropout=fc_dropout)
    if skeleton is None:
        skeleton = zbuild.build_architecture(entry, fc_dropout=fc_dropout)
    problems = check_stages(skeleton, entry.stages, entry.classifier)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RegistryError(f"{entry.origin_file}: entry '{entry.name}': its stages do not fit the network: "
                            f"{'; '.join(problems[:3])}{more}; every parameter except the classifier's must be in "
                            f"exactly one stage (`{shell_command('zoo', 'info', 'timm:ARCH')}` prints stages that do)")
    torch.manual_seed(int(seed))
    if pretrained:
        return zbuild.create_model(entry, pretrained=True, fc_dropout=fc_dropout)
    return zbuild.build_architecture(entry, fc_dropout=fc_dropout)


def check_batch_early(entry, train_set, config: FinetuneConfig, info, fc_dropout: float | None = None) -> None:
    """The engine's checks, made again when fit sets up, on the network built on the meta device, before the download
    and the run folder: an ``--img-size`` it cannot take (``recipe.check_input_size``; the model's own size is left
    to fit's set-up: no meta build at each start for it), and (``recipe.check_batchnorm_batch``, prepared as fit
    prepares it: its head, the freeze the scan's counts decide, the BatchNorm policy) a batch of one image that a
    training BatchNorm layer cannot normalise, not refused when that layer first trains (after the head phase). A
    head alone on cached features trains on the global batch on every rank (``policy.batchnorm_batch``).

    Raises:
        ConfigError: the size or the layer, and what to change (--img-size, --batch-size, --bn eval, --head linear).
    """
    per, size = ddp.per_rank_batch(int(config.batch_size), info), run_data_config(entry, config)["input_size"]
    lone = per <= 1 or int(config.micro_batch) in (1, 2)    # (passes of 1 or 2 leave an odd batch a pass of 1)
    model = meta_network(entry, fc_dropout=fc_dropout) if lone or int(config.img_size) else None
    if model is not None and int(config.img_size):   # (None: a network the meta device cannot build: fit checks it)
        check_input_size(model, size)
    if model is None or not lone:
        return    # two images give every channel two values: no layer to look for
    counts = train_set.class_counts()
    with torch.device("meta"):
        decision = prepare_model(model, [list(s) for s in entry.stages], entry.classifier, len(counts), counts, config)
    check_batchnorm_batch(model, size, batchnorm_batch(config, decision.trainable_stages, per), head=entry.classifier,
                          processes=info.world_size, synced=bool(config.sync_bn and info.enabled),
                          micro=int(config.micro_batch))


def run_finetune(model_name: str, data_dir: str | Path, config: FinetuneConfig, *, out: str | Path | None = None,
                 pretrained: bool = True, lr_auto: bool = False, export: bool = True,
                 fc_dropout: float | None = None, overwrite: bool = False, log: Log | None = None,
                 on_run_dir: Callable[[Path], None] | None = None,
                 exclude: str | Path | None = None) -> RunOutcome:
    """Scan ``data_dir``, build ``model_name``, train it into a run folder and export a bundle.

    ``fc_dropout``: VGG's FC-4096 dropout (``zoo.build.builder_kwargs``; None = the original 0.5).

    Under torchrun every rank calls this; rank 0 alone prints and writes (the folder name is rank 0's).
    The run folder follows ``zoo.outdir`` (absent/empty, or ``overwrite`` of an earlier run) and is
    locked from before the model is built to the end; ``on_run_dir`` is called (rank 0) once it is.
    ``exclude``: a findings.csv of `zoo doctor` or a list of paths, left out of train/val (RUN/exclude.txt).

    Raises:
        DataError: the folder cannot be trained on (raised before any model is built).
        UnknownModelError / OfflineError / WeightsError: the model cannot be resolved or loaded.
        ConfigError, DivergedError, Interrupted, CheckpointError: from training.
    """
    info = ddp.setup(config.device)
    say: Log = log if (log is not None and info.is_main) else (lambda _msg: None)
    claimed: Path | None = None      # --out once this command holds it (before: an earlier run's, not to resume)
    try:
        entry = resolve_early(model_name)           # a mistyped MODEL: before the scan (an uncached hf-hub: after)
        report = scan_on_main(data_dir, config, info)
        excluded = _apply_exclude(report, exclude, say) if exclude is not None else []
        for line in scan_lines(report, config):      # the counts the run trains on (after --exclude)
            say(line)
        entry = entry or resolve_entry(model_name)
        parse_freeze(config.freeze, len(entry.stages))   # a --freeze too deep for this model: before any work
        kwargs = zbuild.builder_kwargs(entry, fc_dropout)   # a bad --fc-dropout: before any work too
        device = check_machine(config, info)                # a mistyped --device, no tensorboard: too
        check_batch_early(entry, report.train, config, info, fc_dropout)   # a batch BatchNorm cannot train on
        run_dir = Path(out) if out is not None else default_run_dir(entry.name)
        check_outside(run_dir, data_dir, given=out is not None)
        run_dir = Path(ddp.broadcast_object(str(run_dir), info))
        # Checked and locked before any download or build: a bad --out costs a second.
        with ddp.entered_on_main(claim_out(run_dir, "finetune", overwrite=overwrite, note=say), info):
            claimed = run_dir
            if info.is_main and on_run_dir is not None:
                on_run_dir(run_dir)
            idle = idle_gpus_note(device, info, config.device)    # one GPU of several: torchrun uses them all
            if idle:
                say(idle)
            outcome = _train_new(entry, report, config, run_dir, pretrained, lr_auto, export, kwargs, info, say,
                                 excluded)
        ddp.leave(info)      # (done by _finish after training; here after the overfit check)
        return outcome
    except KeyboardInterrupt:     # (the scan, the model build; fit, _finish say theirs; one that gets here after)
        raise interrupted_before_training(claimed) from None
    except (MemoryError, RuntimeError) as e:     # fit's set-up out of memory; another rank's end in a collective
        if claimed is not None and is_out_of_memory(e) and not (claimed / "config.yaml").is_file() \
                and folder_kind(claimed) not in ("absent", "empty"):     # (its scan left: refused without --overwrite)
            raise interrupted_before_training(claimed, e) from None
        ddp.raise_if_peer_lost(e, info, claimed)
        raise
    finally:
        ddp.cleanup(info)


def scan_on_main(data_dir: str | Path, config: FinetuneConfig, info, **kwargs):
    """``scan_folder(data_dir, ...)`` with the run's options (and ``kwargs``), remembering its file checks
    (``zoo.cache.scan_memo``). Under torchrun rank 0 alone scans and every rank trains on what it found: one
    look, so the ranks' datasets cannot differ (a file added meanwhile), the paths as this rank reaches
    ``data_dir``."""
    report = ddp.computed_on_main(lambda: scan_folder(data_dir, val_split=config.val_split, seed=config.seed,
                                                      strict=config.strict, memo=scan_memo(data_dir), **kwargs), info)
    return report.moved_to(str(data_dir))


def _train_new(entry, report, config: FinetuneConfig, run_dir: Path, pretrained: bool, lr_auto: bool,
               export: bool, kwargs: dict[str, Any], info, say: Log, excluded: list[str]) -> RunOutcome:
    say(f"model: {entry.name} ({entry.builder}, {'pretrained' if pretrained else 'random init'})")
    for note in (process.describe() or "").splitlines():     # (what the entry point set for this process)
        say(note)
    model = build_for_training(entry, pretrained, config.seed, kwargs.get("drop_rate") if kwargs else None)
    outcome = RunOutcome(run_dir=run_dir, scan=report)
    stages, head = [list(s) for s in entry.stages], entry.classifier
    data_config = run_data_config(entry, config)

    overfit = config.overfit_batches > 0     # a sanity check: it writes no run folder
    # On disk under ZOO_HOME: the LR range test's features serve fit's head phase, a later run on the
    # same model and data (or `zoo doctor`'s) are loaded instead of recomputed.
    features = feature_cache(say)
    if lr_auto:     # before the overfit check too: it trains at the LR asked for (QA: it took --lr's default)
        # under torchrun rank 0 alone runs the test (on the whole training set, as one process does) and every
        # rank trains at its suggestion; the others wait (each ran it before: N times the work for one number)
        lr = ddp.computed_on_main(lambda: _lr_auto(model, stages, data_config, report, config, head,
                                                   None if overfit else run_dir, say, features, notes=overfit),
                                  info)
        config = config.replace(lr=float(lr))
    if overfit:
        outcome.overfit = _overfit(model, stages, data_config, report.train, config, head, say)
        return outcome

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_scan(report, run_dir)
        if excluded:
            atomic_write_text(run_dir / EXCLUDE_TXT, exclude_list_text(excluded))    # (read back on resume)
        write_json(run_dir / MODEL_JSON, model_info(entry, report.classes, config, pretrained, kwargs, export),
                   indent=2, ensure_ascii=False)
        say(f"run folder: {run_dir}")
    ddp.barrier(info)
    outcome.result = fit(model, stages, data_config, report.train, report.val, config, head=head,
                         run_dir=run_dir, log=say, feature_cache=features)
    return _finish(outcome, report.val, config, export, info, say)


def _finish(outcome: RunOutcome, val_set, config: FinetuneConfig, export: bool, info, say: Log) -> RunOutcome:
    """After training (rank 0): the bundle, then report.html. Ctrl-C here loses no epoch: it says how to write them;
    a bundle refused (RUN/export not zoo's, locked, unreadable weights) costs the bundle only: the page is written,
    then the error says the run is saved.
    Under torchrun every rank leaves the process group first: the report may predict the validation set again
    (when fit returned no probabilities of it: fit gathers the ranks' shards, but not rows it cannot match to their
    images), minutes that the others spent in a barrier NCCL times out."""
    ddp.leave(info)
    run_dir = outcome.run_dir
    failed: ZooError | None = None
    try:
        if export and info.is_main:
            try:
                outcome.export_dir = _export(run_dir, say)
            except ZooError as e:      # the run is saved: its page is still written, then the error says so
                failed = e
        if info.is_main:
            _report_html(run_dir, config, say, _val_predictions(outcome.result, val_set))
    except BaseException as e:      # Ctrl-C, or out of memory in the export: the run is saved, its end is not
        if not stops_run(e):
            raise
        raise cut_short_after_training(e, run_dir, export and outcome.export_dir is None) from None
    if failed is not None:
        err = ZooError(f"training finished and is saved in {run_dir}, but its bundle was not written: {failed}")
        err.exit_code = failed.exit_code
        raise err from None
    return outcome


def _val_predictions(result, val_set):
    """(val images as (path, class name), classes, probabilities) of the run's best weights, when fit kept them (a
    row of NaN: an image that failed to decode; every rank's images under torchrun)."""
    probs = getattr(result, "val_probs", None)
    if probs is None or len(probs) != len(val_set.items):
        return None
    return [(path, val_set.classes[label]) for path, label in val_set.items], list(val_set.classes), probs


def _apply_exclude(report, exclude: str | Path, say: Log) -> list[str]:
    """Leave the files listed in ``exclude`` out of train/val; returns them relative to the data folder."""
    try:
        paths = read_exclude_file(exclude)
    except ValueError as e:
        raise UsageError(f"--exclude: {e}; pass a findings.csv of `zoo doctor` or a file of paths") from None
    before = {report.relpath(p) for s in (report.train, report.val) for p, _ in s.items}
    train_before = [(report.relpath(p), report.classes[y]) for p, y in report.train.items]
    removed, unmatched, folders = exclude_items(report, paths)
    emptied = [c for c, n in zip(report.classes, report.train.class_counts()) if n == 0]
    if emptied:
        raise UsageError(f"--exclude {exclude} leaves no training image in class(es) {', '.join(emptied[:5])}"
                         f"{_emptied_by_folders(folders, train_before, emptied)}")
    after = {report.relpath(p) for s in (report.train, report.val) for p, _ in s.items}
    inside = (f"; {sum(folders.values())} of them in the listed folder(s) {name_list(list(folders))}: a folder "
              "listed leaves out every image in it" if folders else "")
    say(f"excluded {removed} file(s) listed in {exclude}{inside}"
        + (f" ({len(unmatched)} listed path(s) are not training or validation images)" if unmatched else ""))
    return sorted(before - after)


def _emptied_by_folders(folders: dict[str, int], train_before: list[tuple[str, str]], emptied: list[str]) -> str:
    """Why and what next when ``--exclude`` empties classes: a listed folder (the doctor's row for a class
    folder it could not read, readable since) is named with the rows to delete; else fewer rows, or --near."""
    gone = [p for p, c in train_before if c in emptied]
    held = [f for f in folders if any(PurePath(f) in PurePath(p).parents for p in gone)]
    if not held:
        return "; list fewer files (edit the CSV, or raise `zoo doctor --near`)"
    inside = sum(1 for p in gone if any(PurePath(f) in PurePath(p).parents for f in held))
    share = "all" if inside == len(gone) else f"{inside} of the {len(gone)}"
    return (f": the listed folder(s) {name_list(held)} hold {share} of them (a listed folder leaves out every "
            "image in it; zoo doctor lists a folder it could not read); delete those rows to train on their images, "
            "or run `zoo doctor` again on the data as it is now")


def _report_html(run_dir: Path, config: FinetuneConfig, say: Log, val_predictions=None) -> None:
    """RUN/report.html at the end of a run; a failure here only costs the page, never the run.
    ``val_predictions`` (see ``zoo.jobs.report.make_report``) spares it a second pass over the validation set."""
    try:
        dev = str(resolve_device(config.device))     # auto: the run's GPU, free again (rank 0's under torchrun)
        say(f"report: {zreport.make_report(run_dir, device=dev, log=say, val_predictions=val_predictions)}")
    except Exception as e:  # noqa: BLE001 - the run is saved; the page can be redrawn with `zoo report`
        say(f"warning: report.html not written ({type(e).__name__}: {e}); retry with "
            f"`{shell_command('zoo', 'report', run_dir)}`")


def _lr_auto(model, stages, data_config, report, config: FinetuneConfig, head: str, run_dir: Path | None,
             say: Log, feature_cache=None, notes: bool = False) -> float:
    say("lr: running the LR range test (--lr auto)")
    kwargs: dict[str, Any] = {}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {"out_png": run_dir / "lr_find.png", "out_csv": run_dir / "lr_find.csv"}
    # the set-up's notes: said by the run that follows, after its freeze: line (the probe's are the same lines);
    # by the probe before an overfit check (``notes``), which says none
    found = diagnostics.lr_find(model, stages, data_config, report.train, config, head=head, val_set=report.val,
                                log=say, feature_cache=feature_cache, notes=notes, **kwargs)
    say(f"lr: {found.describe()}")
    if found.decision is not None and lr_unused(config, found.decision.trainable_stages) \
            and not config.overfit_batches:      # (the overfit check trains by gradient, at this LR)
        say("lr: this run trains the head only and solves it by L-BFGS, which uses no learning rate; the "
            "suggestion applies with --head-solver gradient")
    return float(found.suggestion)


def _overfit(model, stages, data_config, train_set, config: FinetuneConfig, head: str, say: Log):
    asked = int(config.overfit_batches)
    n = diagnostics.fixed_batch_count(len(train_set.items), config.batch_size, asked)   # the data may hold fewer
    images = min(len(train_set.items), n * int(config.batch_size))
    lr = f"at lr {config.lr:.3g}" if config.lr else "at the auto lr"     # (auto: said by the check once resolved)
    say(f"overfit check: training on {n} fixed batch{'es' if n != 1 else ''} ({images} images) until memorised, {lr}"
        + (f" ({asked} asked: the training set holds no more)" if n < asked else ""))
    result = diagnostics.overfit_check(model, stages, data_config, train_set, config, head=head,
                                       batches=int(config.overfit_batches), log=say)
    return result
