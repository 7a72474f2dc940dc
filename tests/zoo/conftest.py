"""Zoo-side fixtures: a loopback Hub started at import, so HF_ENDPOINT points at it before huggingface_hub
(or timm, which imports it) is imported; helpers to publish tiny weights and build entries."""
from __future__ import annotations

import functools
import io
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.zoo.hub_server import HubServer

HUB = HubServer().start()
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HUB_DISABLE_XET"] = "1"                 # (tests/conftest.py removed the user's HF_* settings)
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"


def point_hf_at(endpoint: str) -> None:
    """Re-point an already imported huggingface_hub at ``endpoint``.

    huggingface_hub copies HF_ENDPOINT into ``constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` at
    import; when another test module imported it first, the environment variable alone is too late.
    """
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.ENDPOINT = endpoint
        # the loopback Hub speaks the LFS upload protocol, not Xet (HF_HUB_DISABLE_XET, read at import too)
        constants.HF_HUB_DISABLE_XET = True
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"


point_hf_at(HUB.url)


@pytest.fixture
def hub(monkeypatch) -> HubServer:
    """The loopback Hub, emptied, with HF_ENDPOINT pointing at it."""
    HUB.reset()
    monkeypatch.setenv("HF_ENDPOINT", HUB.url)
    point_hf_at(HUB.url)
    yield HUB
    HUB.reset()


@pytest.fixture
def closed_port_url() -> str:
    """``http://127.0.0.1:<port>`` where nothing listens: a machine without network, refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tensor_bytes(seed: int = 0, **shapes) -> bytes:
    """A safetensors file as bytes: by default random weights of timm's ``test_resnet`` (1.9 MB), the
    architecture of ``make_entry``/``entry_dict`` (a pull refuses a file that does not fit it); with
    ``shapes`` (e.g. ``w=(4, 4)``), tensors of those names and shapes, which fit no entry."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    if shapes:
        return save({k: torch.randn(*s, generator=g) for k, s in shapes.items()})
    return save({k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in resnet_state().items()})


@functools.lru_cache(maxsize=1)
def resnet_state() -> dict:
    """The state dict of timm's ``test_resnet``, its integer buffers (num_batches_tracked) at zero."""
    import timm
    import torch

    model = timm.create_model("test_resnet")
    return {k: v if v.is_floating_point() else torch.zeros_like(v) for k, v in model.state_dict().items()}


def pth_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# timm's test_resnet, every parameter but fc's in one stage (zoo.build checks an entry's stages)
TEST_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def make_entry(name: str, *sources, builder: str = "timm:test_resnet", classifier: str = "fc"):
    """A ModelEntry built directly (no registry file needed)."""
    from zoo.registry import ModelEntry, Preprocessing

    return ModelEntry(name=name, builder=builder, sources=tuple(sources), preprocessing=Preprocessing(),
                      stages=TEST_RESNET_STAGES, classifier=classifier, license="apache-2.0", family="test")


def write_registry(path: Path, entries: list[dict]) -> Path:
    """A user registry YAML (schema = the dataclass fields) for ZOO_REGISTRY."""
    import yaml

    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return path


def entry_dict(name: str, sources: list[dict], builder: str = "timm:test_resnet") -> dict:
    """The YAML form of ``make_entry``."""
    return {"name": name, "builder": builder, "sources": sources,
            "preprocessing": {"input_size": [3, 160, 160], "interpolation": "bicubic", "crop_pct": 0.875,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                              "origin": "timm pretrained_cfg"},
            "stages": [list(s) for s in TEST_RESNET_STAGES], "classifier": "fc",
            "params": 1000, "top1": None, "license": "apache-2.0", "paper": "", "year": 2024, "family": "test",
            "description": "tiny test model"}
