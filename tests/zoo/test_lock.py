"""`zoo lock` / `zoo pull --locked`: pin what was pulled, fetch exactly that elsewhere (loopback Hub)."""
from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from tests.zoo.conftest import entry_dict, tensor_bytes, write_registry
from zoo import cache
from zoo.cli import cli

REPO = "timm/tiny.locktest"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def branch_entry(hub, tmp_path, monkeypatch):
    """A registry entry that follows the repo's main branch with no digest (like every Hub entry today)."""
    src = [{"kind": "hf", "repo": REPO, "revision": "main", "revision_note": "test: follows main",
            "filename": "model.safetensors", "sha256": None, "sha256_note": "test: trust on first use"}]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "user.yaml", [entry_dict("tiny", src)])))
    return "tiny"


def _new_machine(tmp_path, monkeypatch, name: str):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / name))


def test_lock_then_locked_pull_elsewhere(hub, branch_entry, tmp_path, monkeypatch):
    data = tensor_bytes(0)
    commit = hub.add_hf(REPO, "model.safetensors", data)
    runner = CliRunner()
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    lock = tmp_path / "zoo.lock"
    r = runner.invoke(cli, ["lock", "--out", str(lock)])
    assert r.exit_code == 0, r.output
    item = json.loads(lock.read_text())["models"]["tiny"]
    assert item["source"] == {"kind": "hf", "repo": REPO, "revision": commit, "filename": "model.safetensors",
                              "url": None, "path": None, "package": None, "format": "safetensors", "key_map": None}
    assert item["sha256"] == sha(data)

    _new_machine(tmp_path, monkeypatch, "machine2")
    hub.requests.clear()
    r = runner.invoke(cli, ["pull", "--locked", str(lock), "-q"])
    assert r.exit_code == 0, r.output
    assert "sha256 matches the lock" in r.output
    assert cache.weights_path("tiny").read_bytes() == data
    assert hub.count(f"/resolve/{commit}/", "GET") == 1 and hub.count("/resolve/main/") == 0   # the commit
    before = len(hub.requests)
    r = runner.invoke(cli, ["pull", "--locked", str(lock)])
    assert r.exit_code == 0 and "already cached" in r.output and len(hub.requests) == before


def test_locked_pull_refuses_other_bytes_and_installs_nothing(hub, branch_entry, tmp_path, monkeypatch):
    commit = hub.add_hf(REPO, "model.safetensors", tensor_bytes(0))
    runner = CliRunner()
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    lock = tmp_path / "zoo.lock"
    assert runner.invoke(cli, ["lock", "tiny", "--out", str(lock)]).exit_code == 0

    assert hub.add_hf(REPO, "model.safetensors", tensor_bytes(1)) == commit   # same commit, other bytes
    _new_machine(tmp_path, monkeypatch, "machine3")
    r = runner.invoke(cli, ["pull", "--locked", str(lock), "-q"])
    assert r.exit_code == 1 and "does not match the pinned" in r.output and len(r.output.strip().splitlines()) == 1
    assert not cache.is_cached("tiny")
    assert not any(p.is_file() for p in (tmp_path / "machine3").rglob("*safetensors*"))


def test_lock_usage_errors(hub, branch_entry, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["lock", "tiny", "--out", str(tmp_path / "l")])
    assert r.exit_code == 2 and "not cached" in r.output
    r = runner.invoke(cli, ["pull", "--locked", str(tmp_path / "absent.lock")])
    assert r.exit_code == 2 and "no such lock file" in r.output
    (tmp_path / "bad.lock").write_text('{"version": 1, "models": {"tiny": {"source": {}, "sha256": "xyz"}}}')
    r = runner.invoke(cli, ["pull", "--locked", str(tmp_path / "bad.lock")])
    assert r.exit_code == 2 and "bad.lock" in r.output
    r = runner.invoke(cli, ["pull"])
    assert r.exit_code == 2 and "--locked" in r.output


def test_lock_out_dash_prints_it_and_a_device_or_link_is_written_into_not_replaced(hub, branch_entry, tmp_path,
                                                                                  monkeypatch):
    """QA: `zoo lock --out -` wrote a file named "-"; `--out /dev/null` (or /dev/stdout, a FIFO) put a regular
    file in the device's place (temp file + rename, as root); `--out LINK` replaced the symlink by a file."""
    import os

    hub.add_hf(REPO, "model.safetensors", tensor_bytes(0))
    runner = CliRunner()
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(cli, ["lock", "--out", "-"])
    assert r.exit_code == 0 and not (tmp_path / "-").exists()
    assert "tiny" in json.loads(r.stdout)["models"] and "locked 1 model(s) in stdout" in r.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)    # a reader waiting, as `<(...)` or `| cat` would
    try:
        assert runner.invoke(cli, ["lock", "--out", str(fifo)]).exit_code == 0
        assert fifo.is_fifo() and "tiny" in json.loads(os.read(reader, 1 << 16))["models"]
    finally:
        os.close(reader)
    (tmp_path / "real.lock").write_text('{"models": {}, "version": 1}\n')       # an earlier lock
    (tmp_path / "link.lock").symlink_to("real.lock")
    assert runner.invoke(cli, ["lock", "--out", "link.lock"]).exit_code == 0
    assert (tmp_path / "link.lock").is_symlink()
    assert "tiny" in json.loads((tmp_path / "real.lock").read_text())["models"]


def test_lock_out_a_file_of_the_users_is_refused_byte_identical_and_an_earlier_lock_replaced(hub, branch_entry,
                                                                                              tmp_path, monkeypatch):
    """QA (h72): `zoo lock --out notes.txt` (a typo, a tab completion; a link to such a file) replaced the user's
    file with a lock file, without a word."""
    hub.add_hf(REPO, "model.safetensors", tensor_bytes(0))
    runner = CliRunner()
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "link.lock").symlink_to("notes.txt")
    for out in ("notes.txt", "link.lock"):
        r = runner.invoke(cli, ["lock", "--out", out])
        assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
        assert f"{out} exists and is not a zoo lock file, and zoo lock replaces only a lock file: choose " \
               f"another --out" in r.output and f"{out} was not written" in r.output
    assert notes.read_text() == "my notes\n"
    for earlier in ('{"models": {"old": {}}, "version": 1}\n', ""):       # an earlier lock, an empty file
        (tmp_path / "zoo.lock").write_text(earlier)
        assert runner.invoke(cli, ["lock"]).exit_code == 0
        assert list(json.loads((tmp_path / "zoo.lock").read_text())["models"]) == ["tiny"]


def test_a_lock_file_broken_by_a_merge_is_written_again_by_zoo_lock(hub, branch_entry, tmp_path, monkeypatch):
    """Review (h77): a zoo.lock that no longer parses (git's conflict markers, a hand edit's stray comma) made
    `zoo pull --locked` say `write it again with zoo lock`, and `zoo lock` then refused it as a file of the
    user's (`choose another --out`): no way to repair the project's lock in place."""
    hub.add_hf(REPO, "model.safetensors", tensor_bytes(0))
    runner = CliRunner()
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["lock"]).exit_code == 0
    lines = (tmp_path / "zoo.lock").read_text().splitlines(keepends=True)
    broken = ["<<<<<<< HEAD\n", *lines, "=======\n", *lines, ">>>>>>> other\n"]
    for text in ("".join(broken), "".join(lines).replace("}\n", "},\n", 1)):
        (tmp_path / "zoo.lock").write_text(text)
        r = runner.invoke(cli, ["pull", "--locked", "zoo.lock"])
        said = "zoo.lock: not a readable lock file ("
        assert r.exit_code == 2 and said in r.output and "write it again with `zoo lock`" in r.output, r.output
        r = runner.invoke(cli, ["lock"])
        assert r.exit_code == 0, r.output
        assert list(json.loads((tmp_path / "zoo.lock").read_text())["models"]) == ["tiny"]


def test_lock_with_nothing_cached_keeps_the_file_and_pull_locked_dash_reads_stdin(hub, branch_entry, tmp_path,
                                                                                 monkeypatch):
    """QA: `zoo lock` on a machine with nothing cached replaced the project's zoo.lock with an empty one (exit 0,
    "locked 0 model(s)"); `zoo pull --locked -` was "-: no such lock file"."""
    runner = CliRunner()
    lock = tmp_path / "zoo.lock"
    lock.write_text("the project's lock\n")
    r = runner.invoke(cli, ["lock", "--out", str(lock)])
    assert r.exit_code == 2 and "nothing is cached in" in r.output and f"({lock} was not written)" in r.output
    assert lock.read_text() == "the project's lock\n"
    data = tensor_bytes(0)
    hub.add_hf(REPO, "model.safetensors", data)
    assert runner.invoke(cli, ["pull", "tiny", "-q"]).exit_code == 0
    text = runner.invoke(cli, ["lock", "--out", "-"]).stdout
    _new_machine(tmp_path, monkeypatch, "machine2")
    r = runner.invoke(cli, ["pull", "--locked", "-", "-q"], input=text)
    assert r.exit_code == 0 and "sha256 matches the lock" in r.output, r.output
    assert cache.weights_path("tiny").read_bytes() == data


@pytest.mark.parametrize("source, lacking", [({"kind": "hf", "repo": "a/b", "revision": "main"}, "filename"),
                                             ({"kind": "url", "url": None}, "url"), ({"kind": "file"}, "path"),
                                             ({"kind": "package", "path": "w.pth"}, "package")])
def test_a_locked_source_without_what_it_needs_is_one_line(branch_entry, tmp_path, source, lacking):
    """QA: a hand-edited lock whose hf source had no filename was a TypeError traceback (quote_from_bytes)
    from deep inside huggingface_hub."""
    lock = tmp_path / "zoo.lock"
    lock.write_text(json.dumps({"version": 1, "models": {"tiny": {"sha256": "a" * 64, "source": source}}}))
    r = CliRunner().invoke(cli, ["pull", "--locked", str(lock)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [r.output.strip()], r.output
    assert f"entry 'tiny': its {source['kind']} source lacks {lacking}; write the lock file again" in r.output


def test_a_locked_hf_repo_the_hub_would_refuse_is_one_line(branch_entry, tmp_path):
    """QA (h72): a hand-edited lock whose hf repo is `a/..` reached huggingface_hub, whose HFValidationError ended
    `zoo pull --locked` in a traceback."""
    lock = tmp_path / "zoo.lock"
    source = {"kind": "hf", "repo": "a/..", "revision": "0" * 40, "filename": "model.safetensors"}
    lock.write_text(json.dumps({"version": 1, "models": {"tiny": {"sha256": "a" * 64, "source": source}}}))
    r = CliRunner().invoke(cli, ["pull", "--locked", str(lock)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [r.output.strip()], r.output
    assert "entry 'tiny': its hf source's repo 'a/..' is no Hub repository (each in letters" in r.output, r.output
