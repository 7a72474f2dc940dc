"""Bundles: a finetuned model exported as files anyone can load, with its metadata beside the weights.

A bundle folder holds
  model.safetensors  the state dict; its header metadata (str -> JSON string) carries architecture,
                     builder, number of classes, label names, mean/std, input size, interpolation,
                     crop_pct, source model + the source file's digest, head and validation metrics
  config.json        timm's own layout (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
                     ``model_args``, ``pretrained_cfg`` with the registry entry's tag, licence, paper and
                     source) plus a ``zoo`` section (builder, kwargs, head, digests: ``weights_sha256`` of
                     model.safetensors, checked on every load), so
                     ``timm.create_model("local-dir:<bundle>", pretrained=True)`` rebuilds a linear-head model
  README.md          a model card (data, classes, metrics, recipe)
  model.onnx         optional, dynamic batch axis, label names and preprocessing in its metadata_props,
                     checked against PyTorch with onnxruntime at export time

Reading a bundle's labels and metadata never unpickles anything: JSON and the safetensors header only.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import yaml
from PIL import Image

from finetune.io import SafetensorsHeaderError, atomic_write, atomic_write_text, load_yaml, read_safetensors_header
from zoo.build import TORCHVISION_KWARGS, build_network, create_model
from zoo.cache import sha256_file
from zoo.errors import BundleError, RegistryError, UsageError
from zoo.registry import public_source_id
from zoo.resolve import get_entry, hub_config
from zoo.sources import fetch_hub_config

if TYPE_CHECKING:  # torch is imported lazily: reading metadata must not need it
    import torch

__all__ = ["Bundle", "load_bundle", "load_model", "export_run", "read_safetensors_metadata",
           "build_model", "BUNDLE_FORMAT", "ONNX_ATOL"]

BUNDLE_FORMAT = "1"          # bumped when the metadata layout changes incompatibly
ONNX_ATOL = 1e-4             # ONNX Runtime vs PyTorch logits, checked at export time
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


# ------------------------------------------------------------------------------------------ reading


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after checking the file is complete. No torch, no pickle.

    Raises:
        BundleError: missing, truncated, or with a header that is not safetensors JSON.
    """
    path = Path(path)
    fix = "re-export it with `zoo export RUN_DIR`"
    try:
        header = read_safetensors_header(path)
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    except SafetensorsHeaderError as e:
        raise BundleError(f"{path} is {e}; {fix}") from None
    return dict(header.get("__metadata__") or {})


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":          # the one plain string, as transformers/timm write it
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise BundleError(f"{path}: metadata field {key!r} is not JSON; re-export with `zoo export RUN_DIR`") from None
    return out


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e.__class__.__name__}); {what}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} should hold a JSON object; {what}")
    return data


# ---------------------------------------------------------------------------------------- building


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers leave prefixes in saved state dicts.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _torchvision_kwargs(arch: str, state_keys: Sequence[str], given: dict[str, Any] | None) -> dict[str, Any]:
    # zoo.build's constructor arguments (e.g. GoogLeNet's transform_input) are not in the state dict.
    kwargs = {**TORCHVISION_KWARGS.get(arch, {}), **dict(given or {})}
    if arch in ("googlenet", "inception_v3"):
        # Auxiliary classifiers are in the state dict only when the model was built with them.
        kwargs["aux_logits"] = any(k.startswith(("aux1.", "AuxLogits.")) for k in state_keys)
        kwargs.setdefault("init_weights", False)   # weights are loaded right after; skip the slow init
    return kwargs


def build_model(builder: str, num_classes: int, head: dict[str, Any] | None, classifier: str,
                builder_kwargs: dict[str, Any] | None = None) -> "torch.nn.Module":
    """Rebuild the finetuned architecture (random weights): ``zoo.build.build_network`` plus the recorded head.

    Args:
        builder: "timm:<arch>" or "torchvision:<arch>".
        num_classes: C.
        head: {"kind": "linear"|"mlp", "hidden", "dropout", "activation"}; None means linear.
        classifier: module name of the head ("fc", "classifier", ...), needed for MLP heads.
        builder_kwargs: extra constructor arguments (timm ``model_args`` / torchvision kwargs).
    Raises:
        BundleError: an unknown builder or architecture.
    """
    try:
        model = build_network(builder, int(num_classes), builder_kwargs, where=f"bundle builder {builder!r}")
    except RegistryError as e:
        raise BundleError(f"{e}; is the installed timm/torchvision too old?") from None
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"cannot build {builder!r}: {e}; is the installed timm/torchvision too old?") from None
    head = head or {"kind": "linear"}
    if head.get("kind", "linear") == "mlp":
        # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
        from finetune.surgery import replace_head

        replace_head(model, classifier, int(num_classes), kind="mlp", hidden=int(head.get("hidden", 512)),
                     dropout=float(head.get("dropout", 0.2)), activation=str(head.get("activation", "relu")))
    return model


def _load_weights(model: "torch.nn.Module", state: dict[str, Any], where: Path) -> None:
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()[-1].strip()
        raise BundleError(f"{where} does not fit the architecture ({first}); re-export the run") from None
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
                 (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise BundleError(f"{where} does not fit the architecture ({detail}); re-export the run")


# ------------------------------------------------------------------------------------------ Bundle


@dataclass
class Bundle:
    """A ready-to-use classifier: ``model, transform, labels = zoo.load_bundle(path)``.

    Attributes:
        model: the nn.Module in eval mode.
        transform: the validation transform (PIL image -> normalised tensor).
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, crop_mode, mean, std).
        labels: class names in output order.
        metadata: everything the bundle records (architecture, source, metrics, head...).
        path: the bundle folder (None for a registry model).
    """

    model: Any
    transform: Callable[[Any], Any]
    data_config: dict[str, Any]
    labels: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.transform
        yield self.labels

    def predict(self, images: Any, topk: int = 5, tta: bool = False, tta_scales: Sequence[int] | None = None,
                batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image, best first.

        Args:
            images: a PIL image or path, or a list of them.
            topk: how many classes per image.
            tta: average the ten fixed crops (at each of ``tta_scales`` when given).
        Raises:
            BundleError: an image cannot be read (the message names it).
        """
        # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
        from zoo.predict import predict_probs, topk as _topk

        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)

        def fail(item: Any, reason: str) -> None:
            raise BundleError(f"cannot read image {item if not isinstance(item, Image.Image) else 'PIL image'}: "
                              f"{reason}; check the file")

        _, probs = predict_probs(self.model, images, self.data_config, tta=tta, tta_scales=tta_scales,
                                 batch_size=batch_size, on_error=fail)
        return _topk(probs, self.labels, topk)

    def to(self, device: Any) -> "Bundle":
        """Move the model to ``device`` (e.g. "cuda"); returns self."""
        self.model.to(device)
        return self


def _check_weights_digest(weights: Path, recorded: Any) -> None:
    """Refuse weights whose sha256 is not the one ``zoo export`` recorded in config.json (bundles exported
    before the digest was recorded carry none and are not checked)."""
    if not recorded:
        return
    digest = sha256_file(weights)
    if digest != str(recorded).lower():
        raise BundleError(f"{weights} is damaged or was changed: its sha256 {digest[:16]}... is not the "
                          f"{str(recorded)[:16]}... recorded in config.json; re-export the bundle with "
                          "`zoo export RUN_DIR`")


def load_bundle(path: str | os.PathLike, device: Any = "cpu") -> Bundle:
    """Load an exported bundle folder (or its model.safetensors).

    Labels and metadata come from the safetensors header and config.json only (no pickle anywhere); the
    weights' sha256 must equal the one recorded in config.json at export.

    Raises:
        BundleError: a missing, truncated or inconsistent file; the message says which and what to do.
    """
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    import safetensors.torch

    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}; export one with `zoo export RUN_DIR --out {path}`")
    weights = path / WEIGHTS
    meta = _decode_metadata(read_safetensors_metadata(weights), weights)
    config = _read_json(path / CONFIG, "re-export with `zoo export RUN_DIR`")
    if "builder" not in meta or "label_names" not in meta:
        raise BundleError(f"{weights} carries no zoo metadata (builder, label_names); "
                          "it was not written by `zoo export`; export the run again")
    labels = [str(x) for x in meta["label_names"]]
    num_classes = int(meta.get("num_classes", len(labels)))
    if num_classes != len(labels) or int(config.get("num_classes", num_classes)) != num_classes:
        raise BundleError(f"{path}: inconsistent class count (metadata {num_classes}, labels {len(labels)}, "
                          f"config.json {config.get('num_classes')}); re-export with `zoo export RUN_DIR`")
    missing = [k for k in _DATA_KEYS if k not in meta and k != "crop_mode"]
    if missing:
        raise BundleError(f"{weights} lacks preprocessing metadata {missing}; re-export with `zoo export RUN_DIR`")
    data_config = {k: meta[k] for k in _DATA_KEYS if k in meta}
    data_config.setdefault("crop_mode", "center")
    data_config["input_size"] = tuple(int(v) for v in data_config["input_size"])
    data_config["mean"] = tuple(float(v) for v in data_config["mean"])
    data_config["std"] = tuple(float(v) for v in data_config["std"])
    data_config["crop_pct"] = float(data_config["crop_pct"])

    zoo_cfg = config.get("zoo") or {}
    _check_weights_digest(weights, zoo_cfg.get("weights_sha256"))
    builder = str(meta["builder"])
    kwargs = dict(meta.get("builder_kwargs") or zoo_cfg.get("builder_kwargs") or {})
    if builder.startswith("timm:"):
        kwargs = {**dict(config.get("model_args") or {}), **kwargs}
    model = build_model(builder, num_classes, meta.get("head"), str(meta.get("classifier", "")), kwargs)
    try:
        state = safetensors.torch.load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise BundleError(f"{weights} cannot be read ({e}); re-export with `zoo export RUN_DIR`") from None
    _load_weights(model, state, weights)
    model.eval().to(device)

    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from zoo.predict import eval_transform

    return Bundle(model=model, transform=eval_transform(data_config), data_config=data_config, labels=labels,
                  metadata=meta, path=path)


def _imagenet_labels(model: Any, num_classes: int) -> tuple[list[str], list[str] | None]:
    """ImageNet class descriptions ("tabby, tabby cat") and synsets ("n02123045") for a pretrained model."""
    try:
        # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model) if hasattr(model, "pretrained_cfg") else None
        info = ImageNetInfo(subset or "imagenet-1k")
        if info.num_classes() == num_classes:
            return ([info.index_to_description(i) for i in range(num_classes)],
                    [info.index_to_label_name(i) for i in range(num_classes)])
    except Exception:  # label files are a nicety; fall back to indices rather than fail a prediction
        pass
    return [f"class_{i}" for i in range(num_classes)], None


def load_model(spec: str | os.PathLike, device: Any = "cpu", pretrained: bool = True) -> Bundle:
    """A bundle folder, or a registry model name (pretrained ImageNet weights, ImageNet labels).

    Raises:
        BundleError: a folder that is not a valid bundle.
        UnknownModelError: a name that is neither a folder nor a model of the registry.
    """
    p = Path(spec)
    if p.exists():
        return load_bundle(p, device=device)
    text = str(spec)
    if not text.startswith(("hf-hub:", "timm:")) and (os.sep in text or text.startswith(".")
                                                       or text.endswith(".safetensors")):
        raise BundleError(f"no bundle at {text}; export one with `zoo export RUN_DIR --out {text}`")
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from zoo.predict import eval_transform

    hub_cfg = None
    if text.startswith("hf-hub:"):     # a published model (e.g. by `zoo push`): its config names its classes
        fetch_hub_config(text[len("hf-hub:"):])
        hub_cfg = hub_config(text[len("hf-hub:"):])
    entry = get_entry(text)
    model = create_model(text, pretrained=pretrained).eval().to(device)
    data_config = entry.preprocessing.data_config()
    n_out = int(getattr(model, "num_classes", entry.num_classes) or entry.num_classes)
    labels, synsets = _imagenet_labels(model, n_out)
    names = (hub_cfg or {}).get("label_names")
    if isinstance(names, list) and len(names) == n_out:
        labels, synsets = [str(x) for x in names], None
    # label_ids: what an ImageNet-style folder names its classes (zoo eval matches folders by either)
    meta = {"model": entry.name, "builder": entry.builder, "num_classes": len(labels), "label_ids": synsets,
            "source": entry.sources[0].id() if entry.sources else None, **data_config}
    return Bundle(model=model, transform=eval_transform(data_config), data_config=data_config, labels=labels,
                  metadata=meta, path=None)


# ----------------------------------------------------------------------------------------- export


def _metrics(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "summary.json"
    if not p.exists():
        return {}
    summary = _read_json(p, "the run's summary is damaged; re-run `zoo finetune` or delete summary.json")
    metrics = summary.get("metrics", summary)
    # Keep what JSON can carry; metadata stays small (the header is read on every load).
    return json.loads(json.dumps(metrics, default=str))


def _recipe(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.yaml"
    if not p.exists():
        return {}
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _scan(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "scan.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


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
    atomic_write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if not math.isnan(v) else "nan"
    return str(v)


def _model_card(meta: dict[str, Any], recipe: dict[str, Any], scan: dict[str, Any], formats: Sequence[str]) -> str:
    labels = meta["label_names"]
    library, _, arch = meta["builder"].partition(":")
    head = meta.get("head") or {"kind": "linear"}
    lines = [f"# {meta.get('model') or arch} finetuned on {len(labels)} classes", "",
             f"Exported by zoo-finetune from a run of `zoo finetune`. Architecture `{meta['builder']}`, "
             f"head: {head.get('kind', 'linear')}.", "", "## Data", ""]
    if scan:
        lines.append(f"- folder: `{scan.get('root', '?')}` (layout: {scan.get('layout', '?')})")
        counts = scan.get("counts")
        if isinstance(counts, dict):
            for split, per in counts.items():
                if isinstance(per, dict):
                    lines.append(f"- {split}: {sum(v for v in per.values() if isinstance(v, int))} images")
    else:
        lines.append("- (no scan.json in the run folder)")
    lines += ["", "## Classes", "", ", ".join(f"`{c}`" for c in labels[:200])
              + (f" ... ({len(labels)} in all)" if len(labels) > 200 else ""), "", "## Validation metrics", ""]
    metrics = meta.get("metrics") or {}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += [f"- {k}: {_fmt(v)}" for k, v in scalars.items()] or ["- (none recorded)"]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        lines += ["", "Per-class validation accuracy: " + ", ".join(
            f"`{c}` {_fmt(v) if v is not None else '-'}" for c, v in list(per_class.items())[:200])]
    lines += ["", "## Recipe", ""]
    keys = ("optimizer", "lr", "backbone_lr_mult", "layer_decay", "schedule", "epochs", "batch_size", "freeze",
            "head", "bn", "weight_decay", "augment", "label_smoothing", "mixup", "cutmix", "ema", "seed")
    lines += [f"- {k}: {recipe[k]}" for k in keys if k in recipe] or ["- (no config.yaml in the run folder)"]
    if float(recipe.get("ema") or 0) > 0:
        lines.append("- the weights are the exponential moving average of the finetune phase's (`--ema`)")
    if meta.get("pretrained") is False:
        lines += ["", "## Source weights", "", "- none: trained from random initialisation"]
    else:
        lines += ["", "## Source weights", "", f"- {meta.get('source') or 'unknown'}",
                  f"- sha256 of the file as downloaded or imported: {meta.get('source_sha256') or 'unknown'}"]
    lines += ["", "## Preprocessing", "",
              f"input {tuple(meta['input_size'])}, {meta['interpolation']} resize to input/crop_pct "
              f"(crop_pct {meta['crop_pct']}), centre crop, mean {tuple(meta['mean'])}, std {tuple(meta['std'])}.",
              "", "## Use", "", "```python", "import zoo", "bundle = zoo.load_bundle('.')",
              "print(bundle.predict('image.jpg', topk=3))", "```", ""]
    if library == "timm" and head.get("kind", "linear") == "linear":
        lines += ["Plain timm rebuilds it too:", "", "```python", "import timm",
                  "model = timm.create_model('local-dir:/path/to/this/folder', pretrained=True).eval()", "```", ""]
    elif library == "timm":
        lines += ["Note: the MLP head is recorded in config.json (`zoo.head`) and rebuilt by `zoo.load_bundle`; "
                  "plain timm cannot rebuild this head (`timm.create_model('local-dir:...')` fails to load it).", ""]
    else:
        lines += [f"Plain torchvision: `torchvision.models.get_model('{arch}', weights=None, num_classes="
                  f"{len(labels)}, **config['zoo']['builder_kwargs'])` then `load_state_dict` from "
                  "`safetensors.torch.load_file('model.safetensors')`.", ""]
    if "onnx" in formats:
        lines += [f"`model.onnx`: input `input` (N, {', '.join(str(v) for v in meta['input_size'])}), output "
                  f"`logits`; checked against PyTorch within {ONNX_ATOL} with ONNX Runtime at export.", ""]
    return "\n".join(lines)


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
        # architecture of the zoo; the dynamo exporter needs onnxscript, which is optional.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (probe[:1],), tmp, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        # lazy: optional extra (the onnx extra), checked with onnxruntime above
        import onnx

        proto = onnx.load(tmp)
        for key, value in metadata.items():   # a model.onnx is usable without config.json
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": probe.numpy()})[0]
        with torch.inference_mode():
            want = model(probe).float().numpy()
        diff["max"] = float(np.abs(got - want).max())
        if not diff["max"] <= ONNX_ATOL:
            raise BundleError(f"ONNX export disagrees with PyTorch (max |difference| {diff['max']:.2e} > {ONNX_ATOL}); "
                              "model.onnx was not written; export without --format onnx")

    atomic_write(path, write)
    return diff["max"]


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
               formats: Sequence[str] = ("safetensors",)) -> Path:
    """Export a finished run folder as a bundle (model.safetensors + config.json + README.md [+ model.onnx]).

    Args:
        run_dir: the run folder (model.json, checkpoints/best.safetensors, summary.json, config.yaml).
        out_dir: where to write; default ``<run_dir>/export``.
        formats: "safetensors" (always written) and optionally "onnx".
    Returns:
        The bundle folder.
    Raises:
        BundleError: the run folder lacks model.json or the best checkpoint, or they do not fit together.
        UsageError: an unknown format.
    """
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    import safetensors.torch

    run = Path(run_dir)
    formats = tuple(dict.fromkeys(str(f).lower() for f in formats))
    unknown = [f for f in formats if f not in ("safetensors", "onnx")]
    if unknown:
        raise UsageError(f"unknown export format(s) {unknown}; choose safetensors and/or onnx")
    if not run.is_dir():
        raise BundleError(f"no run folder at {run}; pass the folder `zoo finetune` wrote (runs/<name>-<time>)")
    info = _read_json(run / "model.json", "the run did not finish or was not made by `zoo finetune`; re-run it")
    for key in ("builder", "classes", "data_config"):
        if key not in info:
            raise BundleError(f"{run / 'model.json'} lacks {key!r}; re-run `zoo finetune` with this version")
    labels = [str(c) for c in info["classes"]]
    ckpt = run / "checkpoints" / "best.safetensors"
    if not ckpt.exists():
        raise BundleError(f"{ckpt} is missing: the run saved no best checkpoint; resume or re-run `zoo finetune`")
    read_safetensors_metadata(ckpt)  # clear message for a truncated checkpoint before torch sees it
    try:
        state = _strip_prefixes(safetensors.torch.load_file(str(ckpt), device="cpu"))
    except Exception as e:
        raise BundleError(f"{ckpt} cannot be read ({e}); resume or re-run `zoo finetune`") from None

    builder = str(info["builder"])
    library, _, arch = builder.partition(":")
    head = dict(info.get("head") or {"kind": "linear"})
    classifier = str(info.get("classifier", ""))
    kwargs = dict(info.get("builder_kwargs") or {})
    if library == "torchvision":
        kwargs = _torchvision_kwargs(arch, list(state), kwargs)
    model = build_model(builder, len(labels), head, classifier, kwargs)
    _load_weights(model, state, ckpt)
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
        "metrics": _metrics(run),
    }
    out = Path(out_dir) if out_dir is not None else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    if "onnx" not in formats:   # a model.onnx from an earlier export would describe other weights
        (out / "model.onnx").unlink(missing_ok=True)

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": "pt", **{k: json.dumps(v, ensure_ascii=False) for k, v in meta.items()}}
    atomic_write(out / WEIGHTS, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))

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
    atomic_write_text(out / "README.md", _model_card(meta, _recipe(run), _scan(run), formats))
    return out
