"""Bundles: a finetuned model exported as files anyone can load, with its metadata beside the weights.

A bundle folder holds
  model.safetensors  the state dict; its header metadata (str -> JSON string) carries architecture,
                     builder, number of classes, label names, mean/std, input size, interpolation,
                     crop_pct, source model + the source file's digest, head and validation metrics
  config.json        timm's own layout (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
                     ``model_args``, ``pretrained_cfg`` with the registry entry's tag, licence, paper and
                     source) plus a ``zoo`` section (builder, kwargs, head, digests: ``weights_sha256`` of
                     model.safetensors, checked on every load), so
                     ``timm.create_model("local-dir:<bundle>", pretrained=True)`` rebuilds a linear-head model
  README.md          a model card (data, classes, metrics, recipe)
  model.onnx         optional, dynamic batch axis, label names and preprocessing in its metadata_props,
                     checked against PyTorch with onnxruntime at export time

Reading a bundle's labels and metadata never unpickles anything: JSON and the safetensors header only.

The parts: ``load`` (reading a bundle: metadata, ``Bundle``, ``load_bundle``, ``load_model``), ``checks``
(config.json agrees with the weights' header) and ``export`` (a run folder -> a bundle: weights, config.json,
the model card, ONNX).
"""
from __future__ import annotations

from zoo.bundle.export import ONNX_ATOL, export_run, is_final_export
from zoo.bundle.load import BUNDLE_FORMAT, Bundle, build_model, load_bundle, load_model, read_safetensors_metadata

__all__ = ["Bundle", "load_bundle", "load_model", "export_run", "is_final_export", "read_safetensors_metadata",
           "build_model", "BUNDLE_FORMAT", "ONNX_ATOL"]
