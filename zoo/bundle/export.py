"""A finished run folder -> a bundle: model.safetensors with its metadata, config.json in timm's layout,
the README.md model card, and optionally model.onnx checked against PyTorch."""
from __future__ import annotations

import inspect
import io
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from finetune.core.io import (atomic_write, atomic_write_text, rewrite_safetensors_metadata,
                              sha256_file, shell_command, write_json)
from finetune.core.rerun import start_over_command
from zoo.bundle.load import (_DATA_KEYS, BUNDLE_FORMAT, CONFIG, WEIGHTS, _load_weights, _read_json, _strip_prefixes,
                             _torchvision_kwargs, build_model, read_safetensors_metadata)
from zoo.errors import BundleError, UsageError
from zoo.modelcard import model_card, recorded_recipe, run_recipe, run_scan
from zoo.outdir import KINDS, MARKER, STAGING, folder_kind, sweep_trial
from zoo.registry import public_source_id

ONNX_ATOL = 1e-4             # ONNX Runtime vs PyTorch logits, checked at export time


# ----------------------------------------------------------------------------------------- export


def _summary(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "summary.json"
    if not p.exists():
        return {}
    return _read_json(p, f"the run's summary is damaged; delete summary.json, or train the run again: "
                         f"`{start_over_command(run_dir)}`")


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    metrics = summary.get("metrics", summary)
    # Keep what JSON can carry; metadata stays small (the header is read on every load).
    return json.loads(json.dumps(metrics, default=str))


def _trained_on_mirrors(run_dir: Path, recipe: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Whether the model learnt from mirrored images (its config's flip, unless the run's mirror test turned
    the auto flip off): test-time augmentation averages over mirrored views only then (a digit or a letter
    mirrored is another symbol, and a model trained without flips has no answer for it). The mirror test's
    decision is in summary.json once the run finished, before that (an export of the best epoch so far, or
    of an interrupted run) in its checkpoint."""
    # lazy: the bundle's metadata readers (zoo push, zoo list --mine) must not import torch through here
    from types import SimpleNamespace

    from finetune.core.checkpoint import load_checkpoint
    from finetune.core.errors import CheckpointError
    from finetune.data.transforms import trains_mirrored

    config = SimpleNamespace(hflip=recipe.get("hflip", -1.0), augment=recipe.get("augment", "standard"))
    if not trains_mirrored(config):
        return False
    mirror = summary.get("mirror")
    if "mirror" not in summary:
        try:
            mirror = load_checkpoint(run_dir / "checkpoints" / "last.pt", mmap=True).get("mirror")
        except CheckpointError:     # none (a run from before checkpoints carried it) or damaged: no test known
            mirror = None
    return not (isinstance(mirror, dict) and mirror.get("dropped"))


def _data_folders(scan: dict[str, Any]) -> dict[str, str | None] | None:
    """The absolute folders the run trained (train) and chose its epoch (val; None: carved out of train) on,
    from scan.json; None for a run scanned before scan.json named them."""
    folders, root = scan.get("folders"), scan.get("root")
    if not isinstance(folders, dict) or not isinstance(root, str) or not isinstance(folders.get("train"), str):
        return None
    val = folders.get("val")
    return {"train": os.path.normpath(os.path.join(root, folders["train"])),
            "val": os.path.normpath(os.path.join(root, val)) if isinstance(val, str) else None}


# pretrained_cfg keys that describe one set of timm weights: timm fills them from its default tag (resnet18:
# a1_in1k, apache-2.0), so they are replaced by what the registry entry says of the weights actually used.
_WEIGHTS_KEYS = ("tag", "license", "paper_ids", "paper_name", "origin_url", "notes", "test_input_size",
                 "test_crop_pct", "hf_hub_id", "hf_hub_filename", "url", "file", "source")


def _weights_cfg(info: dict[str, Any]) -> dict[str, Any]:
    """The weights' provenance for config.json's ``pretrained_cfg`` (tag, license, paper_ids, source), from the
    registry entry as recorded in model.json; older runs: the source only."""
    cfg = dict(info.get("pretrained_cfg") or {})
    if "pretrained_cfg" not in info and info.get("source"):
        cfg["source"] = info["source"]
    if cfg.get("source"):     # a bundle is made to be shared: no local folder names in it
        cfg["source"] = public_source_id(cfg["source"])
    return {k: v for k, v in cfg.items() if v is not None}


def _with_weights_cfg(pretrained_cfg: dict[str, Any], weights_cfg: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in pretrained_cfg.items() if k not in _WEIGHTS_KEYS}, **weights_cfg}


def _timm_config(model: Any, path: Path, labels: list[str], data_config: dict[str, Any], zoo: dict[str, Any],
                 weights_cfg: dict[str, Any]) -> None:
    """config.json as timm's ``save_config_for_hf`` writes it, plus our ``zoo`` section, with the weights'
    provenance (``_weights_cfg``) instead of timm's default tag's."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from timm.models._hub import save_config_for_hf

    def write(tmp: str) -> None:
        try:
            save_config_for_hf(model, Path(tmp), model_config={"label_names": labels, "zoo": zoo},
                               data_config=dict(data_config))
            cfg = json.loads(Path(tmp).read_text(encoding="utf-8"))
        except TypeError:  # timm before data_config/model_args: write, then record our preprocessing
            save_config_for_hf(model, Path(tmp), model_config={"label_names": labels, "zoo": zoo})
            cfg = json.loads(Path(tmp).read_text(encoding="utf-8"))
            cfg["pretrained_cfg"].update({k: data_config[k] for k in _DATA_KEYS if k in data_config})
            cfg["pretrained_cfg"]["num_classes"] = len(labels)
        cfg["pretrained_cfg"] = _with_weights_cfg(cfg.get("pretrained_cfg") or {}, weights_cfg)
        Path(tmp).write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    atomic_write(path, write)


def _plain_config(arch: str, model: Any, path: Path, labels: list[str], data_config: dict[str, Any],
                  classifier: str, zoo: dict[str, Any], weights_cfg: dict[str, Any]) -> None:
    """The same layout for a torchvision model (timm cannot build it; our loader and torchvision can)."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    import torch

    head = model.get_submodule(classifier) if classifier else None
    first = head[0] if isinstance(head, torch.nn.Sequential) else head
    num_features = getattr(first, "in_features", None)
    cfg = {"architecture": arch, "num_classes": len(labels), "num_features": num_features,
           "label_names": labels,
           "pretrained_cfg": {**{k: data_config[k] for k in _DATA_KEYS if k in data_config},
                              "num_classes": len(labels), "classifier": classifier, **weights_cfg},
           "zoo": zoo}
    write_json(path, cfg, indent=2, ensure_ascii=False)


def _export_onnx(model: Any, path: Path, input_size: Sequence[int], metadata: dict[str, str]) -> float:
    """Write model.onnx (dynamic batch) with ``metadata`` (label names, preprocessing...) in its
    ``metadata_props``, and check it with onnxruntime; returns the max |difference|."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) needs neither torch nor numpy
    import numpy as np
    import torch

    try:
        # lazy: optional extra (pip install 'zoo-finetune[onnx]'), checked here
        import onnxruntime as ort
    except ImportError:
        raise UsageError("--format onnx needs onnx and onnxruntime: pip install 'zoo-finetune[onnx]'") from None
    c, h, w = (int(v) for v in input_size)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, c, h, w, generator=gen)
    diff = {"max": math.inf}

    def write(tmp: str) -> None:
        # The TorchScript exporter (dynamo=False) works offline without onnxscript, and handles every
        # architecture of the zoo; the dynamo exporter needs onnxscript, which is optional. torch 2.5 added
        # the choice (2.9 made dynamo the default); before it, TorchScript is the only exporter.
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # in memory, as onnx.load would read it whole anyway: torch, onnx and onnxruntime open only UTF-8
            # paths, and a bundle folder may be named otherwise (a Latin-1 byte: a TypeError traceback)
            buf = io.BytesIO()
            torch.onnx.export(model, (probe[:1],), buf, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              **legacy)
        # lazy: optional extra (the onnx extra), checked with onnxruntime above
        import onnx

        proto = onnx.load_from_string(buf.getvalue())
        del buf     # one copy of the model at a time (onnx.load of the file held one): its peak memory as before
        for key, value in metadata.items():   # a model.onnx is usable without config.json
            proto.metadata_props.add(key=key, value=value)
        data = proto.SerializeToString()
        del proto
        Path(tmp).write_bytes(data)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": probe.numpy()})[0]
        with torch.inference_mode():
            want = model(probe).float().numpy()
        diff["max"] = float(np.abs(got - want).max())
        if not diff["max"] <= ONNX_ATOL:
            raise BundleError(f"ONNX export disagrees with PyTorch (max |difference| {diff['max']:.2e} > {ONNX_ATOL}); "
                              "model.onnx was not written; export without --format onnx")

    atomic_write(path, write)
    return diff["max"]


def _damaged_run(run: Path) -> str:
    """What to do when the run's best checkpoint is damaged: exporting again reads the same file."""
    return f"the run's best checkpoint is damaged; restore the file or train the run again: `{start_over_command(run)}`"


def _check_run_info(info: dict[str, Any], where: Path) -> None:
    """model.json's fields have the types `zoo finetune` writes (a hand-edited file: one line, not a traceback)."""
    dc = info["data_config"]
    wrong = ("builder" if not isinstance(info["builder"], str) else
             "classes" if not isinstance(info["classes"], list) or not info["classes"] else
             "data_config" if not isinstance(dc, dict) else
             next((f"data_config.{k}" for k in ("input_size", "interpolation", "crop_pct", "mean", "std")
                   if k not in dc or (k in ("input_size", "mean", "std") and not isinstance(dc[k], list))), None) or
             next((k for k in ("head", "builder_kwargs") if info.get(k) is not None and not isinstance(info[k], dict)),
                  None))
    if wrong:
        value = info.get(wrong, dc.get(wrong.partition(".")[2]) if isinstance(dc, dict) else None)
        raise BundleError(f"{where}: {wrong} is {json.dumps(value)[:40]}, not what `zoo finetune` writes (was the "
                          f"file edited?); restore it, or train the run again: `{start_over_command(where.parent)}`")


def _read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(model.json, the best checkpoint's state dict, its path) of a finished run folder.

    Raises:
        BundleError: no run folder, model.json missing or incomplete, the best checkpoint missing or damaged.
    """
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from finetune.core.checkpoint import read_tensors, weights_damage

    if not run.is_dir():
        raise BundleError(f"no run folder at {run}; pass the folder `zoo finetune` wrote (runs/<name>-<time>)")
    if not (run / "model.json").exists() and (run / CONFIG).is_file() and (run / WEIGHTS).is_file():
        raise BundleError(f"{run} is a bundle (what `zoo export` writes), not a run folder: it is exported already; "
                          f"use it as it is (`{shell_command('zoo', 'predict', run, 'IMAGE')}`) or pass the run "
                          "folder it came from")
    if (trial := sweep_trial(run)) is not None:
        raise BundleError(trial)
    # a run stopped before its model.json (or one whose model.json is damaged): which model it trains is not recorded
    started = (run / "model.json").exists() or ((run / MARKER).is_file() and folder_kind(run) in ("finetune", "empty"))
    why = (f"the run stopped before it was written, or it was damaged; train the run again: "
           f"`{start_over_command(run)}`, MODEL the model it trains") if started else \
        "pass the folder `zoo finetune` wrote (runs/<name>-<time>)"
    info = _read_json(run / "model.json", why)
    for key in ("builder", "classes", "data_config"):
        if key not in info:
            raise BundleError(f"{run / 'model.json'} lacks {key!r}, which this version reads; train the run again: "
                              f"`{start_over_command(run)}`")
    _check_run_info(info, run / "model.json")
    ckpt = run / "checkpoints" / "best.safetensors"
    if not ckpt.exists():
        # (not its resume: a run whose best was deleted after an epoch refuses it, RunFolder.load_resume)
        raise BundleError(f"{ckpt} is missing: the run saved no best checkpoint; train it again: "
                          f"`{start_over_command(run)}`")
    damaged = _damaged_run(run)
    read_safetensors_metadata(ckpt, fix=damaged)  # clear message for a truncated checkpoint before torch sees it
    try:
        state = read_tensors(ckpt)
        damage = weights_damage(ckpt, state)    # a flipped bit: never exported under a fresh sha256
    except Exception as e:
        raise BundleError(f"{ckpt} cannot be read ({e}); {damaged}") from None
    if damage:
        raise BundleError(f"{damage}; {damaged}")
    return info, _strip_prefixes(state), ckpt


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
               formats: Sequence[str] = ("safetensors",), note: Callable[[str], None] | None = None) -> Path:
    """Export a finished run folder as a bundle (model.safetensors + config.json + README.md [+ model.onnx]).

    Args:
        run_dir: the run folder (model.json, checkpoints/best.safetensors, summary.json, config.yaml).
        out_dir: where to write; default ``<run_dir>/export``.
        formats: "safetensors" (always written) and optionally "onnx".
        note: hears a warning line about a run file that is present but unreadable (scan.json: the bundle is
            written without what it would have told).
    Returns:
        The bundle folder.
    Raises:
        BundleError: the run folder lacks model.json or the best checkpoint, or they do not fit together.
        UsageError: an unknown format.
    """
    run = Path(run_dir)
    formats = tuple(dict.fromkeys(str(f).lower() for f in formats))
    unknown = [f for f in formats if f not in ("safetensors", "onnx")]
    if unknown:
        raise UsageError(f"unknown export format(s) {unknown}; choose safetensors and/or onnx")
    info, state, ckpt = _read_run(run)
    labels = [str(c) for c in info["classes"]]
    summary, recipe, (scan, scan_problem) = _summary(run), run_recipe(run), run_scan(run)  # (the card reads its own)
    if scan_problem and note is not None:
        note(f"warning: {run / 'scan.json'} is present but unreadable ({scan_problem}): the bundle's card does "
             "not describe the data, and zoo eval cannot tell when it is given the folders the run trained on; "
             "exported anyway")

    builder = str(info["builder"])
    library, _, arch = builder.partition(":")
    head = dict(info.get("head") or {"kind": "linear"})
    classifier = str(info.get("classifier", ""))
    kwargs = dict(info.get("builder_kwargs") or {})
    if library == "torchvision":
        kwargs = _torchvision_kwargs(arch, list(state), kwargs)
    model = build_model(builder, len(labels), head, classifier, kwargs, state)
    _load_weights(model, state, ckpt, fix=_damaged_run(run))
    model.eval()

    dc = dict(info["data_config"])
    data_config = {"input_size": [int(v) for v in dc["input_size"]], "interpolation": str(dc["interpolation"]),
                   "crop_pct": float(dc["crop_pct"]), "crop_mode": str(dc.get("crop_mode", "center")),
                   "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]]}
    meta: dict[str, Any] = {
        "zoo_bundle": BUNDLE_FORMAT, "model": info.get("model"), "architecture": arch, "builder": builder,
        "builder_kwargs": kwargs, "num_classes": len(labels), "label_names": labels, **data_config,
        "classifier": classifier, "head": head, "source": public_source_id(info.get("source")),
        "source_sha256": info.get("source_sha256"), "source_weights_sha256": info.get("source_weights_sha256"),
        "pretrained": info.get("pretrained", True),
        "metrics": _metrics(summary),
        "trained_on_mirrors": _trained_on_mirrors(run, recipe, summary),
        "data_folders": _data_folders(scan),
        "recipe": recorded_recipe(recipe, summary),     # the card's recipe, for a bundle pushed without its run
    }
    out = Path(out_dir) if out_dir is not None else run / "export"
    stage = out / STAGING
    shutil.rmtree(stage, ignore_errors=True)        # what a killed export left
    stage.mkdir(parents=True)
    try:
        card = model_card(meta, run, _weights_cfg(info).get("license"),
                          onnx_atol=ONNX_ATOL if "onnx" in formats else None)
        _write_bundle(stage, info, model, meta, labels, data_config, formats, card)
        _publish(stage, out)
    except OSError as err:      # (a full disk...) named as the bundle's file, not the staging copy
        if err.filename and Path(err.filename).parent == stage:
            err.filename = str(out / Path(err.filename).name)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def is_final_export(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``out_dir`` (default ``RUN/export``) holds, whole, what :func:`export_run` writes for the finished
    run: no staging copy left by a killed export, its weights agreeing with config.json (not caught between two
    renames of ``_publish``), the tensors of ``checkpoints/best.safetensors`` (its recorded digest) and the
    metrics of summary.json (an export of a best epoch so far carries none). Content, not file times: a copied
    run folder keeps its answer."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch through this module
    from finetune.core.checkpoint import DIGEST_KEY, read_tensors, tensors_sha256

    run, out = Path(run_dir), Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    best = run / "checkpoints" / "best.safetensors"
    try:
        if (out / STAGING).exists() or not (out / "README.md").is_file():
            return False
        recorded = (_read_json(out / CONFIG, "").get("zoo") or {}).get("weights_sha256")
        meta = read_safetensors_metadata(out / WEIGHTS)
        if recorded != sha256_file(out / WEIGHTS) or json.loads(meta.get("metrics", "null")) != _metrics(_summary(run)):
            return False
        digest = read_safetensors_metadata(best).get(DIGEST_KEY) or tensors_sha256(read_tensors(best))
        return tensors_sha256(read_tensors(out / WEIGHTS)) == digest
    except Exception:  # noqa: BLE001 - missing or damaged (safetensors' own error too): not the run's bundle
        return False


def _publish(stage: Path, out: Path) -> None:
    """Move the finished bundle from ``stage`` into ``out``, replacing an earlier one file by file (the
    weights first: a bundle caught between two files fails load_bundle's weights check, never loads other
    weights); an earlier file this export did not write (model.onnx) is removed."""
    for name in KINDS["export"].files:
        if (stage / name).is_file():
            os.replace(stage / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)


def _write_bundle(out: Path, info: dict[str, Any], model: Any, meta: dict[str, Any], labels: list[str],
                  data_config: dict[str, Any], formats: Sequence[str], card: str) -> None:
    """Every file of the bundle, written into ``out`` (the staging folder); ``card`` is its README.md."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    import safetensors.torch

    builder, arch = meta["builder"], meta["architecture"]
    library = builder.partition(":")[0]
    kwargs, head, classifier = meta["builder_kwargs"], meta["head"], meta["classifier"]
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": "pt", **{k: json.dumps(v, ensure_ascii=False) for k, v in meta.items()}}
    # the metadata in sorted order (safetensors writes it in hash order): the same run exports the same bytes
    data = rewrite_safetensors_metadata(safetensors.torch.save(tensors, metadata=header), header)
    atomic_write(out / WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))

    zoo_section = {"builder": builder, "builder_kwargs": kwargs, "head": head, "classifier": classifier,
                   "model": info.get("model"), "source": public_source_id(info.get("source")),
                   "source_sha256": info.get("source_sha256"),
                   "source_weights_sha256": info.get("source_weights_sha256"),
                   "weights_sha256": sha256_file(out / WEIGHTS),     # checked by load_bundle
                   "bundle_format": BUNDLE_FORMAT}
    weights_cfg = _weights_cfg(info)
    if library == "timm":
        _timm_config(model, out / CONFIG, labels, data_config, zoo_section, weights_cfg)
    else:
        _plain_config(arch, model, out / CONFIG, labels, data_config, classifier, zoo_section, weights_cfg)

    if "onnx" in formats:
        onnx_meta = {"label_names": labels, "preprocessing": data_config, "model": info.get("model"),
                     "builder": builder, "source": public_source_id(info.get("source")),
                     "source_sha256": info.get("source_sha256"), "zoo_bundle": BUNDLE_FORMAT}
        _export_onnx(model, out / "model.onnx", data_config["input_size"],
                     {k: json.dumps(v, ensure_ascii=False) for k, v in onnx_meta.items()})
    atomic_write_text(out / "README.md", card)
