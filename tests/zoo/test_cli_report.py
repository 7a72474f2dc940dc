"""zoo report through click's CliRunner: the options (the page itself: tests/finetune, tests/zoo/test_cli_doctor.py)."""
from __future__ import annotations

import html
import json

import pytest
from click.testing import CliRunner

from tests.conftest import make_image
from tests.zoo.test_bundle import make_run
from zoo.cli import cli
from zoo.outdir import KINDS


@pytest.mark.parametrize("device, message", [
    ("bogus", "invalid device='bogus': use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "invalid device='cuda:x'"),
])
def test_a_device_that_is_not_there_is_one_line(tmp_path, device, message):
    """QA: `zoo report RUN --device cuda` without a GPU, or --device bogus, was a RuntimeError traceback from
    torch's .to(); zoo predict/eval say it in one line."""
    run, _ = make_run(tmp_path)
    make_image(tmp_path / "data" / "cat" / "a.png", 0)       # a validation image: the report predicts it
    (run / "scan.json").write_text(json.dumps({"root": str(tmp_path / "data")}), encoding="utf-8")
    (run / "split.json").write_text(json.dumps({"val": [["cat/a.png", "cat"]]}), encoding="utf-8")
    res = CliRunner().invoke(cli, ["report", str(run), "--device", device])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("zoo: error: ") and message in lines[0]
    res = CliRunner().invoke(cli, ["report", str(run), "--device", device, "--top", "0"])   # no model: no device
    assert res.exit_code == 0 and (run / "report.html").is_file(), res.output


def test_a_report_of_a_run_that_is_still_training_says_so(tmp_path):
    """QA: `zoo report RUN` during training drew the epochs so far without a word, where zoo export notes it."""
    import socket
    import subprocess

    run, _ = make_run(tmp_path)
    trainer = subprocess.Popen(["sleep", "30"])      # a live process holding the run's lock
    try:
        (run / ".zoo.lock").write_text(json.dumps({"pid": trainer.pid, "host": socket.gethostname(),
                                                   "command": "zoo finetune", "started": "now"}))
        res = CliRunner().invoke(cli, ["report", str(run), "--top", "0"])
    finally:
        trainer.kill()
        trainer.wait()
    assert res.exit_code == 0 and (run / "report.html").is_file(), res.output
    assert f"note: {run} is still training; this page shows its epochs so far" in res.stderr


@pytest.mark.parametrize("name", ["summary.json", "scan.json", "split.json", "model.json"])
@pytest.mark.parametrize("content", ["null", "[1, 2]", '"x"'])
def test_a_run_json_file_that_holds_no_object_costs_its_section_not_the_page(tmp_path, name, content):
    """Chaos QA: a run's summary.json replaced by `null` (also a list or a string; scan.json and split.json
    too) made `zoo report RUN` an AttributeError/TypeError traceback; a damaged (unparsable) one was already
    drawn without it."""
    run, _ = make_run(tmp_path)
    make_image(tmp_path / "data" / "cat" / "a.png", 0)
    (run / "scan.json").write_text(json.dumps({"root": str(tmp_path / "data")}), encoding="utf-8")
    (run / "split.json").write_text(json.dumps({"val": [["cat/a.png", "cat"]]}), encoding="utf-8")
    (run / name).write_text(content, encoding="utf-8")
    res = CliRunner().invoke(cli, ["report", str(run), "--device", "cpu"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "<html" in (run / "report.html").read_text(encoding="utf-8").lower()


def test_run_text_files_in_no_text_encoding_cost_their_part_not_the_page_or_the_bundle(tmp_path):
    """QA (helper-53): a metrics.csv of binary bytes made `zoo report RUN` a UnicodeDecodeError traceback (an
    exclude.txt and a config.yaml in no text encoding did too, in the report, export and push): the curves say
    the file cannot be read, the card leaves out what it cannot read, the bundle is written."""
    from zoo.bundle import export_run

    run, _ = make_run(tmp_path)
    garbage = bytes(range(128, 256)) * 3
    for name in ("metrics.csv", "exclude.txt", "config.yaml"):
        (run / name).write_bytes(garbage)
    res = CliRunner().invoke(cli, ["report", str(run), "--device", "cpu"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "metrics.csv cannot be read (UnicodeDecodeError)" in (run / "report.html").read_text(encoding="utf-8")
    card = (export_run(run, tmp_path / "bundle") / "README.md").read_text(encoding="utf-8")
    assert "(no readable config.yaml in the run folder)" in card and "## Source weights" in card



def test_a_config_yaml_value_of_nested_aliases_is_shown_cut_short_by_report_and_left_out_of_the_card(tmp_path):
    """QA session 22: a run's config.yaml hand-edited to hold `lr: [*h, *h, ...]` (YAML aliases nine deep: a few
    lines that print as billions of items) took `zoo report RUN` and `zoo export RUN` minutes and 12-13 GB before
    they were killed. The page shows the value cut short; the card keeps only the values an option can have."""
    import time

    from zoo.bundle import export_run

    run, _ = make_run(tmp_path)
    lines = ["lr:", "  - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (run / "config.yaml").write_text("\n".join(lines) + "\nepochs: 3\n", encoding="utf-8")
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["report", str(run), "--top", "0"])
    assert res.exit_code == 0, res.output
    assert "<td>lr</td><td>[[&#x27;x&#x27;, &#x27;x&#x27;, &#x27;x&#x27;, &#x27;x&#x27;, ...]" in \
        (run / "report.html").read_text(encoding="utf-8")
    card = (export_run(run, tmp_path / "bundle") / "README.md").read_text(encoding="utf-8")
    assert "'x'" not in card and time.perf_counter() - start < 30

def test_a_report_html_that_zoo_did_not_write_is_not_replaced(tmp_path):
    """QA (helper-53): `zoo report DIR` on another tool's folder (a PyTorch Lightning CSVLogger's metrics.csv beside
    the user's own report.html) replaced that page. Without zoo's marker, an existing report.html is refused; a
    run folder zoo wrote is redrawn."""
    from zoo.outdir import MARKER

    folder = tmp_path / "lightning_logs"
    folder.mkdir()
    (folder / "metrics.csv").write_text("epoch,val_loss\n0,1.0\n")
    (folder / "report.html").write_text("<p>my notes</p>")
    res = CliRunner().invoke(cli, ["report", str(folder), "--top", "0"])
    assert res.exit_code != 0 and "its report.html is not zoo's to replace" in res.output, res.output
    assert (folder / "report.html").read_text() == "<p>my notes</p>"
    run, _ = make_run(tmp_path)
    (run / MARKER).write_text(json.dumps({"kind": "finetune"}))
    (run / "report.html").write_text("old page")
    res = CliRunner().invoke(cli, ["report", str(run), "--top", "0"])
    assert res.exit_code == 0 and "<html" in (run / "report.html").read_text().lower(), res.output
    (run / MARKER).unlink()       # a run from before the marker, a copy without hidden files: its own page redrawn
    for _ in range(2):
        res = CliRunner().invoke(cli, ["report", str(run), "--top", "0"])
        assert res.exit_code == 0, res.output


def test_a_run_whose_data_folder_is_gone_says_why_the_wrong_images_are_not_drawn(tmp_path):
    """QA (helper-137): `zoo report` of a run whose data folder was moved or deleted drew "None (or not
    computed)" under the most confidently wrong images, without a word, as if the model got none wrong."""
    run, _ = make_run(tmp_path)
    gone = tmp_path / "photos"          # never made: the folder the run trained on, moved away since
    (run / "scan.json").write_text(json.dumps({"root": str(gone)}), encoding="utf-8")
    (run / "split.json").write_text(json.dumps({"val": [["cat/a.png", "cat"], ["dog/b.png", "dog"]]}),
                                    encoding="utf-8")
    res = CliRunner().invoke(cli, ["report", str(run)])
    assert res.exit_code == 0, res.output
    said = f"none of the run's 2 validation images is in {gone}, where it trained (the data folder was moved or"
    assert f"report: no thumbnails of wrong predictions ({said}" in res.output
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f"Not drawn: {html.escape(said)}" in page and "None (or not computed)" not in page


def test_a_bundle_doctor_or_sweep_folder_given_to_report_is_named_with_what_to_give(tmp_path):
    """QA (helper-137): `zoo report runs/x/export` (or a doctor report, a sweep) said `is not a finished run
    folder of zoo finetune (no summary.json or metrics.csv)`, without a word of what the folder is or where its
    run or page is."""
    from zoo.bundle import export_run

    run, _ = make_run(tmp_path)
    (run / "summary.json").write_text(json.dumps({"best_epoch": 1}), encoding="utf-8")
    bundle = export_run(run, run / "export")
    doctor = tmp_path / "doc"
    doctor.mkdir()
    (doctor / ".zoo-run.json").write_text(json.dumps({"kind": "doctor"}), encoding="utf-8")
    (doctor / "doctor.json").write_text("{}", encoding="utf-8")
    for folder, said in ((bundle, f"is a `zoo export` bundle (bundle folder), not a run folder of `zoo finetune`; "
                                  f"`zoo report {run}` draws the run it was exported from; nothing was written"),
                         (doctor, f"is a `zoo doctor` report (report folder), not a run folder of `zoo finetune`; "
                                  f"its page is {doctor / 'report.html'}; nothing was written")):
        res = CliRunner().invoke(cli, ["report", str(folder), "--top", "0"])
        assert res.exit_code == 2 and res.output == f"zoo: error: {folder} {said}\n", res.output
        assert not (folder / "report.html").exists()


def test_the_page_of_a_run_stopped_before_its_end_says_so_not_that_the_curves_look_healthy(tmp_path):
    """QA (helper-137): `zoo report` of a run killed after 4 epochs drew `-` for every result and `No advice
    fired: the curves look healthy.`, while its log had said `advice (after epoch 4): underfitting ...`."""
    run, _ = make_run(tmp_path)
    (run / "summary.json").unlink()
    (run / "metrics.csv").write_text("epoch,phase,train_loss,train_acc,val_loss,val_acc,lr\n"
                                     "1,finetune,2.3,0.1,2.3,0.1,0.001\n2,finetune,2.2,0.15,2.25,0.12,0.001\n",
                                     encoding="utf-8")
    res = CliRunner().invoke(cli, ["report", str(run), "--top", "0"])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Not finished: the run stopped before its end" in page and "Not given yet" in page
    assert "the curves look healthy" not in page
    (run / "summary.json").write_text(json.dumps({"best_epoch": 2, "metrics": {"val_acc": 0.12}}), encoding="utf-8")
    assert CliRunner().invoke(cli, ["report", str(run), "--top", "0"]).exit_code == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Not finished" not in page and "the curves look healthy" in page


def test_the_page_of_a_run_still_training_says_so_not_to_resume_it(tmp_path):
    """Review (helper-138): drawn while the run trained (no summary.json yet, its lock held), the page said `it is
    still training, or it stopped before its end; zoo finetune --resume RUN continues it`: a resume the lock
    refuses. Whether the run lives is known (zoo report's console says it): the page says which."""
    import socket
    import subprocess

    run, _ = make_run(tmp_path)
    (run / "summary.json").unlink()
    (run / "metrics.csv").write_text("epoch,phase,train_loss,train_acc,val_loss,val_acc,lr\n"
                                     "1,finetune,2.3,0.1,2.3,0.1,0.001\n", encoding="utf-8")
    trainer = subprocess.Popen(["sleep", "600"])     # a live process holding the run's lock (killed below)
    try:
        (run / ".zoo.lock").write_text(json.dumps({"pid": trainer.pid, "host": socket.gethostname(),
                                                   "command": "zoo finetune", "started": "now"}))
        assert CliRunner().invoke(cli, ["report", str(run), "--top", "0"]).exit_code == 0
    finally:
        trainer.kill()
        trainer.wait()
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Not finished: the run is still training" in page and "--resume" not in page
    assert CliRunner().invoke(cli, ["report", str(run), "--top", "0"]).exit_code == 0     # its process gone
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Not finished: the run stopped before its end" in page and "still training" not in page
    assert "zoo finetune --resume RUN</code> continues it" in page


@pytest.mark.parametrize("export", [True, False], ids=["bundle", "no-export"])
def test_report_reads_the_runs_validation_predictions_while_they_are_the_current_weights(tmp_path, monkeypatch,
                                                                                         export):
    """helper-150: `zoo report RUN` loaded the bundle and predicted every validation image again (44.5 s on 500
    images at 224 px) to redraw what the run drew at its end. The run keeps them (RUN/val_predictions.json);
    report reads them (no prediction) while they are the current weights' and the same images, and the page's
    mistakes are those predicting again finds; a missing, damaged or other weights' file: predicted again."""
    import zoo.jobs.report as zr
    from tests.conftest import make_image_folder, register_tiny

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=8, layout="split", val_per_class=3)
    (data / "val" / "cat").rename(data / "val" / "x")       # validation images labelled wrong: mistakes to rank
    (data / "val" / "dog").rename(data / "val" / "cat")
    (data / "val" / "x").rename(data / "val" / "dog")
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(run), "--epochs", "1",
                                   "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet",
                                   *([] if export else ["--no-export"])], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert zr.VAL_PREDICTIONS in KINDS["finetune"].files and (run / zr.VAL_PREDICTIONS).is_file()
    calls = []
    real = zr.predict_probs
    monkeypatch.setattr(zr, "predict_probs", lambda *a, **k: calls.append(1) or real(*a, **k))

    def report() -> list:
        res = CliRunner().invoke(cli, ["report", str(run), "--top", "100"])
        assert res.exit_code == 0 and (run / "report.html").is_file(), res.output
        return zr.confident_mistakes(run, top=100)

    saved = report()
    assert calls == [] and (run / zr.VAL_PREDICTIONS).is_file()      # read, not predicted
    text = (run / zr.VAL_PREDICTIONS).read_text(encoding="utf-8")
    (run / zr.VAL_PREDICTIONS).unlink()                 # an old run folder, from before the file
    again = report()
    assert len(calls) == 2 and len(again) > 0
    assert [(m["path"], m["true"], m["predicted"]) for m in saved] == [(m["path"], m["true"], m["predicted"])
                                                                        for m in again]
    assert all(abs(a["prob"] - b["prob"]) < 1e-4 for a, b in zip(saved, again))
    for changed in ("{", text.replace('"best": "', '"best": "0')):       # damaged; of other weights
        (run / zr.VAL_PREDICTIONS).write_text(changed, encoding="utf-8")
        calls.clear()
        assert report() and len(calls) == 2
    (run / zr.VAL_PREDICTIONS).write_text(text, encoding="utf-8")
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    (run / "split.json").write_text(json.dumps({**split, "val": split["val"][::-1]}), encoding="utf-8")
    calls.clear()
    assert report() and len(calls) == 2      # other images (here: another order): predicted again


def test_the_pages_wrong_images_show_their_probability_as_every_command_does(tmp_path):
    """Session 35's walk-through (helper-153): report.html captioned a wrong image `(1.00)` for 0.99996 (and for
    0.999932, where predict printed 99.99%). The caption shows finetune.core.metrics.probability_text."""
    import re

    from finetune.core.metrics import probability_text
    from finetune.tools.pages import run_report_html

    run, _ = make_run(tmp_path)
    mistakes = [{"path": str(make_image(tmp_path / "v" / f"{i}.png", i)), "true": "cat", "predicted": "fox", "prob": p}
                for i, p in enumerate((0.99996, 0.999932, 0.5))]
    shown = [html.unescape(t) for t in re.findall(r"<b>fox</b> \(([^)]*)\), true cat", run_report_html(run, mistakes))]
    assert shown == [probability_text(m["prob"]) for m in mistakes] == [">99.99%", "99.99%", "50.00%"]


@pytest.mark.parametrize("how", [("--freeze", "none", "--head-epochs", "0"), ("--freeze", "head")],
                         ids=["network", "cached-head"])
def test_report_reads_the_runs_validation_predictions_when_an_image_failed_to_decode(tmp_path, monkeypatch, how):
    """helper-155: a validation image that passed the scan but failed to decode during the run (dropped, with
    a warning and a line in bad_files.txt) left no RUN/val_predictions.json, and `zoo report` predicted every
    image again. The run keeps the other images' predictions and that one's as not predicted (null); report
    reads them, and draws the page predicting again draws (the image is in no thumbnail, as before)."""
    import re

    import zoo.jobs.report as zr
    from tests.conftest import make_image_folder, register_tiny
    from tests.test_reliability_data import _passes_scan_fails_decode

    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=8, layout="split", val_per_class=3)
    (data / "val" / "cat").rename(data / "val" / "x")       # validation images labelled wrong: mistakes to rank
    (data / "val" / "dog").rename(data / "val" / "cat")
    (data / "val" / "x").rename(data / "val" / "dog")
    bad = _passes_scan_fails_decode(data / "val" / "dog" / "dog_v100.jpg")
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(run), *how, "--epochs", "2",
                                   "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "dog_v100.jpg" in res.stderr and "failed to load" in res.stderr
    assert (run / zr.VAL_PREDICTIONS).is_file(), res.output
    saved = json.loads((run / zr.VAL_PREDICTIONS).read_text(encoding="utf-8"))
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert len(saved["images"]) == len(split["val"]) == 10
    missed = [path for (path, _), pred in zip(saved["images"], saved["predicted"]) if pred is None]
    assert missed == [str(bad)] and [p is None for p in saved["prob"]] == [p is None for p in saved["predicted"]]
    calls = []
    real = zr.predict_probs
    monkeypatch.setattr(zr, "predict_probs", lambda *a, **k: calls.append(1) or real(*a, **k))

    def page() -> str:
        res = CliRunner().invoke(cli, ["report", str(run), "--top", "100"])
        assert res.exit_code == 0, res.output
        # (the probabilities are the run's against the bundle's: the same to ~1e-6, not to the last digit)
        return re.sub(r"\((?:&gt;|&lt;)?\d+\.\d\d%\)", "(p)", (run / "report.html").read_text(encoding="utf-8"))

    read = page()
    assert calls == [] and (run / zr.VAL_PREDICTIONS).is_file()      # read, not predicted
    assert "dog_v100" not in read.split("Most confidently wrong")[1] and "<figure>" in read
    (run / zr.VAL_PREDICTIONS).unlink()
    assert page() == read and calls        # predicted again: the same page


def _top1_row_by_row(probs):
    """``zoo.jobs.report._top1`` as it was before helper-161 made it one argmax over the table: row by row."""
    import math

    preds = [int(p.argmax()) for p in probs]
    prob = [float(p[i]) for p, i in zip(probs, preds)]
    return [None if math.isnan(x) else i for i, x in zip(preds, prob)], [None if math.isnan(x) else x for x in prob]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_top1_is_the_row_by_rows_answer_with_ties_and_rows_of_nan(kind):
    """helper-161: ``_top1`` takes one argmax over the [n, C] table (a loop of n argmaxes took seconds at 50,000
    images). Each row's first most probable class and its probability as a Python float, None and None for a row
    of NaN (an image the run could not read), as the loop gave: on hand-made rows and on random ones with ties."""
    import numpy as np
    import torch

    from zoo.jobs.report import _top1

    nan = float("nan")
    rows = [[0.1, 0.7, 0.2], [0.4, 0.2, 0.4], [nan, nan, nan], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    rng = np.random.default_rng(0)
    table = rng.integers(0, 4, size=(200, 7)).astype(np.float32) / 4          # (many ties: quarters of 4 values)
    table[rng.choice(200, 20, replace=False)] = nan
    for probs in (np.array(rows, dtype=np.float32), table, np.zeros((0, 3), dtype=np.float32)):
        probs = torch.from_numpy(probs) if kind == "torch" else probs
        preds, prob = _top1(probs)
        assert (preds, prob) == _top1_row_by_row(probs)
        assert all(type(i) is int for i in preds if i is not None) and all(type(p) is float for p in prob
                                                                           if p is not None)
    preds, prob = _top1(torch.tensor(rows))
    assert preds == [1, 0, None, 2, 0] and prob == [float(torch.tensor(x)) if x == x else None
                                                     for x in (0.7, 0.4, nan, 0.5, 1 / 3)]
