"""Head replacement, freezing by stage and the BatchNorm statistics policy on a tiny timm ResNet."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from finetune.core.config import FinetuneConfig
from finetune.core.errors import ConfigError
from finetune.core.optim import build_optimizer
from finetune.core.recipe import prepare_model
from finetune.core.surgery import MLPHead, apply_freeze, replace_head, set_bn_eval, stage_parameters

timm = pytest.importorskip("timm")


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Standard deviation of Xavier/Glorot init: sqrt(2 / (fan_in + fan_out))."""
    return math.sqrt(2.0 / (fan_in + fan_out))


STAGES = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=1000)  # stands in for a pretrained FC-1000 model


def names_under(model: nn.Module, prefixes: list[str]) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def bn_buffers(model: nn.Module, exclude: str = "fc") -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()
            if ("running_" in n or "num_batches" in n) and not n.startswith(exclude + ".")}


# --- head -----------------------------------------------------------------------------------------

def test_linear_head_is_xavier_with_zero_bias(resnet):
    head = replace_head(resnet, "fc", 40)
    assert resnet.fc is head and isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (96, 40)
    assert torch.count_nonzero(head.bias) == 0
    bound = math.sqrt(6.0 / (96 + 40))  # xavier-uniform draws from U(-bound, bound)
    assert head.weight.abs().max().item() <= bound
    assert head.weight.std().item() == pytest.approx(xavier_std(96, 40), rel=0.1)
    assert resnet.num_classes == 40
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 40)


@pytest.mark.parametrize("head_name", ["classifier.6", "head.fc"])
def test_dotted_head_names_are_replaced_on_their_parent(head_name):
    if head_name == "classifier.6":
        model = nn.Sequential()
        model.add_module("features", nn.Linear(8, 16))
        model.add_module("classifier", nn.Sequential(*[nn.Identity() for _ in range(6)], nn.Linear(16, 1000)))
    else:
        model = nn.Sequential()
        model.add_module("features", nn.Linear(8, 16))
        model.add_module("head", nn.Module())
        model.head.fc = nn.Linear(16, 1000)
        model.head.forward = lambda x: model.head.fc(x)
    new = replace_head(model, head_name, 3)
    assert model.get_submodule(head_name) is new and new.out_features == 3 and new.in_features == 16


def test_unknown_head_and_bad_options_raise_config_error(resnet):
    with pytest.raises(ConfigError, match="no module named 'classifier'"):
        replace_head(resnet, "classifier", 3)
    with pytest.raises(ConfigError, match="at least 2"):
        replace_head(resnet, "fc", 1)
    with pytest.raises(ConfigError, match="mlp_activation"):
        replace_head(resnet, "fc", 3, kind="mlp", activation="gelu")


@pytest.mark.parametrize("activation, act_type", [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU),
                                                  ("elu", nn.ELU), ("tanh", nn.Tanh)])
def test_mlp_head_layout_and_init(resnet, activation, act_type):
    torch.manual_seed(0)
    head = replace_head(resnet, "fc", 5, kind="mlp", hidden=256, dropout=0.3, activation=activation)
    assert isinstance(head, MLPHead)
    layers = list(head)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, act_type, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[4].out_features) == (96, 256, 5)
    assert layers[3].p == 0.3
    for fc in (head.fc1, head.fc2):
        assert torch.count_nonzero(fc.bias) == 0
    hidden_std = head.fc1.weight.std().item()
    if activation == "tanh":
        assert hidden_std == pytest.approx(xavier_std(96, 256), rel=0.05)
    else:  # Kaiming fan_in: std = gain / sqrt(fan_in), gain sqrt(2) (leaky: sqrt(2 / (1 + 0.01^2)))
        gain = math.sqrt(2.0 / (1 + 0.01 ** 2)) if activation == "leaky_relu" else math.sqrt(2.0)
        assert hidden_std == pytest.approx(gain / math.sqrt(96), rel=0.05)
    assert head.fc2.weight.abs().max().item() <= math.sqrt(6.0 / (256 + 5))
    resnet.train()
    assert resnet(torch.randn(4, 3, 32, 32)).shape == (4, 5)


# --- freezing -------------------------------------------------------------------------------------

def test_stage_parameters_groups_by_prefix_and_rejects_unknown(resnet):
    grouped = stage_parameters(resnet, STAGES)
    assert {n for n, _ in grouped[0]} == names_under(resnet, ["conv1", "bn1"])
    assert {n for n, _ in grouped[4]} == names_under(resnet, ["layer4"])
    with pytest.raises(ConfigError, match="'layer9'"):
        stage_parameters(resnet, [["layer9"]])


@pytest.mark.parametrize("k, prefixes", [
    (0, ["fc"]),
    (1, ["layer4", "fc"]),
    (3, ["layer2", "layer3", "layer4", "fc"]),
    (5, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]),
])
def test_apply_freeze_trains_exactly_the_last_k_stages_and_the_head(resnet, k, prefixes):
    replace_head(resnet, "fc", 3)
    apply_freeze(resnet, STAGES, "fc", k)
    assert trainable(resnet) == names_under(resnet, prefixes)
    if k == 5:
        assert trainable(resnet) == {n for n, _ in resnet.named_parameters()}


def test_apply_freeze_rejects_too_many_stages(resnet):
    with pytest.raises(ConfigError, match="has 5 stages"):
        apply_freeze(resnet, STAGES, "fc", 6)


# --- training: what changes, what does not ------------------------------------------------------------

def _train_steps(model: nn.Module, config: FinetuneConfig, steps: int = 3) -> None:
    opt = build_optimizer(config, model, "fc")
    model.train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_training_changes_only_unfrozen_parameters_and_keeps_bn_statistics(resnet):
    config = FinetuneConfig(freeze="1", lr=1e-2)
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], config)
    before = {n: p.detach().clone() for n, p in resnet.named_parameters()}
    stats = bn_buffers(resnet)
    resnet.train()  # the policy must survive model.train()
    assert not resnet.bn1.training and not resnet.layer4[0].bn1.training
    _train_steps(resnet, config)
    changed = {n for n, p in resnet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names_under(resnet, ["layer4", "fc"])
    for n, b in bn_buffers(resnet).items():
        assert torch.equal(b, stats[n]), n


def test_bn_train_opts_into_updating_statistics(resnet):
    config = FinetuneConfig(freeze="none", bn="train")
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], config)
    stats = bn_buffers(resnet)
    resnet.train()
    assert resnet.bn1.training
    _train_steps(resnet, config, steps=1)
    assert not torch.equal(resnet.bn1.running_mean, stats["bn1.running_mean"])
    assert not torch.equal(resnet.layer1[0].bn1.running_var, stats["layer1.0.bn1.running_var"])


def test_mlp_head_batchnorm_trains_while_backbone_bn_stays_frozen(resnet):
    config = FinetuneConfig(freeze="head", head="mlp", mlp_hidden=16)
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], config)
    resnet.train()
    assert resnet.fc.bn.training and not resnet.bn1.training
    head_mean = resnet.fc.bn.running_mean.clone()
    stats = bn_buffers(resnet)
    with torch.no_grad():
        resnet(torch.randn(4, 3, 32, 32))
    assert not torch.equal(resnet.fc.bn.running_mean, head_mean)
    assert all(torch.equal(b, stats[n]) for n, b in bn_buffers(resnet).items())


@pytest.mark.parametrize("freeze", ["head", "none"])
def test_the_mlp_heads_bias_before_its_batchnorm_never_trains(resnet, freeze):
    """helper-97: the bias of the MLP head's first Linear feeds a BatchNorm that always trains on batch statistics
    and subtracts it again: its gradient is zero in exact arithmetic, and Adam turned the float noise into lr-sized
    steps (1 and 2 processes exported heads whose fc1.bias was 0.48 apart). It stays at zero and out of the
    optimizer, under any freeze depth; its key stays (earlier runs' checkpoints and bundles load)."""
    config = FinetuneConfig(freeze=freeze, head="mlp", mlp_hidden=16, lr=1e-2, optimizer="adam")
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], config)
    assert "fc.fc1.bias" in resnet.state_dict() and not resnet.fc.fc1.bias.requires_grad
    assert all(p.requires_grad for n, p in resnet.fc.named_parameters() if n != "fc1.bias")
    opt = build_optimizer(config, resnet, "fc")
    assert not any(p is resnet.fc.fc1.bias for g in opt.param_groups for p in g["params"])
    weight = resnet.fc.fc1.weight.detach().clone()
    _train_steps(resnet, config, steps=5)
    assert torch.count_nonzero(resnet.fc.fc1.bias) == 0
    assert not torch.equal(resnet.fc.fc1.weight, weight)


def test_bn_eval_policy_survives_pickle_and_deepcopy_and_can_be_undone(resnet):
    set_bn_eval(resnet)
    for clone in (pickle.loads(pickle.dumps(resnet)), copy.deepcopy(resnet)):
        clone.train()
        assert not clone.bn1.training and clone.layer1[0].training
        assert clone.bn1.train.args[0] is clone.bn1  # bound to the clone, not the original
    assert set(resnet.state_dict()) == set(copy.deepcopy(resnet).state_dict())
    set_bn_eval(resnet, mode="train")
    resnet.train()
    assert resnet.bn1.training
    with pytest.raises(ConfigError, match="bn="):
        set_bn_eval(resnet, mode="frozen")


def test_bn_train_updates_only_the_statistics_of_trained_stages(resnet):
    # --bn train --freeze 2: layer3 and layer4 train; the stem, layer1 and layer2 keep their statistics
    config = FinetuneConfig(freeze="2", bn="train")
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], config)
    stats = bn_buffers(resnet)
    resnet.train()
    assert not resnet.bn1.training and not resnet.layer2[0].bn1.training and resnet.layer3[0].bn1.training
    _train_steps(resnet, config, steps=1)
    trained = {n for n in stats if n.startswith(("layer3.", "layer4."))}
    assert trained and len(trained) < len(stats)
    after = bn_buffers(resnet)
    for n, b in stats.items():
        assert torch.equal(after[n], b) != (n in trained), n   # frozen: bit-identical; trained: changed


def test_bn_train_follows_each_phase_freeze(resnet):
    # fit's head phase calls apply_freeze(0), then unfreezes: the statistics policy follows without a new call
    prepare_model(resnet, STAGES, "fc", 3, [10, 10, 10], FinetuneConfig(freeze="1", bn="train"))
    apply_freeze(resnet, STAGES, "fc", 0)
    resnet.train()
    assert not any(m.training for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d))
    apply_freeze(resnet, STAGES, "fc", 1)
    resnet.train()
    assert resnet.layer4[0].bn1.training and not resnet.layer3[0].bn1.training
    resnet.eval()
    assert not resnet.layer4[0].bn1.training
    clone = copy.deepcopy(resnet).train()
    assert clone.layer4[0].bn1.training and not clone.layer3[0].bn1.training


@pytest.mark.parametrize("arch,mode", [("test_efficientnet", "train"), ("test_resnet", "eval")])
def test_sync_bn_converts_the_backbone_and_keeps_weights_freeze_and_policy(arch, mode):
    """--sync-bn: every backbone BatchNorm becomes a SyncBatchNorm (timm's BatchNorm + activation layers keep their
    activation: torch's converter would drop it), holding the same tensors; the new MLP head's BatchNorm, trained
    alike on every rank from cached features, stays. The freeze and the statistics policy hold on the new layers,
    and in eval mode the model computes what it did (SyncBatchNorm only differs while it trains)."""
    from timm.layers import BatchNormAct2d
    from finetune.core.surgery import sync_batchnorm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    head = model.default_cfg["classifier"]
    stages = [[n for n, _ in model.named_children() if n != head]]
    config = FinetuneConfig(freeze="1", bn=mode, head="mlp", mlp_hidden=8)
    prepare_model(model, stages, head, 3, [10, 10, 10], config)
    bns = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    state = model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    before = model.eval()(x)
    assert sync_batchnorm(model, mode, exclude=(head,)) == sum(not n.startswith(head + ".") for n in bns)
    after = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert set(after) == set(bns)
    for n, m in after.items():
        assert isinstance(m, nn.SyncBatchNorm) != n.startswith(head + "."), n
        assert (bns[n] is BatchNormAct2d) == (type(m).__name__ == "SyncBatchNormAct"), n   # the activation kept
    assert list(model.state_dict()) == list(state)
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())   # the same tensors
    assert trainable(model) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(model.eval()(x), before)
    model.train()
    trains = {n for n, m in after.items() if m.training and not n.startswith(head + ".")}
    assert trains == (set() if mode == "eval" else {n for n in after if not n.startswith(head + ".")})
    assert all(m.training for n, m in after.items() if n.startswith(head + "."))


def test_sync_bn_refuses_a_batchnorm_it_cannot_convert_whole():
    from finetune.core.surgery import sync_batchnorm

    class ScaledBN(nn.BatchNorm2d):            # a forward of its own, which a SyncBatchNorm would lose
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ConfigError, match="--sync-bn cannot convert this model's ScaledBN layers"):
        sync_batchnorm(model, "train")
    assert type(model[1]) is ScaledBN
