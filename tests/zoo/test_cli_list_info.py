"""``zoo list`` / ``zoo info``: tables, JSON, filters, exit codes, and no torch at start-up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from zoo.cli import cli


# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _fake_cache(home, name: str) -> None:
    # What zoo.cache counts as cached: the weights and their manifest (written last).
    d = home / "weights" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (d / "manifest.json").write_text(json.dumps({"name": name}))


def test_list_table():
    r = run("list")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "TOP-1", "INPUT", "LICENCE", "CACHED"]
    rows = {l.split()[0]: l.split() for l in lines[1:]}
    assert len(rows) == 20
    assert rows["resnet50"][1:] == ["resnet", "25.6M", "76.1", "224", "bsd-3-clause", "-"]
    assert rows["inception_v3"][4] == "299"
    names = [l.split()[0] for l in lines[1:]]
    assert names.index("resnet18") < names.index("resnet50") < names.index("resnet101")  # natural order


def test_list_filters_and_json(_isolated_home):
    _fake_cache(_isolated_home, "vgg16")
    data = json.loads(run("list", "--json").output)
    assert {"name", "family", "params", "top1", "input_size", "license", "cached"} <= set(data[0])
    assert [d["name"] for d in data if d["cached"]] == ["vgg16"]
    r = run("list", "--cached")
    assert r.exit_code == 0 and [l.split()[0] for l in r.output.splitlines()[1:]] == ["vgg16"]
    assert "yes" in r.output
    fam = json.loads(run("list", "--family", "vgg", "--json").output)
    assert {d["family"] for d in fam} == {"vgg"} and len(fam) == 8
    pat = json.loads(run("list", "resnet1*", "--json").output)
    assert [d["name"] for d in pat] == ["resnet18", "resnet101", "resnet152"]
    word = json.loads(run("list", "lite", "--json").output)
    assert [d["name"] for d in word] == ["efficientnet_lite0"]


def test_list_no_match_and_bad_family():
    r = run("list", "--cached")
    assert r.exit_code == 0 and "zoo pull" in r.output
    r = run("list", "--family", "transformers")
    assert r.exit_code == 2 and "families:" in r.output and "resnet" in r.output


def test_info_text_and_json():
    r = run("info", "vgg16")
    assert r.exit_code == 0, r.output
    for needle in ("timm:vgg16", "hf:timm/vgg16.tv_in1k@main/model.safetensors", "pre_logits", "head.fc",
                   "torchvision VGG16_Weights", "bilinear", "stages (6"):
        assert needle in r.output
    assert "top-1        71.592%  [" in r.output     # the digits the source gives, no padding
    assert "top-1        75.1%  [" in run("info", "efficientnet_lite0").output     # it said 75.100%
    data = json.loads(run("info", "alexnet", "--json").output)
    assert data["builder"] == "torchvision:alexnet" and data["classifier"] == "classifier.6"
    assert data["sources"][0]["sha256_prefix"] == "7be5be79" and data["cached"] is False
    assert data["preprocessing"]["input_size"] == [3, 224, 224]
    assert data["stages"][0] == ["features.0"]


def test_info_unknown_model_exits_2_with_suggestions():
    r = CliRunner().invoke(cli, ["info", "resnet5O"])
    assert r.exit_code == 2
    assert "unknown model 'resnet5O'" in r.output and "resnet50" in r.output
    assert "Traceback" not in r.output


def test_info_timm_reference():
    r = run("info", "timm:resnet18", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["name"] == "timm:resnet18" and data["classifier"] == "fc" and len(data["stages"]) == 5


def test_registry_option_and_broken_registry(tmp_path):
    good = {"models": [{
        "name": "mine", "family": "custom", "builder": "timm:test_resnet", "license": "mit",
        "classifier": "fc", "stages": [["conv1", "bn1"], ["layer1", "layer2", "layer3", "layer4"]],
        "preprocessing": {"input_size": [3, 64, 64], "interpolation": "bicubic", "crop_pct": 1.0,
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "origin": "my notes"},
        "sources": [{"kind": "file", "path": "/data/mine.safetensors", "sha256": None, "sha256_note": "mine"}]}]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(good))
    r = run("--registry", str(path), "list", "--family", "custom", "--json")
    assert r.exit_code == 0 and [d["name"] for d in json.loads(r.output)] == ["mine"]
    good["models"][0]["colour"] = "red"
    path.write_text(yaml.safe_dump(good))
    r = CliRunner().invoke(cli, ["--registry", str(path), "list"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "field 'colour'" in r.output and str(path) in r.output


@pytest.mark.parametrize("command", ["list", "info"])
def test_help_has_examples(command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "zoo " + command in r.output


def test_every_command_has_examples_and_a_whole_summary_line():
    """QA: `zoo --help` listed pull, import and cache (and `zoo cache --help` verify) with their first sentence cut
    by click ("Download, verify and cache the weights of one or more models..."); each has a short help now."""
    for group, names in ((cli, list(cli.commands)), (cli.commands["cache"], list(cli.commands["cache"].commands))):
        text = CliRunner().invoke(group, ["--help"]).output
        listed = text.split("Commands:", 1)[1]
        assert "..." not in listed, listed
        for name in names:
            r = CliRunner().invoke(group, [name, "--help"])
            assert r.exit_code == 0 and "Examples:" in r.output, (name, r.output)


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["info", "resnet50"]])
def test_list_and_info_do_not_import_torch(argv):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom zoo.cli import cli\n"
            f"r = CliRunner().invoke(cli, {argv!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False False"


def test_info_of_an_uncached_hf_hub_repo_fetches_its_config_once(hub, monkeypatch):
    """`zoo info hf-hub:ORG/REPO` read only the local Hugging Face cache (an uncached repo: `run hf download`
    first). Now it fetches the repo's config.json, as `zoo pull` and `zoo predict` do (and timm's
    create_model), once: the second call makes no request; offline, an uncached repo is one line."""
    config = {"architecture": "test_resnet", "num_classes": 4,
              "pretrained_cfg": {"input_size": [3, 96, 96], "mean": [0.5] * 3, "std": [0.5] * 3, "classifier": "fc"}}
    hub.add_hf("someone/tiny-info", "config.json", json.dumps(config).encode())
    res = CliRunner().invoke(cli, ["info", "hf-hub:someone/tiny-info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["builder"] == "timm:test_resnet" and data["num_classes"] == 4
    assert data["preprocessing"]["input_size"] == [3, 96, 96]
    asked = hub.count("config.json")
    assert asked >= 1
    assert CliRunner().invoke(cli, ["info", "hf-hub:someone/tiny-info"]).exit_code == 0
    assert hub.count("config.json") == asked                  # cached: no second request
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    res = CliRunner().invoke(cli, ["info", "hf-hub:someone/never-fetched"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "hf-hub:someone/never-fetched is not cached and offline mode is on" in res.output
