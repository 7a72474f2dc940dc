"""Honest provenance (issue 14): bundle metadata from the registry entry, the source file's own digest,
damaged bundles refused, ONNX files that carry their labels, VGG's FC dropout."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune.core.config import FinetuneConfig
from finetune.core.io import sha256_file
from tests.zoo.test_bundle import make_run
from zoo import cache
from zoo.bundle import export_run, load_bundle
from zoo.bundle.export import _weights_cfg
from zoo.cli import cli
from zoo.errors import BundleError, UsageError
from zoo.registry import list_models, weights_tag
from zoo.jobs.finetune import model_info

CURATED = [e.name for e in list_models()]


@pytest.mark.parametrize("name", CURATED)
def test_every_entry_credits_its_own_weights(name):
    from zoo.resolve import get_entry

    entry = get_entry(name)
    info = model_info(entry, ["a", "b"], FinetuneConfig(), pretrained=True)
    cfg = _weights_cfg(info)
    assert cfg["license"] == entry.license and cfg.get("paper_ids", "") == entry.paper
    assert cfg["source"] == entry.sources[0].id()
    repo = next((s.repo for s in entry.sources if s.kind == "hf"), None)
    expected_tag = repo.split("/")[-1].split(".", 1)[1] if repo and "." in repo.split("/")[-1] else None
    assert cfg.get("tag") == expected_tag == weights_tag(entry)


def _real_run(tmp_path, name: str):
    """A run folder for registry model ``name`` (random weights; model.json as `zoo finetune` writes it)."""
    import safetensors.torch

    from zoo.build import build_architecture
    from zoo.resolve import get_entry

    entry = get_entry(name)
    model = build_architecture(entry, num_classes=2).eval()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(run / "checkpoints" / "best.safetensors"))
    info = model_info(entry, ["a", "b"], FinetuneConfig(), pretrained=True)
    (run / "model.json").write_text(json.dumps(info))
    return run


def test_resnet18_bundle_says_tv_in1k_and_bsd(tmp_path):
    out = export_run(_real_run(tmp_path, "resnet18"), tmp_path / "bundle")
    pc = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pc["tag"] == "tv_in1k" and pc["license"] == "bsd-3-clause"
    assert pc["source"] == "hf:timm/resnet18.tv_in1k@main/model.safetensors"
    # nothing left over from timm's default tag (a1_in1k: apache-2.0, arXiv:2110.00476, 288 px test size)
    assert "arXiv:2110.00476" not in json.dumps(pc) and "test_input_size" not in pc and "origin_url" not in pc


def test_torchvision_bundle_credits_its_entry_too(tmp_path):
    out = export_run(_real_run(tmp_path, "googlenet"), tmp_path / "bundle")
    pc = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pc["license"] == "bsd-3-clause" and pc["source"].startswith("url:https://download.pytorch.org/")


def test_recorded_source_digest_is_the_files(tmp_path, monkeypatch):
    """After `zoo import` of a .pth, model.json and the bundle record sha256sum of that .pth."""
    import timm

    from tests.zoo.conftest import entry_dict, pth_bytes, write_registry
    from zoo.importer import import_weights
    from zoo.resolve import get_entry

    src = [{"kind": "file", "path": str(tmp_path / "unused"), "sha256": None, "sha256_note": "test"}]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r.yaml", [entry_dict("tiny", src)])))
    f = tmp_path / "tiny.pth"
    f.write_bytes(pth_bytes(timm.create_model("test_resnet").state_dict()))
    import_weights("tiny", f)
    info = model_info(get_entry("tiny"), ["a", "b"], FinetuneConfig(), pretrained=True)
    assert info["source_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert info["source_weights_sha256"] == sha256_file(cache.weights_path("tiny"))
    assert info["source_sha256"] != info["source_weights_sha256"]       # the .pth was converted
    # model.json's data_config is plain JSON data (finetune.core.io.json_safe): lists, not the tuples timm gives
    assert info["data_config"] == json.loads(json.dumps(info["data_config"]))
    assert isinstance(info["data_config"]["input_size"], list) and isinstance(info["data_config"]["mean"], list)


def test_flipped_byte_is_refused_with_one_line(tmp_path):
    run, _ = make_run(tmp_path)
    out = export_run(run, tmp_path / "bundle")
    assert json.loads((out / "config.json").read_text())["zoo"]["weights_sha256"] == \
        sha256_file(out / "model.safetensors")
    load_bundle(out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01                                  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged or was changed"):
        load_bundle(out)
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    res = CliRunner().invoke(cli, ["predict", str(out), str(img)])
    assert res.exit_code == 1 and "damaged or was changed" in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_onnx_carries_labels_and_preprocessing(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run, _ = make_run(tmp_path)
    out = export_run(run, tmp_path / "bundle", formats=("safetensors", "onnx"))
    meta = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    labels = json.loads((out / "config.json").read_text())["label_names"]
    assert json.loads(meta["label_names"]) == labels
    assert json.loads(meta["preprocessing"])["mean"] == [0.5, 0.5, 0.5]


def test_vgg_fc_layers_get_dropout_back():
    from zoo.build import VGG_FC_DROPOUT, build_architecture, builder_kwargs
    from zoo.resolve import get_entry

    entry = get_entry("vgg11")
    with torch.device("meta"):
        model = build_architecture(entry)
        off = build_architecture(entry, fc_dropout=0.0)
    assert model.pre_logits.drop.p == model.head.drop.p == VGG_FC_DROPOUT == 0.5
    assert off.pre_logits.drop.p == off.head.drop.p == 0.0
    assert builder_kwargs(entry) == {"drop_rate": 0.5}
    assert builder_kwargs(get_entry("alexnet")) == {}     # AlexNet keeps torchvision's own 0.5
    with pytest.raises(UsageError, match="has none"):
        builder_kwargs(get_entry("resnet18"), 0.3)
    with pytest.raises(UsageError, match="0 <= x < 1"):
        builder_kwargs(entry, 1.0)
    info = CliRunner().invoke(cli, ["info", "vgg16"]).output
    assert "head layers" in info and "pre_logits.fc1" in info and "--fc-dropout 0" in info
