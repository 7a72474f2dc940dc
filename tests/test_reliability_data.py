"""Reliability (issue 8): `zoo finetune` on hostile image folders trains with the bad files skipped and
listed, or stops with one line before any model is built. Never a traceback, never a crash after training.

The cases themselves come from ``tests/finetune/test_hostile_data.py::build_hostile_folder`` (the data
layer's tests check each decode in detail); here the whole command runs on them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def register_tiny(tmp_path: Path, monkeypatch) -> str:
    """A user registry entry "tiny32" (timm test_resnet at 32 px) whose weights are a local file."""
    import timm
    import torch
    from safetensors.torch import save_file

    from zoo.build import describe_timm

    torch.manual_seed(0)
    weights = tmp_path / "tiny32.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    params, stages, classifier = describe_timm("test_resnet", 1000)
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"models": [{
        "name": "tiny32", "family": "resnet", "builder": "timm:test_resnet", "license": "apache-2.0",
        "params": params, "classifier": classifier, "stages": [list(s) for s in stages],
        "preprocessing": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "origin": "test"},
        "sources": [{"kind": "file", "path": str(weights), "sha256": None, "sha256_note": "test weights"}],
    }]}))
    monkeypatch.setenv("ZOO_REGISTRY", str(reg))
    return "tiny32"
