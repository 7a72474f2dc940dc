"""``zoo doctor``, ``zoo finetune --exclude`` and ``zoo report`` end to end on the tiny registry model."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from tests.conftest import make_image_folder, register_tiny
from tests.finetune.test_doctor import check_html, many_class_run
from zoo.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return register_tiny(tmp_path, monkeypatch)


@pytest.fixture
def leaky(tmp_path):
    data = make_image_folder(tmp_path / "data", layout="split", per_class=8, val_per_class=3)
    shutil.copyfile(data / "train" / "cat" / "cat_003.png", data / "val" / "cat" / "leak.png")
    return data


def test_doctor_reports_the_leak_and_caches_features(tmp_path, tiny, leaky):
    out = tmp_path / "doc"
    r = invoke("doctor", "--data", leaky, "--model", tiny, "--out", out, "--device", "cpu", "--workers", "0",
               "--quiet", "--min-side", "0", "--near", "1", "--near-pixels", "1")
    assert r.exit_code == 0, r.output
    assert "leak" in r.stdout and "train/cat/cat_003.png -> val/cat/leak.png" in r.stdout
    rows = list(csv.DictReader((out / "findings.csv").open(encoding="utf-8")))
    assert rows[0]["finding"] == "leak" and rows[0]["path"] == "train/cat/cat_003.png"
    check_html((out / "report.html").read_text(encoding="utf-8"))
    doc = json.loads((out / "doctor.json").read_text())
    assert doc["feature_cache_hits"] == 0
    assert len(doc["probe_fold_l2"]) == 5 and doc["probe_l2"] == doc["probe_fold_l2"][-1]   # each fold's (helper-94)
    assert set(doc["images_per_class"]) == {"train", "val"} and set(doc["images_per_class"]["train"]) == set(doc["classes"])
    assert not (out / "bad_files.txt").exists()          # nothing skipped
    # second run: the default model is the (only, so smallest) cached one, features from the cache; the
    # earlier report is replaced when asked
    r = invoke("doctor", "--data", leaky, "--out", out, "--device", "cpu", "--workers", "0", "--quiet",
               "--near-pixels", "1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "doctor.json").read_text())["feature_cache_hits"] == 2


def test_doctor_writes_only_where_the_output_folder_rules_allow(tmp_path, tiny, leaky, monkeypatch):
    """A user's folder and a run folder are refused before any work, byte for byte untouched; an earlier
    report is replaced with --overwrite, and always in the default ./doctor-<DIR name>."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("MINE")
    (mine / "findings.csv").write_text("my,own\n")
    args = ("--data", leaky, "--model", tiny, "--device", "cpu", "--workers", "0", "--quiet", "--near-pixels", "1")
    r = invoke("doctor", *args, "--out", mine)
    assert r.exit_code == 2 and "holds no zoo output" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["findings.csv", "report.html"]
    assert (mine / "report.html").read_text() == "MINE" and (mine / "findings.csv").read_text() == "my,own\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / ".zoo-run.json").write_text('{"kind": "finetune"}')
    (run / "report.html").write_text("RUN")
    r = invoke("doctor", *args, "--out", run)
    assert r.exit_code == 2 and "holds a `zoo finetune` run" in r.stderr and (run / "report.html").read_text() == "RUN"
    out = tmp_path / "doc"
    assert invoke("doctor", *args, "--out", out).exit_code == 0
    r = invoke("doctor", *args, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    # the default folder (in the working directory), written twice; a report from before the marker counts
    monkeypatch.chdir(tmp_path)
    assert invoke("doctor", *args).exit_code == 0 and invoke("doctor", *args).exit_code == 0
    (tmp_path / "doctor-data" / ".zoo-run.json").unlink()
    assert invoke("doctor", *args).exit_code == 0
    assert (tmp_path / "doctor-data" / "doctor.json").is_file()


def test_doctor_refuses_to_write_into_the_data_folder(tmp_path, tiny, leaky):
    r = invoke("doctor", "--data", leaky, "--model", tiny, "--out", leaky / "doc", "--quiet")
    assert r.exit_code == 2 and "never writes there" in r.stderr
    assert not (leaky / "doc").exists()


def test_doctor_without_a_cached_model_says_what_to_do(tmp_path, leaky):
    r = invoke("doctor", "--data", leaky, "--out", tmp_path / "doc", "--quiet")
    assert r.exit_code == 2 and "zoo pull" in r.stderr


def test_doctor_takes_an_imported_timm_reference_by_name_and_by_default(tmp_path, leaky):
    """QA: `zoo doctor DIR --model timm:test_resnet` (a reference every other command takes) failed with
    "'timm:test_resnet' is an ad-hoc reference, not a registry name; resolve it with zoo.resolve.get_entry",
    and without --model doctor said "no pretrained model is cached" with that model in the cache."""
    from tests.conftest import tiny_weights

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(tiny_weights())
    assert invoke("import", "timm:test_resnet", weights).exit_code == 0
    args = ("--data", leaky, "--device", "cpu", "--workers", "0", "--quiet", "--near-pixels", "1", "--overwrite")
    for model in (("--model", "timm:test_resnet"), ()):
        r = invoke("doctor", *args, *model, "--out", tmp_path / "doc")
        assert r.exit_code == 0, (model, r.output)
        assert json.loads((tmp_path / "doc" / "doctor.json").read_text())["model"] == "timm:test_resnet"


def test_finetune_exclude_then_report(tmp_path, tiny, leaky):
    listing = tmp_path / "drop.txt"
    listing.write_text("train/cat/cat_003.png\ntrain/dog/dog_000.png\n")
    run = tmp_path / "run"
    r = invoke("finetune", tiny, "--data", leaky, "--out", run, "--exclude", listing, "--freeze", "head",
               "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert (run / "exclude.txt").read_text().splitlines() == ["train/cat/cat_003.png", "train/dog/dog_000.png"]
    split = json.loads((run / "split.json").read_text())
    assert "train/cat/cat_003.png" not in {rel for rel, _ in split["train"]}
    assert len(split["train"]) == 22
    # the console's data summary counts what trains (QA: it showed the counts before --exclude)
    assert f"{len(split['train'])} train" in r.output, r.output
    page = (run / "report.html").read_text(encoding="utf-8")     # written by `zoo finetune` itself
    check_html(page)
    for part in ("Freeze decision", "Head solve", "Confusion matrix", "Config", "excluded"):   # head solved in one step
        assert part in page, part
    (run / "report.html").unlink()
    r = invoke("report", run, "--top", "3")
    assert r.exit_code == 0, r.output
    check_html((run / "report.html").read_text(encoding="utf-8"))


def test_finetune_exclude_of_a_folder_row_leaves_its_images_out_and_says_so(tmp_path, tiny, leaky):
    """helper-63: a findings.csv row for a folder the doctor could not read (fixed since) matched no image: the
    run trained on its images and said "1 listed path(s) are not training or validation images". The folder's
    images are left out, named in the line, and recorded one by one in exclude.txt (a --resume drops them too)."""
    sub = leaky / "train" / "dog" / "burst"
    sub.mkdir()
    for i in range(2):
        shutil.move(str(leaky / "train" / "dog" / f"dog_{i:03d}.png"), str(sub / f"dog_{i:03d}.png"))
    findings = tmp_path / "findings.csv"
    findings.write_text("path,finding,score,other,split,label,detail\n"
                        "train/dog/burst,unreadable,1.0,,,,folder cannot be read (Permission denied)\n")
    run = tmp_path / "run"
    r = invoke("finetune", tiny, "--data", leaky, "--out", run, "--exclude", findings, "--freeze", "head",
               "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--no-export")
    assert r.exit_code == 0, r.output
    assert (f"excluded 2 file(s) listed in {findings}; 2 of them in the listed folder(s) train/dog/burst: a folder "
            "listed leaves out every image in it\n") in r.stderr, r.stderr
    assert (run / "exclude.txt").read_text().splitlines() == ["train/dog/burst/dog_000.png",
                                                              "train/dog/burst/dog_001.png"]
    assert len(json.loads((run / "split.json").read_text())["train"]) == 22



def test_finetune_exclude_of_a_class_folder_row_says_the_row_empties_the_class(tmp_path, tiny, leaky):
    """Review of helper-63's folder rows: zoo doctor lists a class folder it could not read as an unreadable row
    (the class is then left out of its scan). Made readable again, that row now leaves out the whole class, and
    the refusal said "list fewer files (edit the CSV, or raise `zoo doctor --near`)": no word of the folder row,
    and --near has nothing to do with it. It names the folder row and how to train on its images."""
    findings = tmp_path / "findings.csv"
    findings.write_text("path,finding,score,other,split,label,detail\n"
                        "train/dog,unreadable,1.0,,,,folder cannot be read (Permission denied)\n"
                        "train/cat/cat_000.png,duplicate,1.0,train/cat/cat_001.png,train,cat,exact copy\n")
    r = invoke("finetune", tiny, "--data", leaky, "--out", tmp_path / "run", "--exclude", findings, "--freeze",
               "head", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet")
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (
        f"zoo: error: --exclude {findings} leaves no training image in class(es) dog: the listed folder(s) train/dog "
        "hold all of them (a listed folder leaves out every image in it; zoo doctor lists a folder it could not "
        "read); delete those rows to train on their images, or run `zoo doctor` again on the data as it is now")
    assert not (tmp_path / "run").exists()
    listed = tmp_path / "files.txt"     # files alone (no folder) that empty a class: the advice is unchanged
    listed.write_text("".join(f"train/dog/{p.name}\n" for p in (leaky / "train" / "dog").iterdir()))
    r = invoke("finetune", tiny, "--data", leaky, "--out", tmp_path / "run", "--exclude", listed, "--freeze",
               "head", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet")
    assert r.exit_code == 2 and r.stderr.strip().endswith(
        "leaves no training image in class(es) dog; list fewer files (edit the CSV, or raise `zoo doctor --near`)")

def test_doctor_then_exclude_with_a_file_name_that_is_not_utf8(tmp_path, tiny, leaky):
    """A leaked copy whose name is not UTF-8: doctor writes label_ranking.csv (it failed with a
    UnicodeEncodeError after findings.csv) and findings.csv names the file as \\xNN; --exclude with that
    findings.csv then leaves it out (the \\xNN text matched no file), and RUN/exclude.txt lists it."""
    import os

    odd = os.fsdecode(os.path.join(os.fsencode(leaky / "train" / "dog"), b"caf\xe9.png"))
    shutil.copyfile(leaky / "val" / "dog" / "dog_v000.png", odd)
    out = tmp_path / "doc"
    r = invoke("doctor", "--data", leaky, "--model", tiny, "--out", out, "--device", "cpu", "--workers", "0",
               "--quiet", "--min-side", "0", "--near", "1", "--near-pixels", "1")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "findings.csv").open(encoding="utf-8")))
    assert any(row["path"] == "train/dog/caf\\xe9.png" and row["finding"] == "leak" for row in rows)
    assert "train/dog/caf\\xe9.png" in (out / "label_ranking.csv").read_text(encoding="utf-8")
    run = tmp_path / "run"
    r = invoke("finetune", tiny, "--data", leaky, "--out", run, "--exclude", out / "findings.csv", "--freeze", "head",
               "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--no-export")
    assert r.exit_code == 0, r.output
    assert "train/dog/caf\\xe9.png" in (run / "exclude.txt").read_text(encoding="utf-8").splitlines()
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert not any("caf" in rel for rel, _ in split["train"] + split["val"])


def test_a_command_line_naming_a_folder_that_is_not_utf8_claims_its_output_folder(tmp_path, tiny, leaky, monkeypatch):
    """`zoo doctor --out $'doc-caf\\xe9'` (any command line with an argument that is not UTF-8, as a Latin-1 folder
    name is): the output folder's lock and marker record the command with that byte as \\xNN, as every other
    name that is not UTF-8 is written (before: UnicodeEncodeError writing .zoo.lock, nothing done)."""
    import os
    import sys

    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"doc-caf\xe9"))
    args = ["doctor", "--data", str(leaky), "--model", tiny, "--out", out, "--device", "cpu", "--workers", "0",
            "--quiet", "--min-side", "0"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/zoo", *args])        # what the process was started with
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    marker = json.loads((tmp_path / "doc-caf\udce9" / ".zoo-run.json").read_text(encoding="utf-8"))
    assert marker["command"].endswith("doc-caf\\xe9 --device cpu --workers 0 --quiet --min-side 0")


def test_report_of_a_many_class_run_is_small_and_points_to_the_csv(tmp_path):
    """QA: `zoo report` on a 2,000-class run rebuilt an 88 MB page in 12 s. A 300-class run (summary.json
    without the matrix, confusion.csv with it, as a run writes them) draws a page of some tens of KB from the
    CSV, and the bundle's metrics (read from summary.json) no longer carry the matrix."""
    from zoo.bundle.export import _metrics, _summary

    many_class_run(tmp_path / "run", 300)
    r = invoke("report", tmp_path / "run", "--top", "0")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    check_html(page)
    assert (tmp_path / "run" / "report.html").stat().st_size < 60_000
    assert "<td>c007</td><td>c003</td><td class=\"num\">9</td>" in page and "confusion.csv" in page
    metrics = _metrics(_summary(tmp_path / "run"))
    assert "confusion" not in metrics and len(metrics["per_class"]) == 300


def test_report_of_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "x").mkdir()
    r = invoke("report", tmp_path / "x")
    assert r.exit_code == 2 and "not a finished run folder" in r.stderr


def test_doctor_lists_the_files_its_scan_skipped_where_its_warning_says(tmp_path, tiny, leaky):
    (leaky / "train" / "cat" / "notes.jpg").write_text("not an image")
    out = tmp_path / "doc"
    r = invoke("doctor", "--data", leaky, "--model", tiny, "--out", out, "--device", "cpu", "--workers", "0",
               "--quiet", "--min-side", "0", "--near-pixels", "1")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "findings.csv").open(encoding="utf-8")))
    warning = next(row["detail"] for row in rows if row["finding"] == "scan_warning")
    assert "bad_files.txt" in warning
    assert (out / "bad_files.txt").read_text(encoding="utf-8").startswith("train/cat/notes.jpg\t")


def test_class_and_file_names_with_a_newline_stay_on_one_line_of_the_console(tmp_path, tiny):
    """QA (session 18): a class folder named ``new\\nline`` broke every doctor finding that named it into two
    console lines (finetune, eval and predict print it escaped)."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "new\nline"), layout="split", per_class=6,
                             val_per_class=2)
    shutil.copyfile(data / "train" / "new\nline" / "new\nline_003.png", data / "val" / "new\nline" / "le\nak.png")
    r = invoke("doctor", "--data", data, "--model", tiny, "--out", tmp_path / "doc", "--device", "cpu",
               "--workers", "0", "--min-side", "0")
    assert r.exit_code == 0, r.output
    leak = [ln for ln in r.stdout.splitlines() if ln.lstrip().startswith("leak ")]
    assert any(r"val/new\nline/le\nak.png" in ln for ln in leak), r.stdout
    assert "new\nline" not in r.output, r.output


def test_the_data_folder_may_be_given_as_an_argument(tmp_path, tiny, leaky):
    """QA: `zoo doctor DIR` said "Missing option '--data'"; it now takes the folder either way, and says
    what is wrong when there is none or two."""
    r = invoke("doctor")
    assert r.exit_code == 2 and "the data folder is required: zoo doctor --data DIR" in r.output
    r = invoke("doctor", leaky, "--data", tmp_path)
    assert r.exit_code == 2 and "two data folders given" in r.output
    r = invoke("doctor", leaky, "--model", tiny, "--out", tmp_path / "doc", "--workers", "0", "--device", "cpu", "--quiet",
               "--min-side", "0", "--near", "1", "--near-pixels", "1")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "doc" / "findings.csv").is_file()


def test_doctor_refuses_a_seed_torch_cannot_take(tmp_path, leaky):
    """--seed has the bound of `zoo finetune --seed` (FinetuneConfig's), checked before any work."""
    r = invoke("doctor", leaky, "--out", tmp_path / "doc", "--seed", 2**63, "--quiet")
    assert r.exit_code == 2 and r.output.startswith(f"zoo: error: invalid seed={2**63} (--seed): allowed: 0 <= x <")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "doc").exists()


@pytest.mark.parametrize("flag,value", [("--outlier-z", "nan"), ("--max-aspect", "nan"), ("--max-aspect", "inf"),
                                        ("--near", "nan"), ("--near-pixels", "nan"), ("--near", "0")])
def test_doctor_refuses_thresholds_that_would_switch_a_check_off(tmp_path, leaky, flag, value):
    """QA: nan/inf passed click's ranges and silently disabled a check; --near nan was reported as
    "near_threshold=nan and pixel_threshold=0.99", --near-pixels nan as "near_threshold=None". One line
    naming the option and the value given, before any work."""
    r = invoke("doctor", leaky, "--out", tmp_path / "doc", flag, value, "--quiet")
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"zoo: error: invalid {flag[2:].replace('-', '_')}={float(value)} ({flag}): allowed: ")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "doc").exists()


def test_doctor_val_split_help_shows_what_it_accepts(tmp_path, leaky):
    """The help said [0.0<=x<=1.0] while 0 and 1 were refused (FinetuneConfig's 0 < x < 1)."""
    text = " ".join(invoke("doctor", "--help").output.split())
    assert "--val-split FLOAT Validation fraction" in text and "[default: 0.2; 0 < x < 1]" in text
    for value in ("0", "1.0"):
        r = invoke("doctor", leaky, "--out", tmp_path / "doc", "--val-split", value, "--quiet")
        assert r.exit_code == 2 and "(--val-split): allowed: 0 < x < 1" in r.output, r.output


def test_doctor_on_one_image_per_class_says_so_and_what_to_add(tmp_path, tiny):
    """QA: `zoo doctor` on a folder of one image per class said only "no validation images in DIR: add
    DIR/val/<class>/ images, or ...": nothing about the folder, read as zoo finetune would split it. It now says
    that each class folder holds a single image and what to add, in one line (exit 1), and writes nothing."""
    data = make_image_folder(tmp_path / "data", per_class=1)
    r = invoke("doctor", data, "--model", tiny, "--out", tmp_path / "doc", "--device", "cpu", "--quiet")
    assert r.exit_code == 1, r.output
    assert r.output == (f"zoo: error: each of the 3 class folders in {data} holds a single image, so none can be held "
                        "out for validation: add images, 2 or more per class, or DIR/val/<class>/ images to validate "
                        "on\n")
    assert not (tmp_path / "doc").exists()


def test_doctor_json_is_strict_json_when_a_check_has_no_value(tmp_path, tiny):
    """Review of session 26: a folder too small for the label probe wrote `"probe_accuracy": NaN` (and now
    `probe_l2`) into doctor.json, which strict JSON parsers (JavaScript's JSON.parse, jq) refuse. It writes null, as
    summary.json and a sweep's records do (one json_safe, finetune.core.io)."""
    data = make_image_folder(tmp_path / "data", per_class=3, val_per_class=1, size=32)
    out = tmp_path / "doc"
    r = invoke("doctor", "--data", data, "--model", tiny, "--out", out, "--device", "cpu", "--workers", "0", "--quiet")
    assert r.exit_code == 0, r.output

    def refuse(constant):
        raise AssertionError(f"doctor.json holds {constant}")

    doc = json.loads((out / "doctor.json").read_text(), parse_constant=refuse)
    assert doc["probe_accuracy"] is None and doc["probe_l2"] is None and doc["probe_fold_l2"] == []
