"""Reading a bundle: the safetensors header's metadata and config.json (JSON only, nothing unpickled), the
finetuned architecture rebuilt (``build_model``), ``Bundle`` / ``load_bundle`` / ``load_model``."""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from PIL import Image

from finetune.core.io import (SafetensorsHeaderError, broken_link, parse_safetensors_header, read_safetensors_header,
                              printable_name, sha256_file, shell_command)
from zoo.build import TORCHVISION_KWARGS, build_network, create_model
from zoo.network import build_to_load
from zoo.bundle.checks import DATA_KEYS as _DATA_KEYS, WEIGHTS, check_config, class_count as _class_count
from zoo.errors import BundleError, RegistryError, UsageError
from zoo.outdir import lock_holder, sweep_trial
from zoo.resolve import hub_config
from zoo.hub import resolve_entry

if TYPE_CHECKING:  # torch is imported lazily: reading metadata must not need it
    import torch


BUNDLE_FORMAT = "1"          # bumped when the metadata layout changes incompatibly
# Metadata about this machine, never published (zoo push drops it): the folders the model was trained and
# validated on (absolute paths; `zoo eval` warns when it is given them).
LOCAL_KEYS = ("data_folders",)
CONFIG = "config.json"


# ------------------------------------------------------------------------------------------ reading


def read_safetensors_metadata(path: str | os.PathLike, fix: str = "re-export it with `zoo export RUN_DIR`",
                              data: bytes | None = None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after checking the file is complete. No torch, no pickle.

    Args:
        fix: what the error message tells the user to do (a bundle: re-export; a run's checkpoint: other).
        data: the file's bytes, when the caller has read them (``path`` then only names it in errors).
    Raises:
        BundleError: missing, truncated, or with a header that is not safetensors JSON.
    """
    path = Path(path)
    try:
        header = read_safetensors_header(path) if data is None else parse_safetensors_header(data)
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    except SafetensorsHeaderError as e:
        raise BundleError(f"{path} is not a complete safetensors file: {e}; {fix}") from None
    return dict(header.get("__metadata__") or {})


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """A bundle's header metadata, decoded (every reader of a bundle: load_bundle, zoo push); a bundle of
    another format than this zoo's (a newer zoo's export) is refused, not read as this format (QA)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":          # the one plain string, as transformers/timm write it
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise BundleError(f"{path}: metadata field {key!r} is not JSON; re-export with "
                              "`zoo export RUN_DIR`") from None
    fmt = out.get("zoo_bundle")
    if fmt is not None and str(fmt) != BUNDLE_FORMAT:      # (exports before the field carry none: format 1)
        raise BundleError(f"{path} is a bundle of format {str(fmt)[:20]!r}, written by another version of "
                          f"zoo-finetune; this one reads format {BUNDLE_FORMAT!r}: use the version that exported it "
                          "or a newer one (pip install -U zoo-finetune), or export the run again with this one")
    return out


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e.__class__.__name__}); {what}") from None
    except OSError as e:        # a folder in its place, no permission
        raise BundleError(f"{path} cannot be read ({e.strerror or e}); {what}") from None
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
                builder_kwargs: dict[str, Any] | None = None,
                state: dict[str, "torch.Tensor"] | None = None) -> "torch.nn.Module":
    """Rebuild the finetuned architecture: ``zoo.build.build_network`` plus the recorded head; random weights, or
    none when ``state`` is given (``zoo.network.build_to_load``: the tensors to load next).

    Args:
        builder: "timm:<arch>" or "torchvision:<arch>".
        num_classes: C.
        head: {"kind": "linear"|"mlp", "hidden", "dropout", "activation"}; None means linear.
        classifier: module name of the head ("fc", "classifier", ...), needed for MLP heads.
        builder_kwargs: extra constructor arguments (timm ``model_args`` / torchvision kwargs).
        state: the state dict to be loaded into it (the caller's random streams are then left as they were).
    Raises:
        BundleError: an unknown builder or architecture.
    """
    head = head or {"kind": "linear"}

    def build() -> "torch.nn.Module":
        try:
            model = build_network(builder, int(num_classes), builder_kwargs, where=f"bundle builder {builder!r}")
        except RegistryError as e:
            raise BundleError(f"{e}; is the installed timm/torchvision too old?") from None
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise BundleError(f"cannot build {builder!r}: {e}; is the installed timm/torchvision too old?") from None
        if head.get("kind", "linear") == "mlp":
            # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
            from finetune.core.surgery import replace_head

            replace_head(model, classifier, int(num_classes), kind="mlp", hidden=int(head.get("hidden", 512)),
                         dropout=float(head.get("dropout", 0.2)), activation=str(head.get("activation", "relu")))
        return model

    return build() if state is None else build_to_load(build, state)


def _load_weights(model: "torch.nn.Module", state: dict[str, Any], where: Path, fix: str = "re-export the run") -> None:
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()[-1].strip()
        raise BundleError(f"{where} does not fit the architecture ({first}); {fix}") from None
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
                 (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise BundleError(f"{where} does not fit the architecture ({detail}); {fix}")


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

    @property
    def tta_mirror(self) -> bool:
        """Whether test-time augmentation may average over mirrored views: the model learnt from mirrored
        images (recorded at export; a bundle exported before that, and a registry model: yes)."""
        return self.metadata.get("trained_on_mirrors") is not False

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.transform
        yield self.labels

    def predict(self, images: Any, topk: int = 5, tta: bool = False, tta_scales: Sequence[int] | None = None,
                batch_size: int = 32, tta_views: str = "flip") -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image, best first.

        Args:
            images: a PIL image or path, or a list of them. A PIL image is read as its file would be (turned
                upright by its EXIF orientation, transparency on white); one as ``Image.open`` returns it, not
                decoded yet, is decoded and checked from its file as the path is (a big JPEG at the same reduced
                scale, a PNG's checksums) and left unchanged; one loaded or changed before is used as given.
            topk: how many classes per image (at least 1; capped at the number of classes).
            tta: average the softmax over several views of each image, as ``zoo predict --tta``:
                ``tta_views`` "flip" (the validation view and its mirror) or "ten" (ten fixed crops);
                ``tta_scales`` ten-crops at each of these sizes. A model trained without mirrored images
                (``tta_mirror`` False) gets no mirrored view: flip is then the plain view, ten five crops.
        Raises:
            BundleError: an image cannot be read (the message names it).
            UsageError: ``topk`` below 1, an unknown ``tta_views``.
        """
        # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
        from zoo.predict import predict_probs, topk as _topk

        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:   # (numpy ints too)
            raise UsageError(f"topk={topk!r}: give the number of classes wanted per image, 1 or more")
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)

        def fail(item: Any, reason: str) -> None:
            if not isinstance(item, (str, os.PathLike, Image.Image)):    # an array, a tensor: not its repr
                raise BundleError(f"cannot read a {type(item).__name__}: give a file path or a PIL image "
                                  "(PIL.Image.fromarray(array) for an HxWx3 uint8 array)")
            name = os.fsdecode(getattr(item, "filename", "") or "") if isinstance(item, Image.Image) else None
            what = item if name is None else f"PIL image of {printable_name(name)}" if name else "PIL image"
            raise BundleError(f"cannot read image {what}: {reason}; check the file")     # (Image.open(path): named)

        _, probs = predict_probs(self.model, images, self.data_config, tta=tta, tta_scales=tta_scales,
                                 tta_views=tta_views, batch_size=batch_size, on_error=fail, mirror=self.tta_mirror)
        return _topk(probs, self.labels, int(topk))

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

    The files are read by name several times (header, config.json, digest, tensors). A ``zoo export`` that
    replaces the bundle meanwhile would pair one export's labels and preprocessing with the other's weights,
    so the read is repeated until both files were the same from its start to its end.

    Raises:
        BundleError: a missing, truncated or inconsistent file; the message says which and what to do.
    """
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    for _ in range(_READ_TRIES):
        before = _files_state(path)
        try:
            bundle = _read_bundle(path, device)
        except BundleError as err:
            if _files_state(path) != before:
                continue        # a file was replaced while it was read: what failed may be that mix
            writer = lock_holder(path)    # an export caught between its two files: say so, not "re-export"
            if writer:
                raise BundleError(f"{path} cannot be read while another process writes it: {writer}; try again "
                                  "when it is done") from None
            raise err
        if _files_state(path) == before:
            return bundle
    raise BundleError(f"{path} changed every time it was read ({_READ_TRIES} tries): a `zoo export` is writing "
                      "into it; try again when it is done")


_READ_TRIES = 3


def _files_state(path: Path) -> tuple:
    """What tells one version of the bundle's two files from another: ``zoo export`` replaces each by a new
    file (a new inode, new times), so this changes whenever a file was replaced or rewritten."""
    state = []
    for name in (WEIGHTS, CONFIG):
        try:
            st = os.stat(path / name)
            state.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


def _read_bundle(path: Path, device: Any) -> Bundle:
    """One read of the bundle folder ``path`` (see load_bundle)."""
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from finetune.core.checkpoint import read_tensors

    if path.is_file():
        raise BundleError(f"{path} is a file, not a bundle: give the folder `zoo export` wrote (it holds {WEIGHTS} "
                          f"and {CONFIG})")
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}; export one with "
                          f"`{shell_command('zoo', 'export', 'RUN_DIR', '--out', path)}`")
    weights = path / WEIGHTS
    if not weights.exists() and ((path / "model.json").is_file() or (path / "checkpoints").is_dir()):
        if (trial := sweep_trial(path)) is not None:
            raise BundleError(trial)
        exported = path / "export"     # a run folder: `zoo finetune` exports its bundle there by default
        raise BundleError(f"{path} is a run folder, not a bundle: " + (
            f"use its bundle, {exported}" if (exported / WEIGHTS).is_file()
            else f"export one first with `{shell_command('zoo', 'export', path)}`"))
    if not weights.exists() and not (path / CONFIG).exists():   # (QA: "re-export it", said of an image folder)
        raise BundleError(f"{path} is not a bundle (it holds neither {WEIGHTS} nor {CONFIG}): give the folder "
                          "`zoo export` wrote (RUN_DIR/export), or a model name")
    meta = _decode_metadata(read_safetensors_metadata(weights), weights)
    config = _read_json(path / CONFIG, "re-export with `zoo export RUN_DIR`")
    if "builder" not in meta or "label_names" not in meta:
        raise BundleError(f"{weights} carries no zoo metadata (builder, label_names); "
                          "it was not written by `zoo export`; export the run again")
    labels = [str(x) for x in meta["label_names"]]
    num_classes = _class_count(meta.get("num_classes", len(labels)), weights)
    if num_classes != len(labels):
        raise BundleError(f"{path}: inconsistent class count (metadata {num_classes}, labels {len(labels)}); "
                          "re-export with `zoo export RUN_DIR`")
    zoo_cfg = config.get("zoo") if isinstance(config.get("zoo"), dict) else {}    # (not an object: check_config says)
    _check_weights_digest(weights, zoo_cfg.get("weights_sha256"))
    check_config(config, labels, num_classes, path / CONFIG, meta)
    missing = [k for k in _DATA_KEYS if k not in meta and k != "crop_mode"]
    if missing:
        raise BundleError(f"{weights} lacks preprocessing metadata {missing}; re-export with `zoo export RUN_DIR`")
    data_config = {k: meta[k] for k in _DATA_KEYS if k in meta}
    data_config.setdefault("crop_mode", "center")
    data_config["input_size"] = tuple(int(v) for v in data_config["input_size"])
    data_config["mean"] = tuple(float(v) for v in data_config["mean"])
    data_config["std"] = tuple(float(v) for v in data_config["std"])
    data_config["crop_pct"] = float(data_config["crop_pct"])

    builder = str(meta["builder"])
    kwargs = dict(meta.get("builder_kwargs") or zoo_cfg.get("builder_kwargs") or {})
    if builder.startswith("timm:"):
        kwargs = {**dict(config.get("model_args") or {}), **kwargs}
    try:
        state = read_tensors(weights)
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise BundleError(f"{weights} cannot be read ({e}); re-export with `zoo export RUN_DIR`") from None
    model = build_model(builder, num_classes, meta.get("head"), str(meta.get("classifier", "")), kwargs, state)
    _load_weights(model, state, weights)
    model.eval().to(device)

    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from zoo.predict import eval_transform

    # the weights' digest, checked above: what `zoo eval` records of the model it evaluated
    meta = {**meta, "weights_sha256": zoo_cfg.get("weights_sha256")}
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
    if (link := broken_link(p)) is not None:   # (review: "unknown model 'b'" of a link to a bundle moved away)
        raise BundleError(f"{link}: point the link at the bundle folder, or give the folder itself")
    text = str(spec)
    if not text.startswith(("hf-hub:", "timm:")) and (os.sep in text or text.startswith(".")
                                                       or text.endswith(".safetensors")):
        raise BundleError(f"no bundle at {text}; export one with "
                          f"`{shell_command('zoo', 'export', 'RUN_DIR', '--out', text)}`")
    # lazy: reading a bundle's metadata (zoo push, zoo list --mine) must not import torch
    from zoo.predict import eval_transform

    entry = resolve_entry(text)        # (an hf-hub: repo's config.json fetched once, as every command does)
    # a published model (e.g. by `zoo push`): its config names its classes
    hub_cfg = hub_config(text[len("hf-hub:"):]) if text.startswith("hf-hub:") else None
    model = create_model(entry, pretrained=pretrained).eval().to(device)
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
