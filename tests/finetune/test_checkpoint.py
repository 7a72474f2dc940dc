"""finetune.core.checkpoint: the weights files' recorded sha256 (one helper over named tensors, shared with
the feature cache's backbone key)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from finetune.core.checkpoint import DIGEST_KEY, load_weights, save_weights, tensors_sha256
from finetune.core.errors import CheckpointError
from finetune.tools.features import backbone_digest


def _state() -> dict[str, torch.Tensor]:
    return {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "a.bias": torch.ones(2, dtype=torch.bfloat16), "a.num_batches_tracked": torch.tensor(3), "empty": torch.zeros(0)}


def test_the_recorded_digest_keeps_its_format_and_flags_a_flipped_bit(tmp_path):
    """The format weights files were written with (name|dtype|shape, a newline, the bytes; names sorted) stays
    what load_weights checks: files already written keep loading. One flipped bit is refused; a file from
    before the digest was recorded loads unchecked."""
    state = _state()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    assert tensors_sha256(state) == h.hexdigest()
    path = tmp_path / "best.safetensors"
    save_weights(path, state, {"epoch": "1"})
    assert load_weights(path).keys() == state.keys()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the sha256 recorded"):
        load_weights(path)
    save_file(state, str(path), metadata={"epoch": "1"})        # no DIGEST_KEY: written before it existed
    assert DIGEST_KEY not in str(path.read_bytes()[:200]) and load_weights(path).keys() == state.keys()


def test_the_backbone_key_is_the_same_sha256_of_the_tensors_outside_the_head():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(3, 4))
    model.add_module("fc", torch.nn.Linear(4, 2))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert backbone_digest(model, "fc") == tensors_sha256(body, salt="Sequential")


def flip_a_bit_in_the_largest_tensor(path) -> None:
    """Flip one bit inside the bytes of the largest tensor of a torch.save file (a zip whose members are
    stored, uncompressed; torch.load checks no CRC)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[big.header_offset + 26:big.header_offset + 30])
    raw[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_last_pt_records_the_sha256_of_what_it_holds_and_a_flipped_bit_is_refused(tmp_path):
    """Session 17: last.pt had no checksum (best.safetensors had): a flipped bit in its tensor data loaded,
    and the run resumed from it silently. Now one line that says what to do; older checkpoints load unchecked."""
    import shlex

    from finetune.core.checkpoint import STATE_DIGEST_KEY, load_checkpoint, save_checkpoint, state_sha256

    model = torch.nn.Linear(64, 8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    state = {"epoch": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "history": [{"epoch": 1, "val_loss": float("nan")}], "phases": ("head", "finetune"), "note": None}
    run = tmp_path / "my run $x"
    path = run / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert STATE_DIGEST_KEY not in loaded and state_sha256(loaded) == state_sha256(state)
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())

    flip_a_bit_in_the_largest_tensor(path)
    with pytest.raises(CheckpointError, match="is damaged: what it holds does not match the sha256") as err:
        load_checkpoint(path)
    line = str(err.value)
    assert "\n" not in line
    assert shlex.split(line.split("`")[1]) == ["zoo", "export", str(run)]
    assert load_checkpoint(path, mmap=True)["epoch"] == 3        # a look at its small fields reads no tensor

    torch.save(state, path)                                       # written before last.pt recorded a digest
    assert load_checkpoint(path)["epoch"] == 3
