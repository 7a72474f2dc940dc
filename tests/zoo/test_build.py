"""zoo.build: every curated architecture builds, its stages cover every parameter once, weights load."""
from __future__ import annotations

import pytest
import torch
import yaml

import zoo
import zoo.build
from zoo.build import build_architecture, create_model, data_config, load_weights
from zoo.errors import RegistryError, WeightsError
from zoo.registry import get_entry, list_models
from zoo.resolve import check_stages, derive_stages, describe_timm, stage_of

CURATED = [e.name for e in list_models()]


@pytest.mark.parametrize("name", CURATED)
def test_every_entry_builds_and_stages_partition_parameters(name):
    entry = get_entry(name)
    with torch.device("meta"):  # no memory, no init: VGG19 costs nothing here
        model = zoo.create_model(name, pretrained=False)
    assert check_stages(model, entry.stages, entry.classifier) == []
    # Spelled out: each non-classifier parameter lies in exactly one stage; the classifier is a Linear.
    for pname, _ in model.named_parameters():
        in_cls = pname == entry.classifier or pname.startswith(entry.classifier + ".")
        assert len(stage_of(pname, entry.stages)) == (0 if in_cls else 1), pname
    assert isinstance(model.get_submodule(entry.classifier), torch.nn.Linear)
    assert sum(p.numel() for p in model.parameters()) == entry.params
    assert model.get_submodule(entry.classifier).out_features == entry.num_classes


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_large_100", "googlenet"])
def test_small_models_forward(name):
    torch.manual_seed(0)
    model = build_architecture(get_entry(name), num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_num_classes_reshapes_classifier():
    with torch.device("meta"):
        model = build_architecture(get_entry("alexnet"), num_classes=3)
        vgg = build_architecture("vgg11", num_classes=7)
    assert model.get_submodule("classifier.6").out_features == 3
    assert vgg.get_submodule("head.fc").out_features == 7


def test_data_config_is_timm_style():
    cfg = data_config("inception_v3")
    assert cfg == {"input_size": (3, 299, 299), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert data_config(get_entry("alexnet"))["interpolation"] == "bilinear"


def test_unknown_builder_arch_is_a_registry_error(tmp_path, monkeypatch):
    entry = get_entry("resnet18")
    bad = type(entry)(**{**entry.__dict__, "builder": "timm:resnet18000"})
    with pytest.raises(RegistryError, match="no architecture 'resnet18000'"):
        build_architecture(bad)
    bad = type(entry)(**{**entry.__dict__, "builder": "torchvision:nonet"})
    with pytest.raises(RegistryError, match="torchvision has no model function 'nonet'"):
        build_architecture(bad)


# ------------------------------------------------------------------------------------------ weights
@pytest.fixture
def tiny_entry(tmp_path, monkeypatch):
    """A user entry for timm's test_resnet (tiny), registered through ZOO_REGISTRY."""
    params, stages, classifier = describe_timm("test_resnet", 1000)
    data = {"models": [{
        "name": "tiny", "family": "resnet", "builder": "timm:test_resnet", "license": "apache-2.0",
        "params": params, "classifier": classifier, "stages": [list(s) for s in stages],
        "preprocessing": {"input_size": [3, 160, 160], "interpolation": "bilinear", "crop_pct": 0.95,
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "origin": "timm pretrained_cfg"},
        "sources": [{"kind": "file", "path": str(tmp_path / "tiny.safetensors"), "sha256": None,
                     "sha256_note": "test"}],
    }]}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    return get_entry("tiny")


def _publish(tmp_path, monkeypatch, state) -> None:
    """Stand in for zoo.sources.pull: the 'cached' file is whatever the test saved."""
    from safetensors.torch import save_file

    path = tmp_path / "cached.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    monkeypatch.setattr(zoo.build, "pull", lambda entry: path)


def test_create_model_loads_weights_strictly(tiny_entry, tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = build_architecture(tiny_entry)
    _publish(tmp_path, monkeypatch, reference.state_dict())
    model = create_model("tiny")
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_create_model_new_head_keeps_backbone(tiny_entry, tmp_path, monkeypatch):
    torch.manual_seed(2)
    reference = build_architecture(tiny_entry)
    _publish(tmp_path, monkeypatch, reference.state_dict())
    model = create_model("tiny", num_classes=3)
    assert model.fc.out_features == 3
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, ref[k]), k


def test_create_model_rejects_mismatched_weights(tiny_entry, tmp_path, monkeypatch):
    state = build_architecture(tiny_entry).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    _publish(tmp_path, monkeypatch, missing)
    with pytest.raises(WeightsError, match=r"missing \(e.g. layer4\.") as info:
        create_model("tiny")
    assert "\n" not in str(info.value) and "zoo pull tiny --force" in str(info.value)
    _publish(tmp_path, monkeypatch, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unexpected"):
        create_model("tiny")
    _publish(tmp_path, monkeypatch, {**state, "fc.weight": torch.zeros(3, state["fc.weight"].shape[1])})
    with pytest.raises(WeightsError, match="wrong shape"):
        create_model("tiny")


def test_googlenet_checkpoint_aux_heads_are_dropped():
    entry = get_entry("googlenet")
    with torch.device("meta"):
        model = build_architecture(entry)
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    state["aux1.fc2.weight"] = torch.zeros(1000, 1024)  # torchvision's checkpoint carries the aux classifiers
    target = build_architecture(entry)
    load_weights(target, state, entry, where="googlenet-1378be20.pth")
    assert float(target.fc.weight.detach().abs().sum()) == 0.0


def test_create_model_without_pretrained_never_pulls(monkeypatch):
    def boom(entry):
        raise AssertionError("pull must not be called")

    monkeypatch.setattr(zoo.build, "pull", boom)
    with torch.device("meta"):
        create_model("resnet18", pretrained=False)


# ------------------------------------------------------------------------------------------ derived stages
@pytest.mark.parametrize("arch", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_derived_stages_cover_timm_models(arch):
    import timm

    params, stages, classifier = describe_timm(arch, 10)
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=10)
    assert check_stages(model, stages, classifier) == []
    assert len(stages) >= 2 and params == sum(p.numel() for p in model.parameters())


def test_derive_stages_without_feature_info():
    model = torch.nn.Sequential()
    model.add_module("stem", torch.nn.Conv2d(3, 4, 3))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("body", torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)))
    model.add_module("head", torch.nn.Linear(4, 2))
    stages = derive_stages(model, "head")
    assert stages == (("stem",), ("body",))
    assert check_stages(model, stages, "head") == []


def test_check_stages_reports_gaps_and_overlaps():
    with torch.device("meta"):
        model = build_architecture("resnet18")
    problems = check_stages(model, [["conv1"], ["layer1"], ["layer1.0", "nothing"]], "fc")
    text = " ".join(problems)
    assert "'bn1.weight' is in 0 stages" in text and "is in 2 stages" in text and "'nothing' matches no" in text
    assert "'layer1.0.conv1.weight' is in 2 stages ([1, 2])" in text


@pytest.mark.parametrize("name", CURATED)
def test_each_freeze_depth_trains_exactly_the_entrys_last_stages(name):
    """helper-136 (every registry architecture end to end): prepared as a run prepares it (``prepare_model``, on the
    meta device), ``--freeze`` head/1/2/none/auto train exactly the last K of the entry's stages and a new
    classifier of the run's width, no BatchNorm layer is in train mode after ``model.train()`` (pretrained:
    ``--bn eval``), and every pretrained parameter trains at the backbone's reduced LR."""
    import copy

    from finetune.core.config import FinetuneConfig
    from finetune.core.optim import build_optimizer
    from finetune.core.recipe import prepare_model
    from finetune.core.surgery import stage_parameters
    from zoo.network import meta_network

    entry = get_entry(name)
    n, skeleton = len(entry.stages), meta_network(entry)
    for freeze, k in (("head", 0), ("1", 1), ("2", 2), ("none", n), ("auto", 0)):    # auto: 4 per class is small
        model, config = copy.deepcopy(skeleton), FinetuneConfig(freeze=freeze)
        with torch.device("meta"):
            decision = prepare_model(model, [list(s) for s in entry.stages], entry.classifier, 4, [4] * 4, config)
        assert decision.trainable_stages == k
        trains = [[p.requires_grad for _, p in stage] for stage in stage_parameters(model, entry.stages)]
        assert [all(t) for t in trains] == [i >= n - k for i in range(n)] and all(all(t) or not any(t) for t in trains)
        head = model.get_submodule(entry.classifier)
        assert head.out_features == 4 and all(p.requires_grad for p in head.parameters())
        model.train()
        assert not [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        groups = build_optimizer(config, model, entry.classifier, stages=entry.stages).param_groups
        head_ids = {id(p) for p in head.parameters()}
        for g in groups:
            assert g["lr_mult"] == (1.0 if g["name"] == "head" else config.backbone_lr_mult)
            assert all((id(p) in head_ids) == (g["name"] == "head") for p in g["params"])
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name, freeze, trains", [
    ("vgg16", "1", {"pre_logits.fc1", "pre_logits.fc2", "head.fc"}),
    ("vgg16", "2", {"features.24", "features.26", "features.28", "pre_logits.fc1", "pre_logits.fc2", "head.fc"}),
    ("alexnet", "1", {"classifier.1", "classifier.4", "classifier.6"}),
    ("googlenet", "1", {"inception5a", "inception5b", "fc"}),
    ("inception_v3", "1", {"Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}),
])
def test_freeze_1_trains_the_fc_layers_first_on_vgg_and_alexnet(name, freeze, trains):
    """helper-141, the lecture's advice for VGG and AlexNet: unfreeze the FC-4096 layers first (--freeze 1), then
    the last conv block (--freeze 2); GoogLeNet and Inception v3: their last inception blocks. By module name, not
    through the registry's stages (which the test above takes as given)."""
    from finetune.core.config import FinetuneConfig
    from finetune.core.recipe import prepare_model
    from zoo.network import meta_network

    entry = get_entry(name)
    model = meta_network(entry)
    with torch.device("meta"):
        prepare_model(model, [list(s) for s in entry.stages], entry.classifier, 4, [4] * 4,
                      FinetuneConfig(freeze=freeze))
    trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {t for t in trained if not any(t == m or t.startswith(m + ".") for m in trains)} == set()
    assert all(any(t == m or t.startswith(m + ".") for t in trained) for m in trains)
