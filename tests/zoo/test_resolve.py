"""zoo.resolve: ad-hoc ``timm:``/``hf-hub:`` references resolve to entries with derived stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo.errors import UnknownModelError, UsageError
from zoo.resolve import get_entry


def test_registry_names_resolve_too():
    assert get_entry("resnet50").name == "resnet50" and get_entry(" ResNet50 ").name == "resnet50"


def test_timm_reference_resolves_without_entry():
    e = get_entry("timm:resnet18")
    assert e.name == "timm:resnet18" and e.builder == "timm:resnet18" and e.family == "resnet"
    assert e.classifier == "fc" and e.stages == (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
    assert e.params == 11_689_512
    src = e.sources[0]
    assert src.kind == "hf" and src.repo.startswith("timm/resnet18.") and src.sha256 is None and src.sha256_note
    assert e.preprocessing.origin.startswith("timm pretrained_cfg (resnet18.")


def test_timm_reference_with_tag_and_unknowns():
    e = get_entry("timm:resnet18.tv_in1k")
    assert e.sources[0].repo == "timm/resnet18.tv_in1k" and e.preprocessing.interpolation == "bilinear"
    with pytest.raises(UnknownModelError, match="resnet18"):
        get_entry("timm:resnet18x")
    with pytest.raises(UnknownModelError, match="no pretrained tag"):
        get_entry("timm:resnet18.nope_in1k")


@pytest.mark.parametrize("typed", ["timm:../../x", "timm:", "timm:.", "timm:a/b", "timm:resnet18.", "timm:~/w.pth"])
def test_a_timm_name_with_a_path_or_no_architecture_shows_what_was_typed_and_a_valid_name(typed):
    """QA (helper-64): `timm:../../x` (a path, an empty architecture) said `timm 1.0 has no architecture ''`:
    neither what was typed nor what a timm name looks like."""
    with pytest.raises(UnknownModelError) as info:
        get_entry(typed)
    assert str(info.value).startswith(f"{typed!r} is not a timm model name: timm: takes an architecture, with a "
                                      "pretrained tag or without, in letters, digits and '_' (timm:resnet50, "
                                      "timm:resnet18.a1_in1k); ")


@pytest.mark.parametrize("typed,error,write", [
    ("timm: resnet50", UnknownModelError, "timm:resnet50"), ("timm : resnet18.a1_in1k", UnknownModelError,
                                                            "timm:resnet18.a1_in1k"),
    ("hf-hub: owner/name", UsageError, "hf-hub:owner/name"), ("hf-hub :owner/name", UsageError, "hf-hub:owner/name")])
def test_a_prefix_typed_with_a_space_says_the_name_to_write(typed, error, write, tmp_path):
    """QA: `zoo finetune 'timm: resnet50'` got the generic "is not a timm model name" line, `hf-hub: owner/name`
    "is not a Hub reference"; each now says what is wrong and the name to write, in one line, before any scan
    (resolve_early) and wherever a name is resolved (resolve_entry, get_entry)."""
    from click.testing import CliRunner

    from tests.conftest import make_image_folder
    from zoo.cli import cli
    from zoo.hub import resolve_early, resolve_entry

    said = f"{typed!r} has a space around the colon of '{write.split(':')[0]}:'; write {write} (no space)"
    for resolve in (get_entry, resolve_early, resolve_entry):
        with pytest.raises(error) as info:
            resolve(typed)
        assert str(info.value) == said
    data = make_image_folder(tmp_path / "data", per_class=2)
    r = CliRunner().invoke(cli, ["finetune", typed, "--data", str(data), "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and r.output == f"zoo: error: {said}\n" and not (tmp_path / "run").exists(), r.output


@pytest.mark.parametrize("typed", ["hf-hub:../x", "hf-hub:a/..", "hf-hub:-a/b", "hf-hub:a--b/c", "hf-hub:a/.b",
                                   "hf-hub:a/b.git"])
def test_an_hf_hub_name_the_hub_would_refuse_is_one_line_not_a_traceback(typed):
    """QA (h72): `zoo info hf-hub:../x` (`a/..`, `-a/b`: names that passed zoo's pattern, [\\w.-]+/[\\w.-]+)
    reached huggingface_hub, whose HFValidationError ended every command in a traceback. The Hub's own rule is
    checked first (zoo.resolve.check_hub_repo), in one line."""
    from click.testing import CliRunner

    from zoo.cli import cli
    from zoo.hub import resolve_early, resolve_entry

    said = (f"'{typed}' is not a Hub reference; write hf-hub:<org>/<repo>, each in letters, digits, '-', '_' and "
            "'.' (no '--' or '..'), beginning and ending with a letter, digit or '_', the name not ending in '.git'")
    for resolve in (get_entry, resolve_early, resolve_entry):
        with pytest.raises(UsageError) as info:
            resolve(typed)
        assert str(info.value) == said
    r = CliRunner().invoke(cli, ["info", typed])
    assert r.exit_code == 2 and r.output == f"zoo: error: {said}\n", r.output


@pytest.mark.parametrize("repo", ["timm/resnet50.a1_in1k", "google/vit-base-patch16-224", "facebook/convnext-tiny-224",
                                  "01-ai/x", "_a/b_", "A/B", "a.b/c.d", "a/x.GIT", "a.git/b", "a/" + "x" * 96,
                                  "x" * 96 + "/a", "a/b.git", "a/" + "x" * 97, "a-/b", "a/.b", "a/b--c", "a/b..c",
                                  "caf\u00e9/x", "a/b/c", "a b/c"])
def test_the_hub_repo_rule_is_huggingface_hubs_own(repo):
    """Review (h77): zoo.entry.HUB_REPO_RE takes exactly the <org>/<repo> ids huggingface_hub's validate_repo_id
    takes: `a/b.git` passed it and ended `zoo info hf-hub:a/b.git` in HFValidationError's traceback."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from zoo.entry import HUB_REPO_RE

    try:
        validate_repo_id(repo)
        hub = True
    except HFValidationError:
        hub = False
    assert bool(HUB_REPO_RE.fullmatch(repo)) == hub


def _cache_hf_config(cache: Path, repo: str, config: dict) -> None:
    # The huggingface_hub cache layout: refs/main -> snapshots/<commit>/<file>.
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = "a" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "snapshots" / commit / "config.json").write_text(json.dumps(config))


def test_hf_hub_reference_uses_cached_config(_isolated_home):
    config = {"architecture": "test_resnet", "num_classes": 7,
              "pretrained_cfg": {"input_size": [3, 160, 160], "interpolation": "bilinear", "crop_pct": 0.95,
                                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "classifier": "fc"}}
    _cache_hf_config(_isolated_home / "hf" / "hub", "someone/tiny-resnet", config)
    e = get_entry("hf-hub:someone/tiny-resnet")
    assert e.builder == "timm:test_resnet" and e.num_classes == 7 and e.classifier == "fc"
    assert e.preprocessing.input_size == (3, 160, 160)
    src = e.sources[0]
    assert (src.kind, src.repo, src.revision, src.filename, src.sha256) == (
        "hf", "someone/tiny-resnet", "main", "model.safetensors", None)


def test_hf_hub_reference_without_config_says_what_to_do():
    with pytest.raises(UsageError, match="hf download someone/absent config.json"):
        get_entry("hf-hub:someone/absent")
    with pytest.raises(UsageError, match="hf-hub:<org>/<repo>"):
        get_entry("hf-hub:not a repo")
