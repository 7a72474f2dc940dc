"""torchvision-format checkpoints import into the zoo's models with the same logits (issue 14).

Each checkpoint is synthetic but in the exact published format: the torchvision model with random weights,
its state_dict saved with torch.save (real key names and shapes, aux heads included where torchvision
publishes them). It goes through `zoo import`, then the zoo model built from the registry entry runs on
the same image, normalised with the entry's mean/std (torchvision's with its own): logits must agree.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from zoo import cache
from zoo.build import build_architecture, load_weights
from zoo.errors import WeightsError
from zoo.importer import import_weights
from zoo.resolve import get_entry

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name -> (torchvision builder kwargs as torchvision publishes the weights, input px)
CASES = {
    "vgg11": ({}, 64), "vgg11_bn": ({}, 64), "vgg13": ({}, 64), "vgg13_bn": ({}, 64),
    "vgg16": ({}, 64), "vgg16_bn": ({}, 64), "vgg19": ({}, 64), "vgg19_bn": ({}, 64),
    "inception_v3": ({"aux_logits": True, "transform_input": True, "init_weights": False}, 96),
    "resnet50": ({}, 64), "alexnet": ({}, 64),
    "googlenet": ({"aux_logits": True, "transform_input": True, "init_weights": False}, 64),
}
# 130-144M parameters each: 20-40 s apiece on 2 cores (writing and hashing 0.5 GB); test_vgg_key_map_only_reshapes is the quick check
BIG = {"vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"}


def _random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every tensor with scaled random values (fast: the model was built on the meta device)."""
    g = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif t.dim() == 1:       # norm weights
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:                    # He-scaled, so activations stay O(1) through 19 layers
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))
    return model.eval()


def _normalised(raw: torch.Tensor, mean, std) -> torch.Tensor:
    return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _torchvision_checkpoint(name: str, path) -> tuple[torch.nn.Module, dict]:
    import torchvision

    kwargs, _ = CASES[name]
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)(weights=None, **kwargs)
    _random_(tv)
    state = tv.state_dict()
    torch.save(state, path)
    return tv, state


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in CASES])
def test_torchvision_checkpoint_imports_with_equal_logits(name, tmp_path):
    entry = get_entry(name)
    tv, _ = _torchvision_checkpoint(name, tmp_path / f"{name}-0123abcd.pth")
    cached = import_weights(name, tmp_path / f"{name}-0123abcd.pth")
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = build_architecture(entry)
    model.to_empty(device="cpu")
    own = set(model.state_dict())
    assert {n for n, _ in model.named_buffers()} <= own      # to_empty left nothing un-loaded
    load_weights(model, load_file(str(cached)), entry)      # strict: every tensor of the zoo model
    model.eval()
    raw = torch.rand(2, 3, CASES[name][1], CASES[name][1], generator=torch.Generator().manual_seed(1))
    p = entry.preprocessing
    # float64: what is compared is the conversion, not float32 summation order (7x7 conv vs Linear)
    with torch.no_grad():
        want = tv.double()(_normalised(raw.double(), *IMAGENET))
        got = model.double()(_normalised(raw.double(), p.mean, p.std))
    assert got.shape == want.shape == (2, 1000)
    assert want.abs().max() > 1e-2                           # a real signal, not zeros compared with zeros
    assert (got - want).abs().max().item() <= 1e-4
    # provenance: the digest recorded is the file's as given, not the converted safetensors'
    man = cache.read_manifest(name)
    assert man["sha256_download"] == hashlib.sha256((tmp_path / f"{name}-0123abcd.pth").read_bytes()).hexdigest()


def test_other_architecture_still_fails_clearly(tmp_path):
    _torchvision_checkpoint("resnet50", tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match=r"does not fit vgg11 .*check you have the weights of this architecture"):
        import_weights("vgg11", tmp_path / "r50.pth")
    assert not cache.is_cached("vgg11")


def test_vgg_key_map_only_reshapes():
    from zoo.keymaps import torchvision_vgg

    state = {"features.0.weight": torch.randn(64, 3, 3, 3), "classifier.0.weight": torch.randn(4096, 25088),
             "classifier.0.bias": torch.randn(4096), "classifier.3.weight": torch.randn(4096, 4096),
             "classifier.6.weight": torch.randn(10, 4096), "classifier.6.bias": torch.randn(10)}
    out = torchvision_vgg(state)
    assert out["pre_logits.fc1.weight"].shape == (4096, 512, 7, 7)
    assert out["pre_logits.fc2.weight"].shape == (4096, 4096, 1, 1) and out["head.fc.weight"].shape == (10, 4096)
    assert torch.equal(out["pre_logits.fc1.weight"].flatten(1), state["classifier.0.weight"])
    assert out["features.0.weight"] is state["features.0.weight"]
    with pytest.raises(WeightsError, match="not a torchvision VGG tensor"):
        torchvision_vgg({"classifier.1.weight": torch.zeros(1)})
