"""`zoo pull`, `zoo import`, `zoo cache ...` through click's CliRunner: output and exit codes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.zoo.conftest import entry_dict, pth_bytes, resnet_state, tensor_bytes, write_registry
from zoo import cache
from zoo.cli import cli

# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

REPO = "timm/tiny.cli"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(hub, tmp_path, monkeypatch):
    """A user registry with a pinned model, an unpinned (TOFU) one and a tampered one."""
    good, tofu = tensor_bytes(0), tensor_bytes(1)
    commit = hub.add_hf(REPO, "model.safetensors", good)
    tofu_url = hub.add_file("tofu.safetensors", tofu)
    entries = [
        entry_dict("tiny-pinned", [{"kind": "hf", "repo": REPO, "revision": commit,
                                    "filename": "model.safetensors", "sha256": sha(good)}]),
        entry_dict("tiny-tofu", [{"kind": "url", "url": tofu_url, "sha256": None,
                                  "sha256_note": "test: publisher gives no digest"}]),
        entry_dict("tiny-bad", [{"kind": "url", "url": hub.add_file("bad.safetensors", tofu),
                                 "sha256": sha(good)}]),
        entry_dict("tiny-branch", [{"kind": "hf", "repo": REPO, "revision": "main",
                                    "revision_note": "test: a branch", "filename": "model.safetensors",
                                    "sha256": sha(good)}]),
    ]
    path = write_registry(tmp_path / "user.yaml", entries)
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    return {"good": good, "tofu": tofu, "commit": commit}


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_pull_then_cached_then_force(hub, registry):
    r = run("pull", "tiny-pinned", "--quiet")
    assert r.exit_code == 0, r.output
    assert "pulled and verified" in r.output and str(cache.weights_path("tiny-pinned")) in r.output
    n = len(hub.requests)
    r = run("pull", "tiny-pinned")
    assert r.exit_code == 0 and "already cached" in r.output and len(hub.requests) == n
    r = run("pull", "tiny-pinned", "--force", "-q")
    assert r.exit_code == 0 and hub.count("/resolve/", "GET") == 2


def test_pull_prints_tofu_digest(registry):
    r = run("pull", "tiny-tofu", "-q")
    assert r.exit_code == 0, r.output
    assert sha(registry["tofu"]) in r.output and "trusted on first use" in r.output


def test_pull_unknown_model_is_usage_error(registry):
    r = run("pull", "no-such-model-xyz")
    assert r.exit_code == 2 and "unknown model" in r.output


def test_pull_integrity_failure_exit_1(registry):
    r = run("pull", "tiny-bad", "-q")
    assert r.exit_code == 1 and "does not match the pinned" in r.output
    assert not cache.is_cached("tiny-bad")


def test_a_pinned_file_of_another_architecture_is_refused_by_pull_and_nothing_is_cached(hub, tmp_path, monkeypatch,
                                                                                        _isolated_home):
    """QA (session 21, left as it was): a pinned file whose sha256 matches but whose tensors are another
    architecture's (test_vit's weights under a test_resnet entry) said "pulled and verified"; the build then
    refused it. The pull now checks the fit as `zoo import` does: one line naming what to fix in the entry,
    nothing cached, no staging left; over a good cached copy (`--force`), that copy stays, verified."""
    import timm
    from safetensors.torch import save

    good = tensor_bytes(0)
    vit = save({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()})
    reg = tmp_path / "r.yaml"
    monkeypatch.setenv("ZOO_REGISTRY", str(reg))

    def register(data: bytes) -> None:
        write_registry(reg, [entry_dict("tiny", [{"kind": "url", "url": hub.add_file("m.safetensors", data),
                                                  "sha256": sha(data)}])])

    register(vit)
    r = run("pull", "tiny", "-q")
    assert r.exit_code == 1 and "pulled and verified" not in r.output, r.output
    error, = [ln for ln in r.output.splitlines() if ln.startswith("zoo: error:")]
    assert "does not fit tiny (timm:test_resnet)" in error and "missing" in error, error
    assert "its sha256 matches the pin, but it holds the weights of another architecture" in error, error
    assert "nothing was cached; fix the entry's source and its sha256 pin" in error, error
    assert not cache.is_cached("tiny") and not cache.weights_path("tiny").exists()
    assert not any(p.is_file() for p in (_isolated_home / "tmp").rglob("*"))
    assert "nothing cached" in run("cache", "ls").output

    register(good)
    assert run("pull", "tiny", "-q").exit_code == 0
    register(vit)
    r = run("pull", "tiny", "--force", "-q")
    assert r.exit_code == 1 and "does not fit tiny" in r.output, r.output
    assert cache.weights_path("tiny").read_bytes() == good
    assert run("cache", "verify").exit_code == 0


def test_pull_several_continues_after_a_failure(registry):
    r = run("pull", "tiny-bad", "tiny-pinned", "-q")
    assert r.exit_code == 1
    assert cache.is_cached("tiny-pinned") and not cache.is_cached("tiny-bad")


def test_pull_offline_exit_1_fast(registry, monkeypatch, hub):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    r = run("pull", "tiny-pinned")
    assert r.exit_code == 1 and "zoo import tiny-pinned" in r.output and hub.requests == []


def test_cache_ls_rm_verify_path(registry, _isolated_home):
    r = run("cache", "ls")
    assert r.exit_code == 0 and "nothing cached" in r.output
    assert run("pull", "tiny-pinned", "tiny-tofu", "-q").exit_code == 0
    r = run("cache", "ls")
    assert r.exit_code == 0 and "tiny-pinned" in r.output and "tiny-tofu" in r.output and "(tofu)" in r.output
    assert run("cache", "path").output.strip() == str(_isolated_home)
    assert run("cache", "path", "tiny-tofu").output.strip() == str(cache.weights_dir("tiny-tofu"))
    r = run("cache", "verify")
    assert r.exit_code == 0 and "2 cached model(s) verified" in r.output
    cache.weights_path("tiny-tofu").write_bytes(b"x" * cache.weights_path("tiny-tofu").stat().st_size)
    r = run("cache", "verify")
    assert r.exit_code == 1 and "tiny-tofu:" in r.output and "changed on disk" in r.output
    r = run("cache", "rm", "tiny-tofu", "tiny-tofu")     # a name given twice is removed once (QA: exit 1)
    assert r.exit_code == 0 and r.output.count("removed tiny-tofu") == 1 and not cache.is_cached("tiny-tofu")
    r = run("cache", "rm", "tiny-tofu")
    assert r.exit_code == 1 and "not cached" in r.output
    assert run("cache", "verify").exit_code == 0


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from zoo.cli import cli; "
            "r = CliRunner().invoke(cli, ['cache', '--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(cli, ['pull', '--help']); assert 'Examples' in r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pull_of_a_branch_revision_reports_the_commit_to_pin(registry):
    r = run("pull", "tiny-branch", "-q")
    assert r.exit_code == 0, r.output
    assert f"resolved to commit {registry['commit']}" in r.output
    assert cache.read_manifest("tiny-branch")["revision"] == registry["commit"]
    r = run("pull", "tiny-pinned", "-q")            # already pinned to that commit: nothing to say
    assert r.exit_code == 0 and "resolved to commit" not in r.output


def test_cache_rm_and_path_suggest_close_matches_for_a_typo(registry):
    for args in (("cache", "rm", "tiny-pined"), ("cache", "path", "tiny-pined")):
        r = run(*args)
        assert r.exit_code == 2 and "did you mean tiny-pinned" in r.output, r.output


@pytest.mark.parametrize("kind", ["hf", "url", "pth"])
def test_pull_onto_a_full_disk_says_so_not_cut_off(hub, tmp_path, monkeypatch, _isolated_home, kind):
    """A write that fails in ZOO_HOME (a file-size limit in a subprocess: EFBIG, as a full disk gives ENOSPC)
    is a local problem with what to do about it, not "the download was cut off ... run the command again",
    nor a traceback from safetensors when a .pth is converted (pth: test_resnet's tensors all views of one
    storage, 0.68 MB, 1.9 MB once converted)."""
    import os
    import resource
    import subprocess
    import sys

    import torch

    data = tensor_bytes(0)                         # 1.9 MB: past the limit below
    if kind == "hf":
        source = {"kind": "hf", "repo": REPO, "revision": hub.add_hf(REPO, "model.safetensors", data),
                  "filename": "model.safetensors", "sha256": sha(data)}
    elif kind == "url":
        source = {"kind": "url", "url": hub.add_file("big.safetensors", data), "sha256": sha(data)}
    else:
        state = resnet_state()
        shared = torch.zeros(max(v.numel() for v in state.values()))
        data = pth_bytes({k: shared[:v.numel()].view(v.shape) if v.is_floating_point() else v
                          for k, v in state.items()})
        source = {"kind": "url", "url": hub.add_file("shared.pth", data), "sha256": sha(data), "format": "pth"}
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r.yaml", [entry_dict("big", [source])])))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ZOO_DEBUG", None)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # noqa: E731
    res = subprocess.run([sys.executable, "-m", "zoo", "pull", "big", "-q"], env=env, capture_output=True,
                         text=True, errors="replace", timeout=120, preexec_fn=limit, cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    error, = [ln for ln in res.stderr.splitlines() if ln.startswith("zoo: error:")]
    assert "File too large" in error and "ZOO_HOME" in error and str(_isolated_home) in error, error
    assert "cut off" not in error and "run the command again" not in error, error
    assert not cache.is_cached("big") and not any(p.is_file() for p in (_isolated_home / "tmp").rglob("*"))
    assert run("pull", "big", "-q").exit_code == 0      # room again: the same pull succeeds


def test_cache_ls_with_zoo_home_a_file_says_so(tmp_path, monkeypatch):
    """QA (helper-58): `zoo cache ls` said "nothing cached under FILE" where pull and import say it is a file."""
    home = tmp_path / "home-file"
    home.write_text("x")
    monkeypatch.setenv("ZOO_HOME", str(home))
    r = CliRunner().invoke(cli, ["cache", "ls"])
    assert r.exit_code == 2 and f"ZOO_HOME={home} is a file, not a folder" in r.output, r.output


def test_cache_ls_names_a_copied_folder_and_sizes_a_damaged_manifest(tmp_path, monkeypatch):
    """QA (helper-58): a copied weights folder was listed under the name of the model it was copied from (twice
    the same name; the folder `zoo cache rm` takes appeared nowhere), and one with a damaged manifest as 0 B."""
    home = tmp_path / "home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    for folder, manifest in (("tiny", json.dumps({"name": "tiny", "sha256": "ab" * 32, "source": "file:x"})),
                             ("tiny-backup", json.dumps({"name": "tiny", "sha256": "ab" * 32, "source": "file:x"})),
                             ("broken", "{not json")):
        (home / "weights" / folder).mkdir(parents=True)
        (home / "weights" / folder / "model.safetensors").write_bytes(b"x" * 2048)
        (home / "weights" / folder / "manifest.json").write_text(manifest)
    r = CliRunner().invoke(cli, ["cache", "ls"])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines()[:-1]}
    assert sorted(lines) == ["broken", "tiny", "tiny-backup"], r.output
    assert "(manifest: tiny)" in lines["tiny-backup"] and "2.0 KiB" in lines["broken"], r.output


def test_pull_takes_the_file_of_a_network_that_cannot_be_built_on_the_meta_device(hub, tmp_path, monkeypatch):
    """The fit check of a pull builds the entry's network on the meta device; torchvision's RegNets cannot be
    (their constructor copies a computed tensor out: "Cannot copy out of meta tensor"), and the pull of their
    own weights crashed. Such a network's file is pulled unchecked: the build that loads it checks every
    tensor (``zoo.build.load_weights``)."""
    import torchvision
    from safetensors.torch import save

    net = torchvision.models.regnet_x_400mf(weights=None, num_classes=3)
    data = save({k: v.contiguous() for k, v in net.state_dict().items()})
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r.yaml", [{
        **entry_dict("reg", [{"kind": "url", "url": hub.add_file("reg.safetensors", data), "sha256": sha(data)}],
                     builder="torchvision:regnet_x_400mf"),
        "num_classes": 3, "stages": [["stem"], ["trunk_output"]]}])))
    r = run("pull", "reg", "-q")
    assert r.exit_code == 0, r.output
    assert cache.weights_path("reg").read_bytes() == data


def test_pull_takes_a_file_without_batchnorm_counts_as_the_build_loads_it(hub, tmp_path, monkeypatch):
    """Checkpoints saved before PyTorch 0.4 (torchvision's first ResNet, VGG-BN, DenseNet files) hold no
    BatchNorm ``num_batches_tracked``: loading fills each in (torch's ``_NormBase._load_from_state_dict``), and
    ``zoo.build.load_weights`` takes them, but the fit check of a pull refused them as "missing"."""
    import torch

    from zoo.network import weights_misfit
    from tests.zoo.conftest import make_entry

    state = {k: v for k, v in resnet_state().items() if not k.endswith("num_batches_tracked")}
    assert weights_misfit(make_entry("tiny"), {k: tuple(v.shape) for k, v in state.items()}) == ""
    data = pth_bytes({k: torch.randn(v.shape) for k, v in state.items()})
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "r.yaml", [entry_dict("old", [
        {"kind": "url", "url": hub.add_file("old.pth", data), "sha256": sha(data), "format": "pth"}])])))
    r = run("pull", "old", "-q")
    assert r.exit_code == 0, r.output
    assert cache.is_cached("old")


def test_pull_names_the_source_that_served_it_when_an_earlier_one_failed(hub, tmp_path, monkeypatch, closed_port_url):
    """The judge's walk-through (helper-146): with no network the Hub source of efficientnet_lite0 failed and the
    package source served the file, and `zoo pull` said only "pulled and verified": which source, and that the
    first one failed, showed only in `zoo cache ls`. The line names the source now."""
    good = tensor_bytes(0)
    served = hub.add_file("second.safetensors", good)
    entries = [entry_dict("tiny-second", [
        {"kind": "url", "url": closed_port_url + "/first.safetensors", "sha256": sha(good)},
        {"kind": "url", "url": served, "sha256": sha(good)}])]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "two.yaml", entries)))
    r = run("pull", "tiny-second", "-q")
    assert r.exit_code == 0, r.output
    assert f"pulled and verified from url:{served}," in r.output, r.output
