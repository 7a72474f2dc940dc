"""zoo.network.build_to_load: networks built without the random init their loaded weights replace, the same
numbers as the plain build, and the caller's random streams left as they were (registry models, bundles)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from tests.zoo.test_build import _publish, tiny_entry  # noqa: F401 - tiny_entry is a fixture
from tests.zoo.test_bundle import make_run
from zoo.build import build_architecture, create_model
from zoo.bundle import build_model, export_run, load_bundle
from zoo.network import build_to_load

MLP = {"kind": "mlp", "hidden": 16, "dropout": 0.2, "activation": "relu"}


def _plain_and_loaded(build, perturb=True):
    """(the plain build, loaded with its own perturbed state; build_to_load's, loaded with that state)."""
    torch.manual_seed(0)
    plain = build()
    if perturb:
        with torch.no_grad():
            for t in plain.state_dict().values():
                t.add_(1) if t.is_floating_point() else t.add_(3)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = build_to_load(build, state)
    fast.load_state_dict(state, strict=False)
    return plain.eval(), fast.eval()


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("head", [None, MLP])
def test_a_bundle_network_is_built_on_the_meta_device_and_loads_the_same_numbers(head):
    devices = []

    def build():
        devices.append(torch.empty(0).device.type)      # the device a constructor's tensors land on
        return build_model("timm:test_resnet", 3, head, "fc")

    plain, fast = _plain_and_loaded(build)
    assert devices == ["cpu", "meta"]                   # no second, plain build: no random init drawn
    _same(plain, fast)
    assert all(t.device.type == "cpu" for t in fast.state_dict().values())


class _Computed(nn.Module):
    """A network with a non-persistent buffer computed in its constructor (``_Attribute``: a tensor attribute)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("index", torch.arange(4.0), persistent=False)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.index


class _Attribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.offset = torch.linspace(0, 1, 4)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.offset


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("cls", [_Computed, _Attribute, _Tied])
def test_what_the_state_dict_does_not_hold_gets_the_plain_builds_values(cls):
    plain, fast = _plain_and_loaded(cls)
    _same(plain, fast)
    for (n, t), (_, u) in zip(plain.named_buffers(), fast.named_buffers()):
        assert torch.equal(t, u), n
    if cls is _Tied:
        assert fast.a.weight is fast.b.weight


def test_a_state_that_does_not_fill_the_network_gets_the_plain_build_and_its_error():
    torch.manual_seed(0)
    state = build_model("timm:test_resnet", 3, None, "fc").state_dict()
    del state["fc.bias"]
    torch.manual_seed(4)
    plain = build_model("timm:test_resnet", 3, None, "fc")
    torch.manual_seed(4)
    fast = build_to_load(lambda: build_model("timm:test_resnet", 3, None, "fc"), state)
    assert torch.equal(fast.fc.bias, plain.fc.bias)     # what the state lacks: the plain init, same draws


def test_create_model_and_load_bundle_leave_the_callers_random_streams_alone(tiny_entry, tmp_path, monkeypatch):
    torch.manual_seed(1)
    _publish(tmp_path, monkeypatch, build_architecture(tiny_entry).state_dict())
    run, _ = make_run(tmp_path / "r", head=MLP)
    bundle = export_run(run, tmp_path / "bundle")
    for load in (lambda: create_model("tiny"), lambda: create_model("tiny", num_classes=3),
                 lambda: load_bundle(bundle)):
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        load()
        assert torch.equal(torch.rand(3), expected)


def test_create_model_with_a_new_head_draws_it_as_before(tiny_entry, tmp_path, monkeypatch):
    torch.manual_seed(1)
    _publish(tmp_path, monkeypatch, build_architecture(tiny_entry).state_dict())
    torch.manual_seed(5)
    plain = build_architecture(tiny_entry, 3)     # the init before: the classifier's numbers from seed 5
    torch.manual_seed(5)
    model = create_model("tiny", num_classes=3)
    assert torch.equal(model.fc.weight, plain.fc.weight) and torch.equal(model.fc.bias, plain.fc.bias)


def _drop_scale(module, state, prefix, local_metadata) -> None:
    del state[prefix + "scale"]


class _Unsaved(nn.Module):
    """A parameter its state dict leaves out (a state-dict hook drops it): the load would not fill it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.full((4,), 2.0))
        self.register_state_dict_post_hook(_drop_scale)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) * self.scale


def test_a_tensor_the_state_dict_leaves_out_keeps_the_plain_builds_values():
    devices = []

    def build():
        devices.append(torch.empty(0).device.type)
        return _Unsaved()

    plain, fast = _plain_and_loaded(build)
    assert devices == ["cpu", "meta", "cpu"]        # the meta build refused: to_empty left `scale` unset
    assert torch.equal(fast.scale, plain.scale)
    _same(plain, fast)


def test_a_load_in_one_thread_leaves_another_threads_random_draws_alone():
    """The meta build draws nothing: it no longer saves and restores the process-wide generators around it, which
    replayed the numbers another thread (a training loop) drew meanwhile."""
    state = build_model("timm:test_resnet", 3, None, "fc").state_dict()
    inside, drawn = threading.Event(), threading.Event()

    def build():                                    # the other thread draws while this one builds
        inside.set()
        drawn.wait(30)
        return build_model("timm:test_resnet", 3, None, "fc")

    loader = threading.Thread(target=build_to_load, args=(build, state))
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    got = [torch.rand(2)]
    loader.start()
    assert inside.wait(30)
    got.append(torch.rand(1))
    drawn.set()
    loader.join()
    got.append(torch.rand(1))
    assert torch.equal(torch.cat(got), expected)
