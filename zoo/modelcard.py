"""The Hub model card of a pushed repo: README.md with a YAML header the Hub reads (library_name,
pipeline_tag, license, base_model, tags, model-index) and a body that says what the model is."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from finetune.core.io import load_yaml, read_json_object
from zoo.registry import public_source_id
from zoo.text import first_line

__all__ = ["model_card", "run_recipe", "run_scan", "trained_recipe", "HUB_LICENSES"]

# licence ids the Hub's metadata validator knows (those the registry uses); anything else is "other"
HUB_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "bsd", "cc-by-4.0", "cc-by-nc-4.0",
                "cc-by-sa-4.0", "cc-by-nc-sa-4.0", "llama2", "openrail", "gpl-3.0", "lgpl-3.0", "agpl-3.0",
                "cc0-1.0", "unlicense")


def run_recipe(run: Path | None) -> dict[str, Any]:
    """The run's config.yaml as a mapping, or {} when there is none or it is damaged (a card leaves it out)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    try:
        data = load_yaml((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


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


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


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


def model_card(repo: str, meta: dict[str, Any], config: dict[str, Any], run: Path | None,
               test: dict[str, Any] | None = None) -> str:
    """README.md: a YAML header the Hub understands (built with huggingface_hub's ModelCardData, with a
    model-index of the validation and test accuracies) and a body that says what the model is."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import ModelCard, ModelCardData

    labels = [str(x) for x in meta.get("label_names") or config.get("label_names") or []]
    library, _, arch = str(meta.get("builder", "timm:?")).partition(":")
    pcfg = config.get("pretrained_cfg") or {}
    source = public_source_id(meta.get("source") or pcfg.get("source"))
    licence = str(pcfg.get("license") or "unknown").lower()
    base_model = source[3:].split("@", 1)[0] if source and source.startswith("hf:") else None
    scan, scan_problem = run_scan(run)
    summary = read_json_object(run / "summary.json") if run else {}
    recipe = run_recipe(run)
    metrics = dict(meta.get("metrics") or summary.get("metrics") or {})
    data_name = Path(str(scan.get("root") or "image folder")).name or "image folder"
    test = test or {}

    card_data = ModelCardData(
        library_name="timm" if library == "timm" else "pytorch", pipeline_tag="image-classification",
        license=licence if licence in HUB_LICENSES else "other",
        license_name=None if licence in HUB_LICENSES else (licence if licence != "unknown" else "unknown"),
        base_model=base_model, tags=["image-classification", library, "zoo-finetune", arch],
        model_name=repo.split("/", 1)[1], eval_results=_eval_results(metrics, test, data_name) or None)

    name = meta.get("model") or arch
    head = (meta.get("head") or {}).get("kind", "linear")
    lines = [f"# {repo.split('/', 1)[1]}", "",
             f"An image classifier for {len(labels)} classes: `{name}` ({meta.get('builder')}, "
             f"{head} head) finetuned with [zoo-finetune](https://github.com/) (`zoo finetune`).", "",
             "## Data", ""]
    lines += _data_lines(scan, labels, run)
    lines += ["", f"(The run's scan.json is present but unreadable ({scan_problem}), so the data is not "
                  "described here.)"] if scan_problem else []
    lines += _recipe_lines(recipe, summary, metrics, test)
    lines += ["", "## Source weights", "",
              f"- {source or 'none (random initialisation)'}",
              f"- sha256 of the file: {meta.get('source_sha256') or 'unknown'}",
              f"- licence of the base weights: {licence}",
              "", "## Preprocessing", "",
              f"input {tuple(meta.get('input_size', ()))}, {meta.get('interpolation')} resize to input/crop_pct "
              f"(crop_pct {meta.get('crop_pct')}), centre crop, mean {tuple(meta.get('mean', ()))}, "
              f"std {tuple(meta.get('std', ()))}; recorded in config.json's pretrained_cfg.", "", "## Use", ""]
    if library == "timm" and head == "linear":
        lines += ["```python", "import timm, torch", "from PIL import Image", "",
                  f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)",
                  'x = transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)',
                  "probs = model(x).softmax(-1)",
                  'labels = model.pretrained_cfg["label_names"]', "```", ""]
    lines += ["With zoo-finetune (same sha256 checks and cache as its curated models):", "", "```bash",
              f"zoo pull hf-hub:{repo}", f"zoo predict hf-hub:{repo} image.jpg", "```", ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _eval_results(metrics: dict[str, Any], test: dict[str, Any], data_name: str) -> list:
    """The model-index entries: validation accuracy, test accuracy and top-5 where recorded."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import EvalResult

    results = []
    if isinstance(metrics.get("val_acc"), (int, float)):
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                  dataset_name=data_name, dataset_split="validation", metric_type="accuracy",
                                  metric_value=float(metrics["val_acc"]), metric_name="validation accuracy"))
    if isinstance(test.get("accuracy"), (int, float)):
        tta = " (TTA)" if _tta_views(test) else ""
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                  dataset_name=data_name, dataset_split="test", metric_type="accuracy",
                                  metric_value=float(test["accuracy"]), metric_name=f"test accuracy{tta}"))
        if isinstance(test.get("top5"), (int, float)):
            results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                      dataset_name=data_name, dataset_split="test", metric_type="top_5_accuracy",
                                      metric_value=float(test["top5"]), metric_name=f"test top-5 accuracy{tta}"))
    return results


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


def _data_lines(scan: dict[str, Any], labels: list[str], run: Path | None) -> list[str]:
    """The card's data section: images per class and split (or the class names), images left out."""
    lines: list[str] = []
    counts = scan.get("counts") if isinstance(scan.get("counts"), dict) else {}
    if counts:
        lines += ["| class | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
        for c in labels[:200]:
            lines.append(f"| {c} | " + " | ".join(str((counts[s] or {}).get(c, 0)) if isinstance(counts[s], dict)
                                                  else "-" for s in counts) + " |")
        totals = {s: sum(v for v in per.values() if isinstance(v, int)) for s, per in counts.items()
                  if isinstance(per, dict)}
        lines += ["", "Images: " + ", ".join(f"{s} {n}" for s, n in totals.items()) + "."]
    else:
        lines.append("Classes: " + ", ".join(f"`{c}`" for c in labels[:200]))
    if run is not None and (run / "exclude.txt").is_file():
        left = [x for x in (run / "exclude.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        lines += ["", f"`zoo doctor` findings: {len(left)} image(s) (duplicates, near-duplicates across splits or "
                  "suspect labels) were left out of training and validation with `--exclude`."]
    return lines


def _recipe_lines(recipe: dict[str, Any], summary: dict[str, Any], metrics: dict[str, Any],
                  test: dict[str, Any]) -> list[str]:
    """The card's recipe and metrics sections."""
    lines: list[str] = []
    lines += ["", "## Recipe", ""]
    recipe = trained_recipe(recipe, summary)
    facts = {"optimizer": recipe.get("optimizer"), "learning rate": recipe.get("lr"),
             "head solver": recipe.get("head_solver"), "schedule": recipe.get("schedule"),
             "epochs": recipe.get("epochs"), "epochs run": summary.get("epochs_run"),
             "best epoch": summary.get("best_epoch"), "freeze depth": recipe.get("freeze"),
             "batch size": recipe.get("batch_size"), "weight decay": recipe.get("weight_decay"),
             "phases": ", ".join(summary.get("phases") or []) or None}
    lines += [f"- {k}: {_fmt(v)}" for k, v in facts.items() if v not in (None, "")] or ["- (not recorded)"]
    lines += ["", "## Metrics", ""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += [f"- validation {k.removeprefix('val_')}: {_fmt(v)}" for k, v in scalars.items()]
    if test:
        views = _tta_views(test)    # a single-view prediction (timm, zoo predict) scores lower: say how it was got
        lines += [f"- test accuracy: {_fmt(test['accuracy'])} on {test.get('n_images', '?')} images"
                  + (f" (top-5 {_fmt(test['top5'])})" if isinstance(test.get("top5"), float) else "")
                  + (f", with test-time augmentation: the softmax averaged over {views}" if views else "")]
    if not scalars and not test:
        lines.append("- (none recorded)")
    return lines
