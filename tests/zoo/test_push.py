"""zoo push against the loopback Hub (tests/zoo/hub_server.py), which answers huggingface_hub's real upload
calls (create repo, preupload, LFS batch + upload + verify, commit) and downloads; huggingface_hub itself is
never mocked. Then plain timm, `zoo pull` and `zoo predict` load what was pushed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.conftest import make_image_folder
from tests.zoo.test_bundle import CLASSES, make_run
from zoo.bundle import export_run, load_bundle
from zoo.cli import cli

REPO = "me/tiny-classifier"
SECRET = "/home/alice/weights/efficientnet-lite0-57934424.pth"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def make_bundle(root, seed: int = 0, source: str = f"import:{SECRET}"):
    run, _ = make_run(root, seed=seed)
    info = json.loads((run / "model.json").read_text())
    info["source"] = source                     # what `zoo import` leaves in a run today
    info["pretrained_cfg"] = {"license": "apache-2.0", "source": source, "file": SECRET}
    (run / "model.json").write_text(json.dumps(info))
    (run / "exclude.txt").write_text("cat/dup_001.png\ndog/leak_002.png\n")
    (run / "scan.json").write_text(json.dumps({"root": "/home/alice/photos", "layout": "flat", "counts": {
        "train": {"cat": 9, "dog": 8, "fox": 7}, "val": {"cat": 3, "dog": 3, "fox": 2}}}))
    return run, export_run(run, run / "export")


def push(runner, path, *extra, repo=REPO):
    return runner.invoke(cli, ["push", str(path), "--repo", repo, *extra])


def test_push_then_plain_timm_loads_it_with_identical_logits(hub, tmp_path, runner):
    import timm

    run, bundle = make_bundle(tmp_path)
    res = push(runner, run)
    assert res.exit_code == 0, res.output
    assert f"to {REPO}@main" in res.output
    # the real upload protocol went through: one LFS PUT (the weights), one commit
    assert hub.count("/api/repos/create", "POST") == 1 and hub.count("/preupload/", "POST") == 1
    assert hub.count("/info/lfs/objects/batch", "POST") == 1 and hub.count("/lfs/", "PUT") == 1
    assert hub.count("/commit/main", "POST") == 1
    assert sorted(hub.repos[REPO].files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    with torch.no_grad():
        diff = (model(x) - load_bundle(bundle).model(x)).abs().max().item()
    assert diff == 0.0
    assert model.pretrained_cfg["label_names"] == list(CLASSES)
    assert hub.count(f"/{REPO}/resolve/main/model.safetensors", "GET") >= 1


def test_model_card_parses_with_huggingface_hub_and_carries_metrics(hub, tmp_path, runner):
    from huggingface_hub import ModelCard

    run, bundle = make_bundle(tmp_path)
    report = tmp_path / "holdout"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "top5": None, "n_images": 9}))
    assert push(runner, bundle, "--test-metrics", str(report)).exit_code == 0
    card = ModelCard(hub.repos[REPO].files["README.md"].decode())
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0" and "zoo-finetune" in data.tags
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {("validation", "accuracy"): 0.75, ("test", "accuracy"): 0.5}
    assert data.to_dict()["model-index"][0]["results"][0]["task"]["type"] == "image-classification"
    body = card.text
    for needle in ("| `cat` | 9 | 3 |", "Images: train 24, val 8.", "2 image(s)", "- lr: 0.001\n",
                   "- epochs: 5", "validation acc: 75.00%", "test accuracy: 50.00% on 9 images",
                   f'timm.create_model("hf-hub:{REPO}", pretrained=True)', f"zoo predict hf-hub:{REPO}"):
        assert needle in body, needle



def test_the_cards_plain_timm_lines_read_a_phone_photo_upright_as_zoo_does(hub, tmp_path, runner, monkeypatch):
    """QA (helper-109): the Hub card's plain-timm lines opened the image with ``Image.open(...).convert("RGB")``, so a
    phone photo stored sideways (EXIF orientation 6: most portrait photos) reached the model sideways, while the model
    was trained, and `zoo predict` answers, on it upright. The card's lines, run as written, feed the model the
    pixels zoo's loader gives (``finetune.data.load_image``) for such a photo."""
    from finetune.data import load_image

    run, bundle = make_bundle(tmp_path)
    assert push(runner, run).exit_code == 0
    card = hub.repos[REPO].files["README.md"].decode()
    (code,) = [block.split("```")[0] for block in card.split("```python\n")[1:] if "hf-hub:" in block.split("```")[0]]
    photo = Image.new("RGB", (48, 32), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 12, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    monkeypatch.chdir(tmp_path)
    photo.save("image.jpg", quality=95, exif=exif)
    names: dict = {}
    exec(code, names)       # the card's lines, as a user pastes them
    assert torch.equal(names["x"], names["transform"](load_image("image.jpg")).unsqueeze(0))  # was the sideways photo

def test_the_hub_card_says_a_damaged_scan_json_is_present_but_unreadable(tmp_path):
    from zoo.push import plan_push

    run, bundle = make_bundle(tmp_path)
    (run / "scan.json").write_text("{not json", encoding="utf-8")
    card = plan_push(bundle, REPO).card
    assert "The run's scan.json is present but unreadable (" in card and str(tmp_path) not in card


@pytest.mark.parametrize("tta, said", [
    ({}, None),
    ({"tta": True, "tta_views": "flip", "tta_scales": None, "tta_mirror": True},
     "the centre view and its mirror (`zoo predict --tta`)"),
    ({"tta": True, "tta_views": "flip", "tta_scales": None, "tta_mirror": False}, None),   # the plain view
    ({"tta": True, "tta_views": "ten", "tta_scales": [40, 48], "tta_mirror": False},
     "five crops at sizes 40,48 (`zoo predict --tta --tta-scales 40,48`)")])
def test_a_test_accuracy_measured_with_tta_says_so_in_the_card(tmp_path, tta, said):
    """QA: `zoo push --test-metrics` of a `zoo eval --tta` report published its accuracy as the plain "test
    accuracy": a reader predicting one view (timm, zoo predict) gets less. The card says which views."""
    from zoo.push import plan_push

    _, bundle = make_bundle(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "n_images": 9, **tta}))
    card = plan_push(bundle, REPO, test_metrics=tmp_path / "report").card
    line = next(ln for ln in card.splitlines() if ln.startswith("- test accuracy: 50.00% on 9 images"))
    if said is None:
        assert "augmentation" not in line and "name: test accuracy\n" in card
    else:
        assert line.endswith(f", with test-time augmentation: the softmax averaged over {said}")
        assert "name: test accuracy (TTA)\n" in card


def test_test_metrics_of_another_model_are_refused(hub, tmp_path, runner):
    """QA: an evaluation of a 4-class model went into a 3-class model's card. A report recording other
    weights, or other labels, is refused before anything is uploaded; `zoo eval`'s own report of this
    bundle goes through (it records the weights' sha256)."""
    run, bundle = make_bundle(tmp_path)
    report = tmp_path / "other"
    report.mkdir()
    base = {"accuracy": 0.5, "top5": None, "n_images": 9}
    for doc, what in (({**base, "labels": ["-dash", *CLASSES]}, "a model of other classes"),
                      ({**base, "labels": list(CLASSES), "weights_sha256": "f" * 64}, "other weights")):
        (report / "metrics.json").write_text(json.dumps(doc))
        res = push(runner, bundle, "--test-metrics", str(report))
        assert res.exit_code == 2 and what in res.output and "nothing was uploaded" in res.output, res.output
    assert REPO not in hub.repos
    data = make_image_folder(tmp_path / "holdout", classes=CLASSES, per_class=2)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["weights_sha256"]
    assert push(runner, bundle, "--test-metrics", str(tmp_path / "ev")).exit_code == 0

def test_nothing_private_is_published(hub, tmp_path, runner):
    from zoo.bundle import read_safetensors_metadata

    run, bundle = make_bundle(tmp_path)
    # a bundle exported before the fix still carries the local path: push cleans it anyway
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["zoo"]["source"] = f"import:{SECRET}"
    (bundle / "config.json").write_text(json.dumps(cfg))
    assert push(runner, bundle).exit_code == 0
    files = hub.repos[REPO].files
    texts = [files["config.json"].decode(), files["README.md"].decode(),
             json.dumps(read_safetensors_metadata("model.safetensors", data=files["model.safetensors"]))]
    for text in texts:
        assert "/home/alice" not in text and str(tmp_path) not in text
    cfg = json.loads(files["config.json"])
    assert cfg["zoo"]["source"] == "import:efficientnet-lite0-57934424.pth"
    assert cfg["pretrained_cfg"]["source"] == "import:efficientnet-lite0-57934424.pth"
    assert cfg["zoo"]["source_sha256"] == "ab" * 32 and "file" not in cfg["pretrained_cfg"]
    assert "sha256 of the file as downloaded or imported: " + "ab" * 32 in texts[1]
    # the export itself no longer records it either (bundle config, safetensors header, ONNX metadata)
    assert json.loads((bundle / "config.json").read_text())["pretrained_cfg"]["source"] == \
        "import:efficientnet-lite0-57934424.pth"


def test_onnx_metadata_names_no_local_path(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    run, _ = make_bundle(tmp_path)
    out = export_run(run, tmp_path / "b2", formats=("safetensors", "onnx"))
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["source"]) == "import:efficientnet-lite0-57934424.pth"
    assert "/home/alice" not in json.dumps(props)


def test_another_model_is_refused_unless_revision_or_overwrite(hub, tmp_path, runner):
    _, a = make_bundle(tmp_path / "a", seed=0)
    _, b = make_bundle(tmp_path / "b", seed=1)
    assert push(runner, a).exit_code == 0
    before = hub.snapshot(REPO)
    res = push(runner, b)
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [res.output.strip()]          # one line, no traceback
    assert "already holds another model" in res.output and "--revision" in res.output
    assert hub.snapshot(REPO) == before and hub.count("/lfs/", "PUT") == 1
    # the same model again: nothing to commit
    res = push(runner, a)
    assert res.exit_code == 0 and "nothing to push" in res.output and hub.snapshot(REPO) == before
    # a branch
    res = push(runner, b, "--revision", "v2")
    assert res.exit_code == 0, res.output
    snap = hub.snapshot(REPO)
    assert snap["main"] == before["main"]
    assert snap["v2"][1]["model.safetensors"] != snap["main"][1]["model.safetensors"]
    # --overwrite replaces main
    res = push(runner, b, "--overwrite", "-m", "replace")
    assert res.exit_code == 0, res.output
    assert hub.snapshot(REPO)["main"][1]["model.safetensors"] == snap["v2"][1]["model.safetensors"]


def test_connection_cut_during_commit_leaves_repo_unchanged(hub, tmp_path, runner):
    _, a = make_bundle(tmp_path / "a", seed=0)
    _, b = make_bundle(tmp_path / "b", seed=1)
    assert push(runner, a).exit_code == 0
    before = hub.snapshot(REPO)
    hub.cut[f"/api/models/{REPO}/commit/main"] = 1
    res = push(runner, b, "--overwrite")
    assert res.exit_code == 1 and res.output.startswith("zoo: error: upload to me/tiny-classifier failed")
    assert "left as it was" in res.output and len(res.output.strip().splitlines()) == 1
    assert hub.snapshot(REPO) == before
    assert hub.count("/lfs/", "PUT") == 2          # b's weights were uploaded, but never committed


def test_push_that_succeeded_is_not_reported_failed_when_zoo_home_is_unwritable(hub, tmp_path, runner,
                                                                               monkeypatch):
    """The commit is on the Hub: a ZOO_HOME that cannot take the local record (pushed.json, for `zoo list
    --mine`) gets a note, not exit 1 with an OSError that reads as if the push had failed."""
    _, a = make_bundle(tmp_path)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "a-file" / "home"))     # below a regular file: root-proof
    res = push(runner, a)
    assert res.exit_code == 0, res.output
    assert len(hub.repos[REPO].log) == 2 and "pushed" in res.stdout
    assert "note:" in res.stderr and "pushed.json" in res.stderr and "zoo list --mine" in res.stderr


def test_cut_lfs_upload_is_retried_then_committed_whole(hub, tmp_path, runner):
    _, a = make_bundle(tmp_path)
    hub.cut_uploads = 1          # huggingface_hub's own backoff retries the PUT once (after 1 s)
    res = push(runner, a)
    assert res.exit_code == 0, res.output
    assert hub.count("/lfs/", "PUT") == 2 and len(hub.repos[REPO].log) == 2      # creation + one commit
    assert hub.repos[REPO].files["model.safetensors"] == hub.lfs[json.loads(
        hub.repos[REPO].files["config.json"])["zoo"]["weights_sha256"]]


@pytest.mark.slow
def test_lfs_upload_cut_every_time_leaves_repo_unchanged(hub, tmp_path, runner):
    """~45 s: huggingface_hub retries a dropped upload 5 times with backoff (1+2+4+8+8 s) before giving up."""
    _, a = make_bundle(tmp_path / "a", seed=0)
    _, b = make_bundle(tmp_path / "b", seed=1)
    assert push(runner, a).exit_code == 0
    before = hub.snapshot(REPO)
    hub.cut_uploads = 100
    res = push(runner, b, "--overwrite")
    assert res.exit_code == 1 and "left as it was" in res.output, res.output
    assert hub.snapshot(REPO) == before and hub.count("/commit/main", "POST") == 1
    assert hub.count("/lfs/", "PUT") == 1 + 6


def test_private_flag_and_bad_repo_id(hub, tmp_path, runner):
    _, a = make_bundle(tmp_path)
    assert push(runner, a, "--private").exit_code == 0
    assert hub.repos[REPO].private
    res = push(runner, a, repo="not a repo")
    assert res.exit_code == 2 and res.output.startswith("zoo: error: --repo 'not a repo' is not a Hub repo id")
    for bad in ("a--b/c", "me/model."):     # QA (h72): the Hub refuses them; the push failed at the upload, "run
        res = push(runner, a, repo=bad)       # the push again"
        said = f"zoo: error: --repo '{bad}' is not a Hub repo id; write OWNER/NAME (e.g. me/cats-vs-dogs), each in "
        assert res.exit_code == 2 and res.output.startswith(said), res.output
    res = runner.invoke(cli, ["push", str(tmp_path), "--repo", REPO])
    assert res.exit_code == 1 and "neither a run folder" in res.output


def test_private_to_an_existing_public_repo_is_refused_not_published(hub, tmp_path, runner):
    # QA (helper-137): create_repo keeps an existing repo's visibility, so `--private` published the weights
    # publicly, and a bundle already there answered "nothing to push" with exit 0
    run, a = make_bundle(tmp_path)
    assert push(runner, a).exit_code == 0 and not hub.repos[REPO].private
    commits = hub.count("/commit/main", "POST")
    _, b = make_bundle(tmp_path / "b", seed=1)
    for bundle in (a, b):
        res = push(runner, bundle, "--private", "--overwrite")
        assert res.exit_code == 1, res.output
        assert res.output.startswith(f"zoo: error: {REPO} already exists and is public: --private does not change")
        assert res.output.rstrip().endswith("nothing was uploaded") and len(res.output.strip().splitlines()) == 1
    assert hub.count("/commit/main", "POST") == commits and hub.count("/lfs/", "PUT") == 1
    hub.repos[REPO].private = True          # made private on the Hub: the push goes on
    assert push(runner, b, "--private", "--overwrite").exit_code == 0


def test_private_with_a_revision_to_an_existing_public_repo_leaves_it_unchanged(hub, tmp_path, runner):
    # QA (helper-138): the visibility was checked after --revision's branch was made: refused with "nothing was
    # uploaded", while the public repo had gained an (empty) branch of that name
    _, a = make_bundle(tmp_path)
    assert push(runner, a).exit_code == 0
    before = hub.snapshot(REPO)
    res = push(runner, a, "--private", "--revision", "dev")
    assert res.exit_code == 1 and f"{REPO} already exists and is public" in res.output, res.output
    assert hub.snapshot(REPO) == before


def test_a_model_plain_timm_cannot_rebuild_pushed_to_a_branch_is_loaded_from_that_branch(hub, tmp_path, runner):
    # QA (helper-138): pushed with --revision dev, the console said to add a ZOO_REGISTRY entry (zoo builds it as
    # the timm architecture: refused) and the card's download line (no --revision) fetched main's files
    mlp = {"kind": "mlp", "hidden": 16, "dropout": 0.1, "activation": "relu"}
    run, _ = make_run(tmp_path, head=mlp)
    res = push(runner, export_run(run, run / "export"), "--revision", "dev")
    assert res.exit_code == 0, res.output
    download = f"hf download {REPO} config.json model.safetensors --revision dev --local-dir"
    assert f"load it: {download} DIR, then zoo predict DIR IMAGE" in res.output and "ZOO_REGISTRY" not in res.output
    repo = hub.repos[REPO]
    card = repo.snapshots[repo.branches["dev"]]["README.md"].decode()
    assert f"{download} model-folder" in card and f'timm.create_model("hf-hub:{REPO}@dev")' in card
    _, b = make_bundle(tmp_path / "b")          # a linear head on a branch: timm from it, zoo as a folder
    assert push(runner, b, "--revision", "v2").exit_code == 0
    card = repo.snapshots[repo.branches["v2"]]["README.md"].decode()
    assert f'timm.create_model("hf-hub:{REPO}@v2", pretrained=True)' in card and "zoo pull hf-hub:" not in card
    assert f"hf download {REPO} config.json model.safetensors --revision v2 --local-dir model-folder" in card


@pytest.mark.parametrize("kind, said", [
    ("mlp", "an mlp head, which timm's `test_resnet` has not"),
    ("torchvision", "`mobilenet_v3_small`, a torchvision model, no timm architecture"),
])
def test_a_model_plain_timm_cannot_rebuild_is_not_pushed_with_the_timm_line(hub, tmp_path, runner, kind, said):
    # QA (helper-137): `load it: timm.create_model("hf-hub:...")` was printed for an MLP head (timm: a
    # state_dict error) and a torchvision model (timm: unknown model), whose Hub card named no way to load it
    import timm

    mlp = {"kind": "mlp", "hidden": 16, "dropout": 0.1, "activation": "relu"}
    run, _ = (make_run(tmp_path, head=mlp) if kind == "mlp" else
              make_run(tmp_path, builder="torchvision:mobilenet_v3_small", classifier="classifier.3"))
    res = push(runner, export_run(run, run / "export"))
    assert res.exit_code == 0, res.output
    download = f"hf download {REPO} config.json model.safetensors --local-dir DIR"
    assert "timm.create_model" not in res.output and f"load it: {download}, then zoo predict DIR IMAGE" in res.output
    assert (f"note: plain timm cannot rebuild this model ({said}), nor zoo from an hf-hub: name; its card says how "
            "to load it") in res.output
    with pytest.raises(RuntimeError):       # the truth the lines tell
        timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    res = runner.invoke(cli, ["predict", f"hf-hub:{REPO}", str(img)])   # (was: "the file does not fit ... fix
    assert res.exit_code == 2 and res.output == (                       # the entry's source ... in the registry")
        f"zoo: error: hf-hub:{REPO} holds a model timm cannot build ({said}), so zoo cannot from an hf-hub: name "
        f"either; download its bundle files (`{download}`) and give the folder: zoo predict DIR IMAGE\n")
    folder = tmp_path / "dl"                # the two files are a bundle zoo loads
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(hub.repos[REPO].files[name])
    assert load_bundle(folder).labels == list(CLASSES)
    card = hub.repos[REPO].files["README.md"].decode()
    assert "hf download me/tiny-classifier config.json model.safetensors --local-dir model-folder" in card
    assert "zoo pull hf-hub:" not in card
    if kind == "torchvision":
        assert "Plain timm cannot build it (`mobilenet_v3_small` is a torchvision model)" in card
        assert "torchvision.models.get_model('mobilenet_v3_small', weights=None, num_classes=3" in card
    else:
        assert "plain timm cannot rebuild this head" in card


@pytest.mark.parametrize("variable", ["ZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_push_while_offline_is_refused_in_one_line_without_a_request(hub, tmp_path, runner, monkeypatch, variable):
    _, a = make_bundle(tmp_path)
    monkeypatch.setenv(variable, "1")
    res = push(runner, a)
    assert res.exit_code == 1 and res.output.startswith("zoo: error: zoo push needs the network")
    assert len(res.output.strip().splitlines()) == 1 and hub.requests == []
    assert push(runner, a, "--dry-run").exit_code == 0


def test_push_with_a_huggingface_hub_older_than_2_is_refused_in_one_line_without_a_request(hub, tmp_path, runner,
                                                                                           monkeypatch):
    """QA: under huggingface_hub 1.x (no httpx2) zoo push was a ModuleNotFoundError traceback."""
    import sys

    import huggingface_hub

    _, a = make_bundle(tmp_path)
    monkeypatch.setattr(huggingface_hub, "__version__", "1.33.0")
    monkeypatch.setitem(sys.modules, "httpx2", None)
    res = push(runner, a)
    assert res.exit_code == 1 and res.output.startswith("zoo: error: the Hub needs huggingface_hub>=2.0")
    assert len(res.output.strip().splitlines()) == 1 and hub.requests == []


def test_dry_run_uploads_nothing(hub, tmp_path, runner):
    _, a = make_bundle(tmp_path)
    res = push(runner, a, "--dry-run")
    assert res.exit_code == 0 and "library_name: timm" in res.stdout and "would upload" in res.stderr
    assert hub.requests == []


def test_pull_and_predict_a_pushed_model_with_sha256_check(hub, tmp_path, runner):
    from zoo import cache

    _, bundle = make_bundle(tmp_path)
    assert push(runner, bundle).exit_code == 0
    pushed_sha = json.loads(hub.repos[REPO].files["config.json"])["zoo"]["weights_sha256"]
    res = runner.invoke(cli, ["pull", f"hf-hub:{REPO}", "--quiet"])
    assert res.exit_code == 0, res.output
    man = cache.read_manifest(f"hf-hub:{REPO}")
    assert man["sha256"] == pushed_sha and man["tofu"] is False       # pinned by the pushed config.json
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 36), (200, 30, 30)).save(img)
    res = runner.invoke(cli, ["predict", f"hf-hub:{REPO}", str(img), "--json", "--topk", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = {p["label"]: p["prob"] for p in json.loads(res.stdout)[0]["predictions"]}
    want = {lab: round(p, 6) for lab, p in load_bundle(bundle).predict(img, topk=3)[0]}
    assert got == want
    # the Hub now serves other bytes: refused, nothing cached
    runner.invoke(cli, ["cache", "rm", f"hf-hub:{REPO}"])
    hub.repos[REPO].files["model.safetensors"] = hub.repos[REPO].files["model.safetensors"][:-4] + b"\0\0\0\0"
    res = runner.invoke(cli, ["pull", f"hf-hub:{REPO}", "--quiet"])
    assert res.exit_code == 1 and "does not match the pinned" in res.output
    assert not cache.is_cached(f"hf-hub:{REPO}")


def test_list_mine_shows_local_and_pushed(hub, tmp_path, runner, monkeypatch):
    run, _ = make_bundle(tmp_path / "runs")
    assert push(runner, run).exit_code == 0
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, ["list", "--mine"])
    assert res.exit_code == 0, res.output
    assert "runs/run/export" in res.output and f"hf-hub:{REPO}" in res.output
    assert res.output.split("\n")[0].split() == ["KIND", "NAME", "ARCH", "CLASSES", "DETAIL"]   # every column named
    doc = json.loads(runner.invoke(cli, ["list", "--mine", "--json"]).stdout)
    assert {d["kind"] for d in doc} == {"local", "pushed"}


def test_an_upload_error_names_its_cause_once():
    """QA: "failed ([Errno 111] Connection refused: [Errno 111] Connection refused)"."""
    from zoo.push import _hub_error

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError(str(inner)) from inner
    except RuntimeError as err:
        text = str(_hub_error(err, "me/x"))
    assert text.count("Connection refused") == 1 and text.startswith("upload to me/x failed ([Errno 111]")
    try:
        try:
            raise TimeoutError("read timed out")
        except OSError as inner:
            raise RuntimeError("the upload stopped") from inner
    except RuntimeError as err:
        assert "the upload stopped: read timed out" in str(_hub_error(err, "me/x"))


def test_a_push_to_a_branch_names_it_in_the_load_hint_and_a_revision_in_a_name_is_one_line(hub, tmp_path, runner):
    """QA: after `zoo push --revision v2` the hint said `hf-hub:REPO` (the main branch: another model, or
    none); `zoo predict hf-hub:REPO@v2` (timm's spelling) was an HFValidationError traceback."""
    _, bundle = make_bundle(tmp_path / "a")
    res = push(runner, bundle, "--revision", "v2")
    assert res.exit_code == 0, res.output
    assert f'timm.create_model("hf-hub:{REPO}@v2", pretrained=True)' in res.output
    assert f"zoo predict hf-hub:{REPO} IMAGE" not in res.output and "`revision: v2`" in res.output
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    for args in (["predict", f"hf-hub:{REPO}@v2", str(image)], ["pull", f"hf-hub:{REPO}@v2"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2 and res.output.strip().splitlines() == [res.output.strip()], res.output
        assert f"hf-hub:{REPO}@v2: zoo takes no revision in an hf-hub: name" in res.output


def test_a_hand_edited_pushed_json_neither_breaks_list_mine_nor_the_next_push(hub, tmp_path, runner, monkeypatch):
    """QA: a ZOO_HOME/pushed.json entry without "revision" (edited by hand) was a KeyError traceback in
    `zoo list --mine`, and in `zoo push` after its upload had succeeded."""
    from zoo.cache import zoo_home

    zoo_home().mkdir(parents=True, exist_ok=True)
    (zoo_home() / "pushed.json").write_text(json.dumps([{"repo": "me/old"}, {"repo": 5}, "x"]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, ["list", "--mine"])
    assert res.exit_code == 0 and "hf-hub:me/old" in res.output and "main@?" in res.output, res.output
    run, _ = make_bundle(tmp_path / "runs")
    res = push(runner, run)
    assert res.exit_code == 0 and "pushed" in res.output, res.output
    assert [p["repo"] for p in json.loads((zoo_home() / "pushed.json").read_text())] == ["me/old", REPO]


def test_a_re_exported_bundle_is_the_same_push_and_the_same_test_report(hub, tmp_path, runner):
    """QA: after `zoo export RUN` again (same weights), `zoo push` made a new commit and `--test-metrics` of the
    report made on the first export was refused as "other weights": the export's bytes changed each time."""
    run, bundle = make_bundle(tmp_path / "a")
    make_image_folder(tmp_path / "data", classes=CLASSES, per_class=2, layout="flat", size=32)
    report = tmp_path / "report"
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(tmp_path / "data"), "--out", str(report)])
    assert res.exit_code == 0, res.output
    assert push(runner, run).exit_code == 0
    export_run(run, run / "export")
    res = push(runner, run, "--test-metrics", str(report), "--dry-run")
    assert res.exit_code == 0, res.output
    res = push(runner, run)
    assert res.exit_code == 0 and "nothing to push" in res.output, res.output


def test_a_bundle_replaced_while_push_reads_it_is_refused_not_published_mixed(tmp_path, monkeypatch):
    """QA: plan_push hashed the weights, read their header and then read their bytes by name, each at its own
    time: a `zoo export --overwrite` that published in between had the second export's weights published
    under the first export's label names (a Hub model naming every class wrong). The bytes are read once,
    and config.json, read after them, must describe them: an export publishing in between is named."""
    import os
    import socket

    import zoo.push as push_module
    from tests.zoo.test_bundle import _publish, _two_bundles
    from zoo.errors import BundleError

    a, b = _two_bundles(tmp_path)
    out = shutil.copytree(a, tmp_path / "bundle")
    real = push_module.read_safetensors_metadata

    def read_then_export_publishes(path, *args, **kwargs):
        meta = real(path, *args, **kwargs)
        (out / ".zoo.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                   "command": "zoo export run --out bundle --overwrite"}))
        _publish(b, out)
        return meta

    monkeypatch.setattr(push_module, "read_safetensors_metadata", read_then_export_publishes)
    with pytest.raises(BundleError, match="cannot be pushed while another process writes it: .*zoo export run.*; "
                                          "push again when it is done; nothing was uploaded"):
        push_module.plan_push(out, REPO)
    (out / ".zoo.lock").unlink()
    monkeypatch.setattr(push_module, "read_safetensors_metadata", real)
    plan = push_module.plan_push(out, REPO)     # once the export is done: the new bundle, whole
    assert json.loads(plan.files["config.json"])["label_names"] == ["xx", "yy", "zz"]


def test_a_model_an_earlier_zoo_pushed_from_this_bundle_is_the_same_model_not_another(hub, tmp_path, runner,
                                                                                       monkeypatch):
    """QA (upgrade): a bundle pushed by a zoo from before the header was sorted, pushed again after the upgrade
    (e.g. to add --test-metrics): 'me/x@main already holds another model; ... --overwrite', though it is the
    same bundle file. Its config.json's zoo.published_from_sha256 says so; another model is still refused."""
    import struct

    import zoo.push as push_module

    real = push_module.rewrite_safetensors_metadata

    def as_an_earlier_zoo_wrote_it(data, metadata):      # the same header, in another order
        out = real(data, metadata)
        (n,) = struct.unpack("<Q", out[:8])
        header = json.loads(out[8:8 + n])
        header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + out[8 + n:]

    _, a = make_bundle(tmp_path / "a", seed=0)
    _, b = make_bundle(tmp_path / "b", seed=1)
    monkeypatch.setattr(push_module, "rewrite_safetensors_metadata", as_an_earlier_zoo_wrote_it)
    assert push(runner, a).exit_code == 0
    monkeypatch.setattr(push_module, "rewrite_safetensors_metadata", real)
    old = hub.snapshot(REPO)["main"][1]["model.safetensors"]
    res = push(runner, a)
    assert res.exit_code == 0 and "another model" not in res.output, res.output
    assert hub.snapshot(REPO)["main"][1]["model.safetensors"] != old        # now the sorted header
    res = push(runner, b)
    assert res.exit_code == 1 and "already holds another model" in res.output


def test_two_pushes_finishing_at_once_both_stay_in_pushed_json(tmp_path, monkeypatch):
    """QA: each push read ZOO_HOME/pushed.json, added its record and wrote the file back: two pushes ending at
    the same time (a script pushing several models in parallel) kept only one record, and `zoo list --mine`
    lost the other push. The read-add-write is done under a file lock."""
    import threading
    import time
    from pathlib import Path

    import zoo.push as push_module

    real = push_module.pushed_models

    def slow_read():
        items = real()
        time.sleep(0.3)         # the other push reads the file meanwhile
        return items

    monkeypatch.setattr(push_module, "pushed_models", slow_read)
    plan = push_module.PushPlan(repo=REPO, files={}, weights_sha256="ab" * 32, bundle=Path(tmp_path), run=None,
                                card="")
    results = [push_module.PushResult(repo=f"me/m{i}", revision="main", commit=f"{i}" * 40, url="") for i in (1, 2)]
    threads = [threading.Thread(target=push_module._record, args=(r, plan)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p["repo"] for p in real()) == ["me/m1", "me/m2"]


@pytest.mark.parametrize("phases, after", [(["head"], "trained nothing"),
                                           (["head", "finetune"], "trained the layers after it")])
def test_both_model_cards_say_the_freeze_decided_and_a_solved_head(tmp_path, phases, after):
    """QA: the bundle's README.md and the pushed card gave the freeze as config.yaml asked it ("auto"; the
    pushed card read a summary key, "depth", that no run writes), and gave optimizer and lr as the recipe
    of a head that L-BFGS solved with neither."""
    from zoo.push import plan_push

    run, _ = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "phases": phases, "head_solver": [{"C": 1.0}],
                                                  "freeze": {"trainable_stages": 0, "label": "head"}}))
    bundle = export_run(run, run / "export")
    readme = (bundle / "README.md").read_text()
    card = plan_push(bundle, REPO).card
    assert "- freeze: head (auto)\n" in readme and "- freeze: head (auto)\n" in card
    for text in (readme, card):
        (line,) = [ln for ln in text.splitlines() if "lbfgs (the head solved on cached features" in ln]
        assert line.endswith(f"no learning rate; the optimizer and lr {after})")


@pytest.mark.parametrize("best_phase, said", [("finetune", True), ("head", False), (None, True)])
def test_the_bundle_card_names_ema_weights_only_where_the_finetune_phase_was_kept(tmp_path, best_phase, said):
    """QA: with --ema (auto after a solved head) the card said the weights were the finetune phase's moving
    average where the epoch kept was the head phase's, which is not averaged. (None: a run from before
    summary.json named the phase keeps the line.)"""
    run, _ = make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "best_phase": best_phase}))
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "ema: 0.9\n")
    readme = (export_run(run, run / "export") / "README.md").read_text()
    assert ("exponential moving average" in readme) == said


def test_both_cards_give_the_recipe_as_config_yaml_holds_it(tmp_path):
    """One card writer for the bundle and the Hub (zoo.modelcard.model_card): the same recipe lines, values as
    config.yaml holds them (the Hub card printed a small learning rate, 1e-5, as 0.0000)."""
    from zoo.push import plan_push

    run, _ = make_bundle(tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.001", "lr: 1.0e-05"))
    bundle = export_run(run, run / "export")
    readme, card = (bundle / "README.md").read_text(), plan_push(bundle, REPO).card
    recipe = [[ln for ln in text.split("## Recipe")[1].split("## Metrics")[0].splitlines() if ln]
              for text in (readme, card)]
    assert recipe[0] == recipe[1] and "- lr: 1e-05" in recipe[0], recipe
    assert "/home/alice/photos" in readme and "/home/alice" not in card      # the local folder stays local


def test_the_cards_after_review(tmp_path):
    """Review of the single card writer (helper-54): weights of unknown source are not called a random
    initialisation; without a config.yaml the freeze as decided and the solved head still show; the Hub's
    model-index names no local folder and holds no NaN; a class name with a backtick, a pipe or a line break
    keeps the table one row per class (the line break escaped, as on the terminal: helper-127)."""
    from zoo.modelcard import model_card
    from zoo.push import plan_push

    classes = ["a|b", "it`s", "two\nlines"]
    run, _ = make_run(tmp_path, classes=classes)
    info = json.loads((run / "model.json").read_text())
    info.pop("source"), info.pop("source_sha256")        # a run from before they were recorded
    (run / "model.json").write_text(json.dumps(info))
    (run / "config.yaml").unlink()
    (run / "scan.json").write_text(json.dumps({"root": "/srv/acme-secret-xrays", "layout": "split", "counts": {
        "train": dict(zip(classes, [4, 5, 6])), "val": dict(zip(classes, [1, 2, 3]))}}))
    (run / "summary.json").write_text(json.dumps({"metrics": {"val_acc": float("nan"), "val_loss": 0.5},
                                                  "freeze": {"label": "head"}, "head_solver": [{"C": 1.0}],
                                                  "phases": ["head"]}))
    bundle = export_run(run, run / "export")
    readme, card = (bundle / "README.md").read_text(), plan_push(bundle, REPO).card
    for text in (readme, card):
        assert "random initialisation" not in text and "\n- unknown\n" in text
        assert "- freeze: head\n" in text and "- head_solver: lbfgs (the head solved" in text
        assert "(no readable config.yaml in the run folder)" in text
        rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
        assert rows == ["| `a\\|b` | 4 | 1 |", "| ``it`s`` | 5 | 2 |", "| `two\\nlines` | 6 | 3 |"], rows
    assert "acme-secret-xrays" not in card and "acme-secret-xrays" in readme and "nan" not in card.split("---")[1]
    # metadata of unusual shape gives a card, not a traceback
    odd = {"label_names": classes, "builder": "timm:test_resnet", "head": "mlp", "metrics": [0.5], "input_size": None,
           "mean": None, "std": None, "pretrained": False}
    for repo in (None, REPO):
        text = model_card(odd, None, None, repo=repo)
        assert "- none: trained from random initialisation" in text and "input (), " in text


@pytest.mark.parametrize("doc, said", [
    ({"accuracy": 7.5}, "holds no accuracy between 0 and 1 (accuracy: 7.5)"),
    ({"accuracy": "high"}, "holds no accuracy between 0 and 1 (accuracy: 'high')"),
    ({"accuracy": 1.0, "seen_in_training": "train"}, "evaluated the train folder this model was trained on: its "
                                                     "accuracy is not a test accuracy"),
    ("{not json", "is not a JSON object (unreadable or damaged)"),
    (None, "--test-metrics: no ")])
def test_test_metrics_that_are_no_test_accuracy_are_refused(tmp_path, doc, said):
    """QA (helper-58): an accuracy of 7.5, a text one, and `zoo eval`'s report of the training folder (which eval
    itself calls the training accuracy) were published as the card's "test accuracy"; a damaged file and a
    folder without metrics.json were called "not a zoo eval metrics.json (no 'accuracy')"."""
    from zoo.errors import UsageError
    from zoo.push import plan_push

    _, bundle = make_bundle(tmp_path)
    report = tmp_path / "report"
    report.mkdir()
    if doc is not None:
        (report / "metrics.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(UsageError, match="nothing was uploaded") as err:
        plan_push(bundle, REPO, test_metrics=report)
    assert said in str(err.value)


def _recipe_section(text: str) -> list[str]:
    return [ln for ln in text.split("## Recipe")[1].split("## Metrics")[0].splitlines() if ln]


def test_a_bundle_pushed_without_its_run_folder_keeps_its_recipe(hub, tmp_path, runner):
    """QA: `zoo push BUNDLE --dry-run` of a bundle copied out of its run folder gave "Recipe: (not recorded: no
    run folder)", though the bundle's README.md had it; `zoo export` now records the card's recipe in the bundle's
    metadata. A bundle exported before that keeps the "not recorded" line."""
    import hashlib

    from finetune.core.io import rewrite_safetensors_metadata
    from zoo.bundle.load import read_safetensors_metadata

    run, bundle = make_bundle(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "phases": ["head", "finetune"], "best_epoch": 2,
                                                  "epochs_run": 3, "freeze": {"label": "head"}}))
    bundle = export_run(run, run / "export")
    copy = shutil.copytree(bundle, tmp_path / "elsewhere" / "bundle")
    from_run, alone = push(runner, run, "--dry-run"), push(runner, copy, "--dry-run")
    assert from_run.exit_code == 0 and alone.exit_code == 0, alone.output
    recipe = _recipe_section(alone.stdout)
    assert recipe == _recipe_section(from_run.stdout) == _recipe_section((copy / "README.md").read_text())
    assert "- freeze: head (auto)" in recipe and "- best epoch: 2" in recipe and "- phases: head, finetune" in recipe
    assert not any("not recorded" in ln for ln in recipe), recipe

    data = (copy / "model.safetensors").read_bytes()    # as an earlier zoo exported it: no recipe in the header
    header = {k: v for k, v in read_safetensors_metadata(copy / "model.safetensors").items() if k != "recipe"}
    (copy / "model.safetensors").write_bytes(rewrite_safetensors_metadata(data, header))
    config = json.loads((copy / "config.json").read_text())
    config["zoo"]["weights_sha256"] = hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()
    (copy / "config.json").write_text(json.dumps(config))
    old = push(runner, copy, "--dry-run")
    assert old.exit_code == 0 and _recipe_section(old.stdout) == ["- (not recorded: no run folder)"], old.output
    assert hub.requests == []


@pytest.mark.parametrize("content, said", [("{not json", "is not valid JSON (JSONDecodeError)"),
                                           ("[1, 2]", "should hold a JSON object")])
def test_a_bundle_whose_config_json_is_damaged_is_refused_as_loading_it_refuses_it(tmp_path, content, said):
    """zoo push reads the bundle's config.json as zoo predict loads it (zoo.bundle.load._read_json; helper-90: push
    had its own copy, "is unreadable (Expecting value: line 1 column 2 (char 1))"): one line saying what is wrong
    with the file and to re-export, before anything is uploaded."""
    from zoo.errors import BundleError
    from zoo.push import plan_push

    _, bundle = make_bundle(tmp_path)
    (bundle / "config.json").write_text(content, encoding="utf-8")
    with pytest.raises(BundleError) as err:
        plan_push(bundle, "me/tiny")
    assert str(err.value) == f"{bundle / 'config.json'} {said}; re-export the bundle; nothing was uploaded"


def test_help_says_which_models_plain_timm_loads_from_the_hub(runner):
    # review (helper-138): --help promised `timm.create_model("hf-hub:...")` for every push, which fails for an
    # MLP head or a torchvision model (as the console and the card say since helper-137)
    out = " ".join(runner.invoke(cli, ["push", "--help"]).output.split())
    assert "load a linear-head timm model with" in out and "an MLP head or a torchvision model" in out
