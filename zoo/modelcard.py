"""The Hub model card of a pushed repo: README.md with a YAML header the Hub reads (library_name,
pipeline_tag, license, base_model, tags, model-index) and a body that says what the model is."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from finetune.core.io import load_yaml, printable, read_json_object, read_user_text, shell_command
from zoo.registry import public_source_id
from finetune.core.metrics import accuracy_text
from zoo.text import first_line

__all__ = ["model_card", "plain_timm_refusal", "download_command", "recorded_recipe", "run_recipe", "run_scan",
           "trained_recipe", "HUB_LICENSES"]

# licence ids the Hub's metadata validator knows (those the registry uses); anything else is "other"
HUB_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "bsd", "cc-by-4.0", "cc-by-nc-4.0",
                "cc-by-sa-4.0", "cc-by-nc-sa-4.0", "llama2", "openrail", "gpl-3.0", "lgpl-3.0", "agpl-3.0",
                "cc0-1.0", "unlicense")
CARD_CLASSES = 200           # classes listed by name in a card; a bigger label set is counted
# the run's options a card gives (config.yaml, as trained: trained_recipe), in this order
RECIPE_KEYS = ("optimizer", "lr", "head_solver", "backbone_lr_mult", "layer_decay", "schedule", "epochs", "batch_size",
               "freeze", "head", "bn", "sync_bn", "class_weights", "sampler", "weight_decay", "augment",
               "label_smoothing", "mixup", "cutmix", "ema", "seed")
MLP_NOTE = ("Note: the MLP head is recorded in config.json (`zoo.head`) and rebuilt by `zoo.load_bundle`; plain timm "
            "cannot rebuild this head ({load} fails to load it).")


def run_recipe(run: Path | None) -> dict[str, Any]:
    """The run's config.yaml as a mapping, or {} when there is none or it is damaged (a card leaves it out)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    try:
        data = load_yaml(read_user_text(run / "config.yaml")) or {}
    except (OSError, ValueError, yaml.YAMLError):     # (UnicodeDecodeError is a ValueError)
        return {}
    # every option is a number, text or true/false: a hand-edited list of nested aliases (a few lines that
    # print as billions of items) took zoo export minutes and 13 GB before it was killed (QA)
    return {k: v for k, v in data.items() if v is None or isinstance(v, (str, int, float))} \
        if isinstance(data, dict) else {}


def run_scan(run: Path | None) -> tuple[dict[str, Any], str | None]:
    """The run's scan.json as a mapping, and why it cannot be read when it is there but damaged (not UTF-8,
    not JSON, no object): a card then says "present but unreadable", not "no scan.json". ({}, None) without
    one. The reason names no path (a card must not publish the local folder)."""
    if run is None:
        return {}, None
    try:
        data = json.loads((run / "scan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as err:    # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return {}, first_line(err) if not isinstance(err, OSError) else (err.strerror or type(err).__name__)
    return (data, None) if isinstance(data, dict) else ({}, "it holds no JSON object")


def trained_recipe(recipe: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The run's config.yaml (``recipe``) as the run trained, for a model card: ``freeze`` as the policy decided
    it (config.yaml keeps what was asked, e.g. auto), ``head_solver`` where L-BFGS solved the head, whose
    optimizer and lr then trained only the layers after it, or nothing, and ``best_phase``, the phase of the
    weights kept (summary.json; None for runs from before it was recorded)."""
    out = dict(recipe, best_phase=summary.get("best_phase"))     # not shown: says whose weights were kept
    freeze = summary.get("freeze") if isinstance(summary.get("freeze"), dict) else {}
    if freeze.get("label"):
        asked = recipe.get("freeze")
        out["freeze"] = str(freeze["label"]) + (f" ({asked})" if asked not in (None, freeze["label"]) else "")
    if summary.get("head_solver"):
        after = "the optimizer and lr trained the layers after it" if "finetune" in (summary.get("phases") or []) \
            else "the optimizer and lr trained nothing"
        out["head_solver"] = f"lbfgs (the head solved on cached features, no learning rate; {after})"
    else:
        out.pop("head_solver", None)
    return out


def recorded_recipe(recipe: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What a card's recipe section reads from the run folder, as `zoo export` records it in the bundle's metadata
    (``recipe``): config.yaml's options (``recipe``) and summary.json's freeze as decided, solved head, phases and
    epochs, so that a bundle pushed without its run folder keeps its recipe."""
    freeze = summary.get("freeze") if isinstance(summary.get("freeze"), dict) else {}
    facts = {"freeze": {"label": str(freeze["label"])} if freeze.get("label") else None,
             "head_solver": True if summary.get("head_solver") else None,
             "phases": [str(p) for p in summary["phases"]] if isinstance(summary.get("phases"), list) else None,
             **{k: summary.get(k) for k in ("best_phase", "epochs_run", "best_epoch")}}
    return {"config": {k: recipe[k] for k in RECIPE_KEYS if k in recipe},
            "summary": {k: v for k, v in facts.items() if v is not None}}


def _card_recipe(meta: dict[str, Any], run: Path | None, summary: dict[str, Any]) -> tuple[dict, dict, bool]:
    """(config.yaml's options, summary.json, whether they were recorded) for a card: the bundle's own record
    (it describes these weights, wherever the bundle was copied), else its run folder's files (a bundle exported
    before the record), else nothing."""
    rec = meta.get("recipe")
    if isinstance(rec, dict) and isinstance(rec.get("config"), dict) and isinstance(rec.get("summary"), dict):
        config = {k: v for k, v in rec["config"].items() if v is None or isinstance(v, (str, int, float))}
        return config, rec["summary"], True
    return run_recipe(run), summary, run is not None


def model_card(meta: dict[str, Any], run: Path | None, licence: str | None, *, repo: str | None = None,
               onnx_atol: float | None = None, test: dict[str, Any] | None = None,
               revision: str | None = None) -> str:
    """A bundle's README.md: what the model is, its data, recipe, metrics, source weights, preprocessing and
    how to use it, from its metadata (``meta``: model.safetensors' header) and its run folder (``run``:
    scan.json, summary.json, config.yaml, exclude.txt; None for a bundle without one).

    ``repo`` None: the card `zoo export` writes into the bundle (the local data folder named; ``onnx_atol``:
    the bundle has a model.onnx, checked within that). ``repo`` given: the card of that Hub repo (`zoo push`):
    a YAML header the Hub reads (built with huggingface_hub's ModelCardData, a model-index of the validation and
    ``test`` accuracies), nothing local, and how to load it from the Hub (from ``revision``, a branch; None:
    main). ``licence``: the base weights' (config.json's pretrained_cfg)."""
    labels = [str(x) for x in meta.get("label_names") or []]
    library, arch, head = _builder_and_head(meta)
    scan, scan_problem = run_scan(run)
    summary = read_json_object(run / "summary.json") if run else {}
    metrics = next((m for m in (meta.get("metrics"), summary.get("metrics")) if isinstance(m, dict) and m), {})
    name = meta.get("model") or arch
    title = repo.split("/", 1)[1] if repo else f"{name} finetuned on {len(labels)} classes"
    lines = [f"# {title}", "", f"An image classifier for {len(labels)} classes: `{name}` (`{meta.get('builder')}`, "
             f"{head} head), finetuned with zoo-finetune (`zoo finetune`).", "", "## Data", ""]
    lines += _data_lines(scan, scan_problem, labels, run, published=repo is not None)
    lines += _recipe_lines(*_card_recipe(meta, run, summary))
    lines += _metrics_lines(metrics, test or {})
    lines += _source_lines(meta, licence)
    lines += ["", "## Preprocessing", "",
              f"input {_values(meta, 'input_size')}, {meta.get('interpolation')} resize to input/crop_pct "
              f"(crop_pct {meta.get('crop_pct')}), centre crop, mean {_values(meta, 'mean')}, "
              f"std {_values(meta, 'std')}; recorded in config.json's pretrained_cfg.", "", "## Use", ""]
    lines += _hub_use_lines(repo, meta, revision) if repo else _bundle_use_lines(meta, onnx_atol)
    body = "\n".join(lines)
    if repo is None:
        return body
    return _with_hub_header(repo, meta, licence, library, arch, body, _eval_results(metrics, test or {}))


def _with_hub_header(repo: str, meta: dict[str, Any], licence: str | None, library: str, arch: str, body: str,
                     eval_results: list) -> str:
    """``body`` under the YAML header the Hub reads: library, pipeline tag, licence, base model, tags, model-index."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import ModelCard, ModelCardData

    licence = str(licence or "unknown").lower()
    source = public_source_id(meta.get("source"))
    card_data = ModelCardData(
        library_name="timm" if library == "timm" else "pytorch", pipeline_tag="image-classification",
        license=licence if licence in HUB_LICENSES else "other",
        license_name=None if licence in HUB_LICENSES else licence,
        base_model=source[3:].split("@", 1)[0] if source and source.startswith("hf:") else None,
        tags=["image-classification", library, "zoo-finetune", arch],
        model_name=repo.split("/", 1)[1], eval_results=eval_results or None)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def _eval_results(metrics: dict[str, Any], test: dict[str, Any]) -> list:
    """The model-index entries: validation accuracy, test accuracy and top-5 where recorded (finite numbers).
    The dataset is named "image folder": the data folder's own name is local, as its path is."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import EvalResult

    tta = " (TTA)" if _tta_views(test) else ""
    wanted = [("validation", "accuracy", metrics.get("val_acc"), "validation accuracy"),
              ("test", "accuracy", test.get("accuracy"), f"test accuracy{tta}")]
    if _finite(test.get("accuracy")):
        wanted.append(("test", "top_5_accuracy", test.get("top5"), f"test top-5 accuracy{tta}"))
    return [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name="image folder",
                       dataset_split=split, metric_type=kind, metric_value=float(value), metric_name=name)
            for split, kind, value, name in wanted if _finite(value)]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tta_views(test: dict[str, Any]) -> str | None:
    """The views a `zoo eval --tta` report averaged (its tta_views, tta_scales, tta_mirror), in words; None
    without TTA, or where it came down to the plain view (flip on a model trained without mirrors)."""
    if not test.get("tta"):
        return None
    mirror = test.get("tta_mirror") is not False
    scales = test.get("tta_scales")
    if test.get("tta_views") == "flip" and not scales:
        return "the centre view and its mirror (`zoo predict --tta`)" if mirror else None
    sizes = ",".join(map(str, scales)) if isinstance(scales, list) and scales else ""
    return (f"{'ten' if mirror else 'five'} crops" + (f" at sizes {sizes} (`zoo predict --tta --tta-scales {sizes}`)"
                                                      if sizes else " (`zoo predict --tta --tta-views ten`)"))


def _code(name: Any) -> str:
    """A name (a class, a folder) as inline code that nothing in it can end or break: on one line, its invisible
    characters escaped as on the terminal (``cat\\u200b``, ``fi\\tsh``: ``finetune.core.io.printable``), fenced
    by more backticks than it holds in a row."""
    text = printable(name) or " "
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(name: Any) -> str:
    """A name as a markdown table cell: inline code, its pipes escaped (which a table reads first)."""
    return _code(name).replace("|", "\\|")


def _values(meta: dict[str, Any], key: str) -> tuple:
    v = meta.get(key)
    return tuple(v) if isinstance(v, (list, tuple)) else ()


def _data_lines(scan: dict[str, Any], scan_problem: str | None, labels: list[str], run: Path | None,
                published: bool) -> list[str]:
    """The card's data section: images per class and split (or the class names), images left out; the local
    folder only where the card is not ``published``."""
    lines: list[str] = []
    counts = {s: per for s, per in (scan.get("counts") or {}).items() if isinstance(per, dict)} \
        if isinstance(scan.get("counts"), dict) else {}
    if counts:
        lines += ["| class | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
        lines += [f"| {_cell(c)} | " + " | ".join(str(per.get(c, 0)) for per in counts.values()) + " |"
                  for c in labels[:CARD_CLASSES]]
        lines += [f"| ... ({len(labels)} classes in all) |" + " |" * len(counts)] if len(labels) > CARD_CLASSES else []
        totals = {s: sum(v for v in per.values() if isinstance(v, int)) for s, per in counts.items()}
        lines += ["", "Images: " + ", ".join(f"{s} {n}" for s, n in totals.items()) + "."]
    else:
        lines.append("Classes: " + ", ".join(_code(c) for c in labels[:CARD_CLASSES])
                     + (f" ... ({len(labels)} in all)" if len(labels) > CARD_CLASSES else ""))
    if scan and not published:
        lines += ["", f"Folder: {_code(scan.get('root', '?'))} (layout: {scan.get('layout', '?')})."]
    if scan_problem:
        lines += ["", f"(The run's scan.json is present but unreadable ({scan_problem}), so the data is not "
                      "described here.)"]
    elif run is not None and not scan:
        lines += ["", "(no scan.json in the run folder)"]
    if run is not None and (run / "exclude.txt").is_file():
        left = [x for x in (run / "exclude.txt").read_text(encoding="utf-8", errors="replace").splitlines()
                if x.strip()]      # (counted only)
        lines += ["", f"`zoo doctor` findings: {len(left)} image(s) (duplicates, near-duplicates across splits or "
                  "suspect labels) were left out of training and validation with `--exclude`."]
    return lines


def _recipe_lines(recipe: dict[str, Any], summary: dict[str, Any], has_run: bool) -> list[str]:
    """The card's recipe: the run's options as `zoo finetune` takes them (freeze as decided, a solved head
    named), what the run did (epochs run, best epoch, phases); ``has_run``: the run's files were read (from its
    folder or the bundle's record of them)."""
    trained = trained_recipe(recipe, summary)
    lines = ["", "## Recipe", ""]
    lines += [f"- {k}: {trained[k]}" for k in RECIPE_KEYS if trained.get(k) not in (None, "")]
    if _finite(trained.get("ema")) and trained["ema"] > 0 and trained.get("best_phase") != "head":  # head: no EMA
        lines.append("- the weights are the exponential moving average of the finetune phase's (`--ema`)")
    done = {"epochs run": summary.get("epochs_run"), "best epoch": summary.get("best_epoch"),
            "phases": ", ".join(summary.get("phases") or []) or None}
    lines += [f"- {k}: {v}" for k, v in done.items() if v not in (None, "")]
    if not recipe:
        lines.append("- (no readable config.yaml in the run folder)" if has_run else "- (not recorded: no run folder)")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if not math.isnan(v) else "nan"
    return str(v)


def _metrics_lines(metrics: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """The card's metrics: the validation scalars and per-class accuracy of the weights kept; the test
    accuracy of a `zoo eval` report where one was given (with the views its TTA averaged)."""
    lines = ["", "## Metrics", ""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += [f"- validation {k.removeprefix('val_')}: {accuracy_text(v) if k.endswith('acc') else _fmt(v)}"
              for k, v in scalars.items()]
    if test:
        views = _tta_views(test)    # a single-view prediction (timm, zoo predict) scores lower: say how it was got
        lines += [f"- test accuracy: {accuracy_text(test['accuracy'])} on {test.get('n_images', '?')} images"
                  + (f" (top-5 {accuracy_text(test['top5'])})" if isinstance(test.get("top5"), float) else "")
                  + (f", with test-time augmentation: the softmax averaged over {views}" if views else "")]
    if not scalars and not test:
        lines.append("- (none recorded)")
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        lines += ["", "Per-class validation accuracy: " + ", ".join(
            f"{_code(c)} {accuracy_text(v)}" for c, v in list(per_class.items())[:CARD_CLASSES])
            + (f" ... ({len(per_class)} in all)" if len(per_class) > CARD_CLASSES else "")]
    return lines


def _source_lines(meta: dict[str, Any], licence: str | None) -> list[str]:
    if meta.get("pretrained") is False:
        return ["", "## Source weights", "", "- none: trained from random initialisation"]
    return ["", "## Source weights", "", f"- {public_source_id(meta.get('source')) or 'unknown'}",
            f"- sha256 of the file as downloaded or imported: {meta.get('source_sha256') or 'unknown'}",
            f"- licence of the base weights: {str(licence or 'unknown').lower()}"]


def _builder_and_head(meta: dict[str, Any]) -> tuple[str, str, str]:
    """(library, architecture, head kind) of a bundle from its header ``meta`` (no head recorded: linear)."""
    library, _, arch = str(meta.get("builder", "timm:?")).partition(":")
    head = str(meta["head"].get("kind", "linear")) if isinstance(meta.get("head"), dict) else "linear"
    return library, arch, head


def plain_timm_refusal(meta: dict[str, Any]) -> str:
    """Why plain timm cannot rebuild the model of a bundle from its header ``meta`` ("" when it can): a torchvision
    builder (no timm architecture of that name) or a head other than linear (zoo rebuilds it; timm's does not fit).
    The one rule for the card, ``zoo push``'s console and an ``hf-hub:`` name (zoo.resolve)."""
    library, arch, head = _builder_and_head(meta)
    if library != "timm":
        return f"`{arch}`, a {library} model, no timm architecture"
    return "" if head == "linear" else f"an {head} head, which timm's `{arch}` has not"


def download_command(repo: str, folder: str = "model-folder", revision: str | None = None) -> str:
    """The command that downloads a pushed repo's bundle files (of branch ``revision``; None: main) into ``folder``
    (``zoo predict FOLDER`` loads it)."""
    branch = ["--revision", revision] if revision not in (None, "main") else []
    return shell_command("hf", "download", repo, "config.json", "model.safetensors", *branch, "--local-dir", folder)


def _torchvision_line(arch: str, classes: int) -> str:
    return (f"Plain torchvision: `torchvision.models.get_model('{arch}', weights=None, num_classes={classes}, "
            "**config['zoo']['builder_kwargs'])` then `load_state_dict` from "
            "`safetensors.torch.load_file('model.safetensors')`.")


def _bundle_use_lines(meta: dict[str, Any], onnx_atol: float | None) -> list[str]:
    """How to load the bundle folder: zoo, plain timm or torchvision; its ONNX file."""
    library, arch, _ = _builder_and_head(meta)
    lines = ["```python", "import zoo", "bundle = zoo.load_bundle('.')", "print(bundle.predict('image.jpg', topk=3))",
             "```", ""]
    if not plain_timm_refusal(meta):
        lines += ["Plain timm rebuilds it too:", "", "```python", "import timm",
                  "model = timm.create_model('local-dir:/path/to/this/folder', pretrained=True).eval()", "```", ""]
    elif library == "timm":
        lines += [MLP_NOTE.format(load="`timm.create_model('local-dir:...')`"), ""]
    else:
        lines += [_torchvision_line(arch, len(meta.get("label_names") or [])), ""]
    if onnx_atol is not None:
        lines += [f"`model.onnx`: input `input` (N, {', '.join(str(v) for v in meta.get('input_size', ()))}), output "
                  f"`logits`; checked against PyTorch within {onnx_atol} with ONNX Runtime at export.", ""]
    return lines


def _hub_use_lines(repo: str, meta: dict[str, Any], revision: str | None) -> list[str]:
    """How to load the Hub repo's ``revision`` (a branch; None: main): plain timm (a linear head), plain
    torchvision, zoo (an ``hf-hub:`` name of main, else the files as a bundle folder)."""
    library, arch, _ = _builder_and_head(meta)
    timm_ok, main = not plain_timm_refusal(meta), revision in (None, "main")
    name = repo if main else f"{repo}@{revision}"        # timm's hf-hub: name of a branch (QA, helper-138)
    lines: list[str] = []
    if timm_ok:
        # upright by its EXIF, as zoo reads every photo (a phone's portrait photo is stored sideways)
        lines += ["```python", "import timm, torch", "from PIL import Image, ImageOps", "",
                  f'model = timm.create_model("hf-hub:{name}", pretrained=True).eval()',
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)",
                  'image = ImageOps.exif_transpose(Image.open("image.jpg")).convert("RGB")  # upright, as trained',
                  "x = transform(image).unsqueeze(0)",
                  "probs = model(x).softmax(-1)",
                  'labels = model.pretrained_cfg["label_names"]', "```", ""]
    elif library == "timm":
        lines += [MLP_NOTE.format(load=f'`timm.create_model("hf-hub:{name}")`'), ""]
    else:       # QA (helper-137): the card was silent, the push's console line named timm
        classes = len(meta.get("label_names") or [])
        lines += [f"Plain timm cannot build it (`{arch}` is a {library} model). {_torchvision_line(arch, classes)} "
                  "(the two files from `huggingface_hub.hf_hub_download`)", ""]
    if timm_ok and main:
        lines += ["With zoo-finetune (same sha256 checks and cache as its curated models):", "", "```bash",
                  f"zoo pull hf-hub:{repo}", f"zoo predict hf-hub:{repo} image.jpg", "```", ""]
    else:       # zoo builds hf-hub: names as timm models, of main: the repo's two files are a bundle folder
        lines += ["With zoo-finetune, as a bundle folder (an `hf-hub:` name is built as a timm model, from the "
                  "main branch):", "", "```bash", download_command(repo, revision=revision),
                  "zoo predict model-folder image.jpg", "```", ""]
    return lines
