"""zoo.cache: layout, listing, removal, verification, no torch for the listing part."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.zoo.conftest import make_entry, tensor_bytes
from zoo import cache
from zoo.errors import CacheError
from zoo.registry import Source
from zoo.sources import pull


# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture
def cached(hub):
    """Two tiny models pulled into the cache."""
    for i, name in enumerate(("alpha", "beta")):
        data = tensor_bytes(seed=i)
        url = hub.add_file(f"{name}.safetensors", data)
        pull(make_entry(name, Source(kind="url", url=url, sha256=hashlib.sha256(data).hexdigest())), progress=False)
    return ["alpha", "beta"]


def test_zoo_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "z"))
    assert cache.zoo_home() == tmp_path / "z"
    assert cache.weights_dir("resnet50") == tmp_path / "z" / "weights" / "resnet50"
    monkeypatch.delenv("ZOO_HOME")
    assert cache.zoo_home().parts[-2:] == (".cache", "zoo")


def test_a_data_folder_has_one_scan_memo_under_zoo_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "z"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    memo = cache.scan_memo(tmp_path / "a")
    assert memo.parent == tmp_path / "z" / "scans" and memo.suffix == ".json"
    assert cache.scan_memo(str(tmp_path / "a") + "/") == memo
    # its entries are the paths as named: a folder reached through a link keeps a memo of its own
    assert len({memo, cache.scan_memo(tmp_path / "link"), cache.scan_memo(tmp_path / "b")}) == 3
    memo.parent.mkdir(parents=True)
    memo.write_text("{}")
    stale, cut = memo.parent / "0123.json", memo.parent / ".0123.json.x.tmp"     # (a write cut short)
    for path in (stale, cut):
        path.write_text("{}")
        os.utime(path, (0, time.time() - (cache.SCAN_MEMO_DAYS + 1) * 86400))
    cache.scan_memo(tmp_path / "b")
    assert memo.is_file() and not stale.exists() and not cut.exists()   # unused for a month: removed


def test_adhoc_names_get_safe_folders():
    assert cache.weights_dir("timm:resnet10t").name == "timm--resnet10t"
    assert cache.weights_dir("hf-hub:org/repo").name == "hf-hub--org--repo"
    with pytest.raises(CacheError):
        cache.weights_dir("..")


def test_listing_and_is_cached(cached):
    assert all(cache.is_cached(n) for n in cached) and not cache.is_cached("gamma")
    listed = {m["name"]: m for m in cache.cached_models()}
    assert set(listed) == set(cached)
    assert listed["alpha"]["bytes"] == cache.weights_path("alpha").stat().st_size > 0


def test_weights_without_manifest_do_not_count(cached):
    cache.manifest_path("alpha").unlink()
    assert not cache.is_cached("alpha")
    assert [m["name"] for m in cache.cached_models()] == ["beta"]
    assert any("alpha: no manifest" in p for p in cache.verify())


def test_verify_clean_then_detects_modified_file(cached):
    assert cache.verify() == []
    path = cache.weights_path("beta")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, one bit pattern changed: only the hash can tell
    path.write_bytes(bytes(raw))
    problems = cache.verify()
    assert len(problems) == 1 and problems[0].startswith("beta:") and "zoo pull --force beta" in problems[0]


def test_verify_detects_truncation_and_missing(cached):
    cache.weights_path("alpha").write_bytes(b"short")
    cache.weights_path("beta").unlink()
    problems = cache.verify()
    assert any("alpha: size" in p for p in problems) and any("beta:" in p and "missing" in p for p in problems)


def test_remove(cached):
    folder = cache.remove("alpha")
    assert not folder.exists() and not cache.is_cached("alpha") and cache.is_cached("beta")
    with pytest.raises(CacheError, match="not cached"):
        cache.remove("alpha")


def test_listing_imports_no_torch(cached):
    code = ("import sys, zoo.cache as c; c.is_cached('alpha'); c.cached_models(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("text", ["null", "[1]", '"x"', "{}", '{"name": 3}'])
def test_a_manifest_that_is_json_but_no_manifest_is_called_damaged(cached, text):
    """QA: a manifest.json holding null, a list, a string or an object without the name (hand-edited, or a
    broken sync) was an AttributeError/TypeError/KeyError traceback in zoo cache ls/verify, zoo lock and every
    command that loads the model; it is damaged, as unparsable JSON is."""
    from click.testing import CliRunner

    from zoo.cli import cli

    cache.manifest_path("alpha").write_text(text, encoding="utf-8")
    with pytest.raises(CacheError, match="is damaged"):
        cache.read_manifest("alpha")
    assert {m["name"]: m.get("damaged") for m in cache.cached_models()} == {"alpha": True, "beta": None}
    assert cache.verify() == ["alpha: manifest is damaged; run `zoo cache rm alpha` and pull again"]
    runner = CliRunner()
    for args in (["cache", "ls"], ["cache", "verify"], ["lock", "--out", "-"]):
        res = runner.invoke(cli, args)
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        assert res.exit_code in (0, 1) and not crashed, (args, res.output, res.exception)


def test_a_model_being_installed_is_waited_for_not_left_out_of_a_lock_or_called_damaged(cached, tmp_path):
    """QA: `zoo pull --force` / `zoo import` of a cached model removes its manifest, fsyncs the new weights
    (seconds for a large file) and writes the manifest last, under the model's lock. A `zoo lock` taken
    meanwhile left the model out of the lock file without a word (exit 0), and `zoo cache verify` told the
    user to remove it. Both now wait for the install."""
    import json
    import threading
    import time

    from zoo.lock import write_lock

    manifest = {k: v for k, v in cache.read_manifest("beta").items() if k not in ("name", "size")}
    staged = tmp_path / "staged.safetensors"
    staged.write_bytes(cache.weights_path("beta").read_bytes())
    removed = threading.Event()

    def install_slowly():
        with cache.lock("beta"):
            cache.manifest_path("beta").unlink()      # what install does first
            removed.set()
            time.sleep(0.5)                           # its fsync of a large file
            cache.install("beta", staged, manifest)

    installer = threading.Thread(target=install_slowly)
    installer.start()
    try:
        assert removed.wait(5)
        assert set(write_lock(tmp_path / "zoo.lock")["models"]) == {"alpha", "beta"}
    finally:
        installer.join()
    assert set(json.loads((tmp_path / "zoo.lock").read_text())["models"]) == {"alpha", "beta"}
    cache.manifest_path("beta").unlink()              # an interrupted install: nothing holds the lock
    started = time.monotonic()
    assert [m["name"] for m in cache.cached_models()] == ["alpha"] and cache.verify()[0].startswith("beta: no manifest")
    assert time.monotonic() - started < 5


def test_a_zoo_home_that_is_a_dangling_link_is_named_as_one(tmp_path, monkeypatch):
    """QA (helper-64): ZOO_HOME (or ~/.cache/zoo) a symbolic link to a folder on a disk that is not mounted:
    every command said `cannot create ZOO_HOME/locks (File exists); set ZOO_HOME to a writable folder`.
    It names the link and where it leads now, and creates nothing there."""
    from zoo.errors import CacheError

    link = tmp_path / "zoo"
    link.symlink_to(tmp_path / "unmounted" / "zoo")
    for home in (link, link / "sub"):
        monkeypatch.setenv("ZOO_HOME", str(home))
        with pytest.raises(CacheError) as info:
            cache.lock("resnet18")
        assert str(info.value) == (f"cannot create {home / 'locks'}: {link} is a symbolic link to "
                                   f"{tmp_path / 'unmounted' / 'zoo'}, which does not exist (a disk not mounted, a "
                                   "folder moved?); create that folder, or set ZOO_HOME to a writable folder")
    assert not (tmp_path / "unmounted").exists()


def test_a_zoo_home_below_a_folder_that_cannot_be_searched_is_one_line_not_a_bare_permission_error(tmp_path,
                                                                                                  monkeypatch):
    """Review (h67) of the dangling-link message above: ZOO_HOME below a folder the user may not enter (chmod
    700 of another user's home) made mkdir fail with EACCES, and the look for a dangling link that followed
    (pathlib's is_symlink: lstat) raised the same PermissionError out of the handler, so the command ended
    with a bare `Permission denied` instead of `cannot create ... (Permission denied); set ZOO_HOME to a
    writable folder`. Root, which runs these tests, enters any folder: the OS calls refuse as for a user."""
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(real):
        def call(path, *a, **k):
            if Path(path).is_relative_to(locked) and Path(path) != locked:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *a, **k)
        return call

    for name in ("stat", "lstat", "mkdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    monkeypatch.setenv("ZOO_HOME", str(locked / "zoo"))
    with pytest.raises(CacheError, match=r"\(Permission denied\); set ZOO_HOME to a writable folder"):
        cache.lock("resnet18")
