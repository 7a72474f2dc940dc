"""Image folders, from files to batches on the device; one concern per module:

- ``scan``: scan + validate a folder (layout, classes, usable files), no decoding beyond headers; its parts:
  ``files`` (walking, file checks), ``imageset`` (ImageSet, ScanReport), ``splits`` (hold-out, split files);
- ``images``: decoding one file (PIL, or decode_jpeg to a uint8 tensor);
- ``transforms``: CPU transforms from the model's data config (train augmentation, evaluation crop);
- ``device``: the device side: uint8 batches normalised, flipped and jittered on the accelerator;
- ``decode``: ``--decode device``: JPEGs decoded (nvJPEG) and augmented on the device;
- ``geometry``: crops and resizes of a whole batch at once (``decode``'s geometry);
- ``loaders``: datasets and seeded DataLoaders.
- ``replay``: an evaluation pass's batches kept after its first full pass (validation read once).

The scan happens before any model is loaded, so fatal problems fail in seconds with one ``DataError``.
"""
from __future__ import annotations

from finetune.data.device import DeviceAugment, DeviceNormalize, device_steps
from finetune.data.images import (device_decodable, load_image, load_image_tensor, pil_warnings, read_image_bytes,
                                  to_rgb, to_uint8_tensor, upright_rgb)
from finetune.data.loaders import (DROP_LAST_FRACTION, EpochSeededSampler, ImageDataset, class_weights,
                                   close_loader, collate_skip_none, count_draw, train_share, drop_last_partial,
                                   make_loader,
                                   resolve_workers, set_epoch_order, set_loader_epoch, train_batches)
from finetune.data.scan import IMAGE_EXTENSIONS, ImageSet, ScanReport, scan_folder, write_bad_files, write_scan
from finetune.data.splits import scan_outdated
from finetune.data.transforms import ImageTransform, build_transform, trains_mirrored, with_input_size

__all__ = [
    "IMAGE_EXTENSIONS", "ImageSet", "ScanReport", "scan_folder", "write_scan", "write_bad_files", "scan_outdated",
    "load_image", "load_image_tensor", "read_image_bytes", "to_rgb", "upright_rgb", "to_uint8_tensor",
    "device_decodable", "pil_warnings",
    "build_transform", "ImageTransform", "with_input_size", "trains_mirrored",
    "DeviceNormalize", "DeviceAugment", "device_steps",
    "ImageDataset", "collate_skip_none", "make_loader", "set_loader_epoch", "EpochSeededSampler",
    "train_batches", "set_epoch_order", "count_draw", "train_share",
    "drop_last_partial", "DROP_LAST_FRACTION", "class_weights", "resolve_workers", "close_loader",
]
