"""``zoo finetune`` end to end on a tiny registry model (timm's test_resnet at 32 px)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from finetune.core.config import FinetuneConfig
from finetune.core.io import shell_command
from tests.conftest import forbid_model_builds, make_image_folder, register_tiny
from zoo.cache import scan_memo
from tests.zoo.test_cli_export_predict_eval import pasted
from zoo.cli import cli


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A user registry entry "tiny32" (test_resnet, 32 px) whose "pretrained" weights are a local file."""
    return register_tiny(tmp_path, monkeypatch)

FAST = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail loudly if anything tries to build or download a model."""
    forbid_model_builds(monkeypatch, "a model was built before the data was validated")


def test_a_feature_cache_that_cannot_be_written_is_a_warning_not_the_end(tmp_path, tiny):
    """QA (helper-53): with ZOO_HOME read-only (a shared, pre-pulled cache) the run ended after computing its
    features, "Operation not permitted (.../features)", leaving a half-made run folder. The cache only saves
    time: one warning, the features kept in memory, the run finishes. (A file where the cache folder goes
    stands for read-only here: root writes anywhere.)"""
    from zoo.cache import features_dir

    data = make_image_folder(tmp_path / "data", per_class=8)
    features_dir().parent.mkdir(parents=True, exist_ok=True)
    features_dir().write_text("not a folder")
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", *FAST[:-1])
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.stderr.splitlines() if "the feature cache cannot be written" in ln]
    assert len(warned) == 1 and str(features_dir()) in warned[0] and "features serve this run only" in warned[0]
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_a_registry_entry_whose_stages_leave_out_layers_is_refused_before_any_download(tmp_path, monkeypatch):
    """QA (helper-58): a user registry entry for test_resnet with stages conv1/bn1, layer1, layer2 (layer3 and
    layer4 in none) was accepted and `--freeze 1` trained layer2, the two blocks nearest the output frozen. The
    network's parameters are held to the stages (zoo.resolve.check_stages) before the weights are fetched."""
    from tests.zoo.conftest import entry_dict, write_registry

    entry = entry_dict("gappy", [{"kind": "url", "url": "http://127.0.0.1:9/never.safetensors", "sha256": "ab" * 32}])
    entry["stages"] = [["conv1", "bn1"], ["layer1"], ["layer2"]]
    monkeypatch.setenv("ZOO_REGISTRY", str(write_registry(tmp_path / "reg.yaml", [entry])))
    data = make_image_folder(tmp_path / "data", per_class=4)
    for command in (["finetune", "gappy", "--data", data, "--out", tmp_path / "run", *FAST],
                    ["lr-find", "gappy", "--data", data, "--out", tmp_path / "lr", "--device", "cpu"]):
        result = CliRunner().invoke(cli, [str(a) for a in command])
        assert result.exit_code != 0, result.output
        assert ("entry 'gappy': its stages do not fit the network: parameter 'layer3.0.conv1.weight' is in 0 "
                "stages") in result.output, result.output
        assert "never.safetensors" not in result.output     # refused before any download was tried


def test_a_batch_of_one_image_that_a_training_batchnorm_cannot_take_is_refused_before_any_download(tmp_path,
                                                                                                  monkeypatch):
    """QA (session 21, left as it was): `--batch-size 1 --bn train` where the last maps are 1x1 (test_resnet at
    32 px), or `--head mlp --batch-size 1`, ran until that layer first trained (after the head phase) and
    then stopped with "cannot train on a batch of 1 image". Refused now after the scan (the freeze decision
    needs its counts), before the weights are fetched or the run folder is made, naming the layer and what
    to change; a batch of one where no training BatchNorm is left one value (the backbone frozen, or its
    maps 2x2 at 64 px) is not refused: it goes on to the download."""
    from tests.conftest import tiny_entry, write_registry

    source = {"kind": "url", "url": "http://127.0.0.1:9/never.safetensors", "sha256": "ab" * 32}
    write_registry(tmp_path / "reg.yaml", [tiny_entry("far32", source)], monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    base = ["finetune", "far32", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--quiet", "--batch-size", "1"]
    cases = [(["--bn", "train", "--freeze", "none"],
              "layer4.0.bn1 gets one value per channel at 32x32 px under --bn train): start again with "
              "--batch-size 2 or more, or --bn eval"),
             (["--head", "mlp"], "(the MLP head's fc.bn gets one value per channel): start again with --batch-size "
                                 "2 or more, or --head linear"),
             (["--no-pretrained", "--freeze", "1"], "under --bn train): start again with --batch-size 2 or more")]
    for args, said in cases:
        result = CliRunner().invoke(cli, [str(a) for a in base + args])
        assert result.exit_code == 2, result.output
        line, = result.stderr.strip().splitlines()[-1:]
        assert line.startswith("zoo: error: a BatchNorm layer cannot train on a batch of 1 image (") and said in line, \
            result.stderr
        assert "never.safetensors" not in result.output and not (tmp_path / "run").exists()
    for args in (["--bn", "train", "--freeze", "head"], ["--bn", "train", "--freeze", "none", "--img-size", "64"]):
        result = CliRunner().invoke(cli, [str(a) for a in base + args])
        assert result.exit_code == 1 and "never.safetensors" in result.output, result.output   # the download


@pytest.mark.parametrize("layout", ["empty", "one_class", "missing"])
def test_fatal_data_problems_are_one_line_before_any_model(tmp_path, no_model_build, layout):
    data = tmp_path / "data"
    if layout == "one_class":
        make_image_folder(data, classes=("cat",))
    elif layout == "empty":
        data.mkdir()
    # a registry name: resolved before the scan (a mistyped one is refused first), built only after it
    result = invoke("finetune", "resnet18", "--data", data, *FAST)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: "), result.stderr
    assert not (tmp_path / "runs").exists()


def test_finetune_writes_the_whole_run_folder(tmp_path, tiny, monkeypatch):
    from finetune.data import files

    monkeypatch.setattr(files, "_MEMO_RACY_NS", 0)     # the images are remembered though written just now
    data = make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", "1", "--head-epochs", "1",
                    "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert err.index("data: ") < err.index("model: tiny32") < err.index("freeze: ")
    assert "freeze: head + last 1 stage" in err
    assert "best epoch" in result.stdout and "per-class accuracy: cat" in result.stdout
    # 8 images a class at val_split 0.2: round(1.6) = 2 held out, 25% (QA: the header said 20%)
    assert "(flat folder, 25% held out: 6 of 24 images, as val_split 0.2 is rounded per class" in err
    for name in ("config.yaml", "scan.json", "split.json", "bad_files.txt", "manifest.json", "metrics.csv",
                 "curves.png", "checkpoints/last.pt", "checkpoints/best.safetensors", "summary.json",
                 "model.json", "confusion.csv"):
        assert (out / name).is_file(), name
    memo = json.loads(scan_memo(data).read_text())                    # found fine: not opened by the next scan
    assert sorted(memo["files"]) == sorted(str(p) for p in Path(data).rglob("*.png"))
    info = json.loads((out / "model.json").read_text())
    assert info["model"] == "tiny32" and info["builder"] == "timm:test_resnet"
    assert info["classes"] == ["cat", "dog", "fox"] and info["classifier"] == "fc"
    assert info["source"].startswith("file:") and len(info["source_sha256"]) == 64   # digest from the cache
    assert info["head"]["kind"] == "linear" and info["data_config"]["input_size"] == [3, 32, 32]
    assert [s for s in info["stages"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["freeze"]["trainable_stages"] == 1 and summary["phases"] == ["head", "finetune"]
    assert len(summary["metrics"]["confusion"]) == 3 and summary["confusion_csv"] == "confusion.csv"
    assert _accuracies_print_in_percent(result.stdout, out)     # (not --quiet: the epoch lines too)
    try:
        import zoo.bundle  # noqa: F401
    except ImportError:
        return
    assert (out / "export" / "model.safetensors").is_file()


def _accuracies_print_in_percent(stdout: str, out: Path) -> list[str]:
    """QA: finetune printed accuracies as 0.980 where zoo eval prints 98.64%: every printed accuracy is now
    percent with two decimals (finetune.core.metrics.accuracy_text), on the screen and in log.txt, while
    metrics.csv and summary.json keep the fraction (what a script reads)."""
    pct = r"\d{1,3}\.\d\d%"
    assert re.search(rf"^best epoch \d+ \(.*\): val acc {pct}, val loss ", stdout, re.M), stdout
    assert re.search(rf"^per-class accuracy: cat {pct}, dog {pct}, fox {pct}$", stdout, re.M), stdout
    epochs = [ln for ln in (out / "log.txt").read_text().splitlines() if re.match(r"epoch \d+/", ln)]
    assert all(re.search(rf"train loss \S+ acc {pct} \| val loss \S+ acc {pct} \|", ln) for ln in epochs)
    return epochs
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and all(0.0 <= float(r["val_acc"]) <= 1.0 for r in rows)       # the data file: a fraction
    assert 0.0 <= json.loads((out / "summary.json").read_text())["metrics"]["val_acc"] <= 1.0


def test_finetune_names_its_bundle_once(tmp_path, tiny):
    """QA: `zoo finetune` ended with "exported bundle: RUN/export" on stderr and "bundle: RUN/export  (zoo predict
    ...)" on stdout, the same folder twice; the one line that says how to use it is kept (screen and log.txt)."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    said = [ln for ln in (result.stdout + result.stderr).splitlines() if str(out / "export") in ln]
    assert len(said) == 1 and said[0].startswith(f"bundle: {out / 'export'}  (zoo predict "), said
    logged = [ln for ln in (out / "log.txt").read_text(encoding="utf-8").splitlines() if str(out / "export") in ln]
    assert logged == said
    _accuracies_print_in_percent(result.stdout, out)


def test_a_run_on_data_with_a_test_split_names_the_eval_that_scores_it(tmp_path, tiny):
    """Audit (helper-120): the data line counted a test/ split ("... / 6 test images") and the run ended on the
    bundle's predict line, saying nothing of how to score those held-out images. A run whose data has a test/
    split ends with the `zoo eval` line that scores it; pasted, it evaluates those images."""
    data = make_image_folder(tmp_path / "data", per_class=4, layout="split", val_per_class=2)
    make_image_folder(data / "Test", per_class=2)          # (named as the user named it: review, helper-123)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stdout.splitlines() if ln.startswith("test: ")]
    assert len(said) == 1 and "its 6 Test/ images" in said[0], result.stdout
    assert said[0] in (out / "log.txt").read_text(encoding="utf-8").splitlines()
    argv = shlex.split(said[0][len("test: "):].split("  (")[0])
    assert argv[0] == "zoo", argv
    res = invoke(*argv[1:])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"evaluated 6 images from {data.resolve()} (its Test/ split)"), res.stdout


def test_the_bundle_and_test_lines_name_the_folders_absolutely_and_run_pasted_from_another_folder(
        tmp_path, tiny, monkeypatch):
    """Session 36: with a relative --out the run's last lines (`bundle: run/export  (zoo predict run/export IMAGE)`,
    `test: zoo eval run/export --data ...`) named the bundle as typed; pasted from another folder they named
    nothing (lr-find's, sweep's and export's next: lines name theirs absolutely since helper-153/158)."""
    data = make_image_folder(tmp_path / "data", per_class=4, layout="split", val_per_class=2)
    make_image_folder(data / "test", per_class=1)
    monkeypatch.chdir(tmp_path)
    result = invoke("finetune", tiny, "--data", "data", "--out", "run", *FAST)
    assert result.exit_code == 0, result.output
    lines = {ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in result.stdout.splitlines()
             if ln.startswith(("bundle: ", "test: "))}
    bundle = tmp_path / "run" / "export"
    assert lines["bundle"].startswith(f"{bundle}  ("), lines
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = next((data / "test").rglob("*.png"), None) or next((data / "test").rglob("*.*"))
    predict = shlex.split(lines["bundle"].split("  (")[1].rstrip(")").replace("IMAGE", str(image)))
    res = invoke(*predict[1:])
    assert res.exit_code == 0, res.output
    res = invoke(*shlex.split(lines["test"].split("  (")[0])[1:])
    assert res.exit_code == 0 and res.stdout.startswith("evaluated 3 images from "), res.output


def test_a_no_export_run_on_data_with_a_test_split_names_the_export_and_eval_that_score_it(tmp_path, tiny):
    """Session 32's leftovers (helper-127): `--no-export` on data with a test/ split ended without a word of those
    held-out images (the `test:` line named the bundle's eval, and there was no bundle). It names the export that
    writes the bundle and the eval that scores them; pasted, both run."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3, layout="split", val_per_class=1)
    make_image_folder(data / "test", classes=("cat", "dog"), per_class=1)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--no-export", *FAST)
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stdout.splitlines() if ln.startswith("test: ")]
    assert len(said) == 1 and "its 2 test/ images, held out" in said[0] and not (out / "export").exists(), said
    export, evaluate = said[0][len("test: "):].split("  (")[0].split(" && ")
    assert shlex.split(export) == ["zoo", "export", str(out)], said
    assert invoke(*shlex.split(export)[1:]).exit_code == 0
    res = invoke(*shlex.split(evaluate)[1:])
    assert res.exit_code == 0 and res.stdout.startswith("evaluated 2 images from "), res.output


def test_many_classes_print_and_write_what_reads_not_one_line_per_class(tmp_path, tiny):
    """QA: 2,000 classes of 2 images printed a line per class and a 2,000-entry per-class accuracy line,
    wrote the whole confusion matrix into summary.json, the bundle's metadata and an HTML table, and the
    header said 20% held out where 1 of 2 images (50%) was. Above FULL_MAX_CLASSES classes: the 10 classes
    with the fewest images and the 10 lowest accuracies, each with how many more; the matrix in confusion.csv."""
    from finetune.core.confusion import FULL_MAX_CLASSES, read_confusion_csv
    from zoo.bundle.load import read_safetensors_metadata

    n = FULL_MAX_CLASSES + 10
    classes = [f"k{i:02d}" for i in range(n)]
    data = make_image_folder(tmp_path / "data", classes=classes, per_class=2)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    assert err[0].endswith(f"(flat folder, 50% held out: {n} of {2 * n} images, as val_split 0.2 is rounded per "
                           f"class with at least 1 image of each class that has 2 or more; seed 0): {n} classes, "
                           f"{n} train / {n} val images")
    assert err[1:3] == ["  the 10 classes with the fewest training images:", "  k00: train 1, val 1"]
    assert err[12] == f"  ... and {n - 10} more classes, 1 training image each"
    assert len([line for line in err if line.startswith("  k")]) == 10
    [line] = [line for line in result.stdout.splitlines() if line.startswith("per-class accuracy")]
    assert line.startswith(f"per-class accuracy, the 10 lowest of {n}: ")
    assert len(line.split(" ... ")[0].split(": ", 1)[1].split(", ")) == 10
    # (one validation image a class: the 10th lowest is tied with as many hidden classes as the net got wrong)
    assert re.search(rf" \.\.\. and {n - 10} more \((\d+ of them also at (0\.00|100\.00)%; )?mean over classes ", line)
    assert str(out / "report.html") in line

    summary = json.loads((out / "summary.json").read_text())
    assert "confusion" not in summary["metrics"] and summary["confusion_csv"] == "confusion.csv"
    labels, matrix = read_confusion_csv(out / "confusion.csv")
    assert labels == classes and sum(map(sum, matrix)) == n
    metrics = json.loads(read_safetensors_metadata(out / "export" / "model.safetensors")["metrics"])
    assert "confusion" not in metrics and len(metrics["per_class"]) == n        # (12 MB of header at 2,000)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Most confused pairs" in page and "<h3>Confusion matrix</h3>" not in page


def test_config_file_then_flags(tmp_path, tiny):
    data = make_image_folder(tmp_path / "data", per_class=6)
    conf = tmp_path / "recipe.yaml"
    conf.write_text("epochs: 3\nlr: 0.05\nseed: 7\noptimizer: sgd\nfreeze: head\n")
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--config", conf, "--out", out, "--epochs", "1",
                    "--workers", "0", "--batch-size", "8", "--no-export", "--quiet")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1                       # the flag wins
    assert saved["lr"] == 0.05 and saved["seed"] == 7 and saved["optimizer"] == "sgd"   # the file
    assert saved["batch_size"] == 8 and saved["patience"] == FinetuneConfig().patience  # flag / default
    assert not (out / "export").exists()


def test_every_config_field_has_a_flag():
    result = invoke("finetune", "--help")
    assert result.exit_code == 0
    text = result.output
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    for flag in ("--config", "--resume", "--out", "--data", "--no-pretrained", "Examples:"):
        assert flag in text


def test_interrupt_then_resume(tmp_path, tiny, monkeypatch):
    _, out, result = _interrupted_run(tmp_path, monkeypatch, tiny)
    assert f"zoo finetune --resume {out}" in result.stderr
    assert not (out / "summary.json").exists()
    # no weights are needed to resume: the checkpoint holds the whole model
    (tmp_path / "tiny32.safetensors").unlink()
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet", "--no-export")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["resumed"]) == 1


@pytest.mark.parametrize("started, given", [("--no-export", "--export"), ("--export", "--no-export")])
def test_an_export_flag_given_to_a_resume_is_obeyed_and_later_resumes_follow_it(tmp_path, tiny, monkeypatch, started,
                                                                                 given):
    """Session 30's leftover (helper-115): a resume given --export or --no-export obeyed it but left model.json's
    `export` as the run was started, so the next resume without the flag (the one every `continue with` line names)
    went back to the start's choice. The flag is recorded before the resume trains: later resumes follow it."""
    import finetune.engine.epoch_steps as loop

    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=(started,))     # (the last flag given wins)
    assert json.loads((out / "model.json").read_text())["export"] is (started == "--export")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:      # the resume given the flag is cut off in its first epoch
        m.setattr(loop, "train_one_epoch", ctrl_c)
        cut = invoke("finetune", "--resume", out, given, "--workers", "0", "--quiet")
    assert cut.exit_code == 130, cut.output
    assert json.loads((out / "model.json").read_text())["export"] is (given == "--export")    # was as started
    assert _pasted(cut.stderr, "continue with") == ["zoo", "finetune", "--resume", str(out)]
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet")        # the line named: no flag
    assert result.exit_code == 0, result.output
    assert (out / "export" / "model.safetensors").is_file() is (given == "--export")


def _pasted(line: str, after: str) -> list[str]:
    """The argv a shell makes of the first `command` printed after ``after`` in ``line``."""
    import shlex

    return shlex.split(line.split(after, 1)[1].split("`")[1])


def test_printed_commands_paste_into_a_shell_under_a_path_with_a_space_and_a_dollar(tmp_path, tiny, monkeypatch):
    """Session 17: only the `next:` lines were quoted; the resume hint printed `zoo finetune --resume /x/my runs/$b`,
    which a shell splits at the space and expands at the $."""
    odd = tmp_path / "my runs" / "a $HOME b'c"
    _, out, result = _interrupted_run(tmp_path, monkeypatch, tiny, out=odd)
    argv = _pasted(result.stderr, "continue with")
    assert argv == ["zoo", "finetune", "--resume", str(odd)]
    refused = invoke("finetune", tiny, "--data", tmp_path / "data", "--out", odd)       # --out of an earlier run
    assert refused.exit_code == 2
    assert _pasted(refused.stderr, "continue it with") == argv
    resumed = invoke(*argv[1:], "--workers", "0", "--quiet", "--no-export")         # the pasted command works
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((odd / "summary.json").read_text())["epochs_run"] == 3


def test_a_flipped_bit_in_last_pt_stops_the_resume_with_one_line_and_trains_nothing(tmp_path, tiny, monkeypatch):
    from tests.finetune.test_checkpoint import flip_a_bit_in_the_largest_tensor

    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    flip_a_bit_in_the_largest_tensor(out / "checkpoints" / "last.pt")
    metrics = (out / "metrics.csv").read_bytes()
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet", "--no-export")
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("zoo: error:")]
    assert len(lines) == 1 and "last.pt is damaged" in lines[0] and f"zoo export {out}" in lines[0]
    assert "Traceback" not in result.output and (out / "metrics.csv").read_bytes() == metrics



@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_truncated_last_pt_says_what_works_not_start_again_without_resume(tmp_path, tiny, monkeypatch, keep):
    """QA session 22: a last.pt cut short (a full disk, an interrupted copy of the run folder) said "start the run
    again without --resume", a command that refuses the folder (it holds a run). It now says what the flipped-bit
    case says, and the export it suggests works."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:int(last.stat().st_size * keep)])
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet", "--no-export")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line, = [ln for ln in result.stderr.splitlines() if ln.startswith("zoo: error:")]
    over = _start_over(out, tiny, tmp_path / "data", "--no-export")     # (helper-118: was MODEL --data DIR)
    assert line == (f"zoo: error: checkpoint {last} is damaged or not a zoo checkpoint (RuntimeError), so the run "
                    f"cannot go on from it; export its best epoch (checked on its own) with `zoo export {out}`, or "
                    f"start the run over with `{over}`")
    assert invoke("export", out).exit_code == 0
    assert pasted(line, "start the run over with").exit_code == 0       # as printed: the run's own start-over
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3


def test_resuming_a_read_only_run_folder_says_make_it_writable_not_choose_another(tmp_path, tiny, monkeypatch):
    """QA session 22: `--resume RUN` of a run folder that cannot be written (a read-only mount, another user's)
    said "choose another --resume", as if another run would do. It now says to make it writable or resume a copy.
    Tests run as root, where chmod does not stop writes: os.access answers as it would for a user."""
    import os

    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    last = (out / "checkpoints" / "last.pt").read_bytes()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out and mode & os.W_OK
                        else real(p, mode, **k))
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet", "--no-export")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"zoo: error: cannot write the run folder {out}: {out} is not writable; make it "
                                     "writable, or copy the run folder where it can be written and resume the copy")
    assert (out / "checkpoints" / "last.pt").read_bytes() == last


def test_resuming_without_best_safetensors_stops_before_training_instead_of_after(tmp_path, tiny, monkeypatch):
    """QA session 22: with checkpoints/best.safetensors deleted, `--resume` trained the remaining epochs, then could
    not write the bundle ("the run saved no best checkpoint; resume or re-run"), and a resume of the now finished
    run trained nothing. It now stops before training, saying what is missing and what to do; nothing changes."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    (out / "checkpoints" / "best.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in (out / "metrics.csv", out / "checkpoints" / "last.pt")}
    result = invoke("finetune", "--resume", out, "--workers", "0", "--quiet")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"zoo: error: {out / 'checkpoints' / 'best.safetensors'} is missing, and only it holds the weights of the "
        "run's best epoch so far (epoch 1): put it back to continue the run, or start the run over with "
        f"`{_start_over(out, tiny, tmp_path / 'data', '--no-export')}`")
    assert {p.name: p.read_bytes() for p in (out / "metrics.csv", out / "checkpoints" / "last.pt")} == before
    assert pasted(result.stderr, "start the run over with").exit_code == 0     # as printed: it trains the run anew
    assert (out / "checkpoints" / "best.safetensors").is_file()

def test_resume_refuses_other_options(tmp_path, tiny, monkeypatch):
    import finetune.engine.epoch_steps as loop

    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "train_one_epoch", ctrl_c)
        invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", "head", "--no-fast-head", *FAST)
    result = invoke("finetune", "--resume", out, "--optimizer", "sgd", "--workers", "0")
    assert result.exit_code == 2 and "optimizer" in result.stderr


def test_resume_refuses_another_model_and_takes_the_runs_own(tmp_path, tiny, monkeypatch):
    """QA: `zoo finetune timm:resnet18 --resume RUN` on a run of another model went on training the run's model
    and said nothing of the one named (a changed option is refused). Another model (the same architecture
    under another name, an unknown name) is refused in one line before any training; the run's own name,
    in any case, resumes it. The new run of another model is named on the run's data (helper-118: DIR), and runs."""
    from tests.conftest import tiny_entry, write_registry

    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    metrics = (out / "metrics.csv").read_bytes()
    source = {"kind": "file", "path": str(tmp_path / f"{tiny}.safetensors"), "sha256": None, "sha256_note": "test"}
    write_registry(tmp_path / "registry.yaml", [tiny_entry(tiny, source), tiny_entry("other32", source)], monkeypatch)
    for other in ("timm:test_resnet", "no-such-model", "other32"):
        res = invoke("finetune", other, "--resume", out, "--workers", "0", "--quiet", "--no-export")
        assert res.exit_code == 2, res.output
        assert res.stderr.strip().splitlines() == [
            f"zoo: error: cannot resume {out} with model {other}: the run trains tiny32; drop the model argument "
            f"(`zoo finetune --resume {out}`) or name tiny32; another model needs a new run "
            f"(`zoo finetune {other} --data {data}`)"]
    monkeypatch.chdir(tmp_path)         # (the new run's default folder: runs/other32-TIME)
    new = pasted(res.stderr, "another model needs a new run (")     # the last one's, other32: pasted, it trains
    assert new.exit_code == 0 and (tmp_path / "runs").is_dir(), new.output
    assert (out / "metrics.csv").read_bytes() == metrics and not (out / "summary.json").exists()
    res = invoke("finetune", "TINY32", "--resume", out, "--workers", "0", "--quiet", "--no-export")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3


def test_lr_auto_uses_the_lr_finder(tmp_path, tiny, monkeypatch):
    diagnostics = pytest.importorskip("finetune.tools.diagnostics")
    seen = {}

    def fake_lr_find(model, stages, data_config, train_set, config, *, head, **kw):
        seen["head"] = head
        return diagnostics.LRFindResult(lrs=[1e-5, 1e-1], losses=[1.0, 0.5], smoothed=[1.0, 0.5],
                                        suggestion=0.0123, method="valley", valley=0.0123, steepest=None,
                                        stopped_early=False)

    monkeypatch.setattr(diagnostics, "lr_find", fake_lr_find)
    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--lr", "auto", "--freeze", "head",
                    "--no-export", *FAST)
    assert result.exit_code == 0, result.output
    assert seen["head"] == "fc" and "suggested lr 1.23e-02" in result.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == pytest.approx(0.0123)


@pytest.mark.parametrize("freeze,given,want,line", [
    ("1", None, 0.01, "lr: 0.01, pretrained layers at 0.001 (auto for freeze head + last 1 stage; pass --lr to choose)"),
    ("head", None, 0.001, None),            # the head solved by L-BFGS: no LR trains anything, none is said
    ("1", "3e-4", 0.0003, None)])
def test_the_default_lr_follows_what_trains_and_config_yaml_records_it(tmp_path, tiny, freeze, given, want, line):
    """--lr 0 (the default, auto): 1e-2 when layers are finetuned (medium digits and MNIST: docs/peers.md), 1e-3
    when the head alone trains; config.yaml holds the number the run trained at (a resume takes it from there)."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", freeze, "--no-export",
                    *(["--lr", given] if given else []), *FAST[:1], "2", *FAST[2:])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == want
    said = [text for text in result.stderr.splitlines() if text.startswith("lr:")]
    assert said == ([line] if line else []), result.stderr


def test_overfit_batches_runs_the_check_only(tmp_path, tiny, monkeypatch):
    diagnostics = pytest.importorskip("finetune.tools.diagnostics")

    def fake_check(model, stages, data_config, train_set, config, *, head, batches, **kw):
        assert batches == 2
        return diagnostics.OverfitResult(passed=False, final_loss=1.0, final_acc=0.5, steps=3,
                                         verdict="cannot even overfit 2 batches")

    monkeypatch.setattr(diagnostics, "overfit_check", fake_check)
    data = make_image_folder(tmp_path / "data", per_class=6)
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", "--overfit-batches", "2", *FAST)
    assert result.exit_code == 1 and "cannot even overfit 2 batches" in result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overfit_batches_says_how_many_batches_the_data_holds(tmp_path, tiny, monkeypatch):
    """QA: --overfit-batches 2 on 20 training images at batch size 32 said "training on 2 fixed batch(es)"; one
    batch exists, and the line says so."""
    diagnostics = pytest.importorskip("finetune.tools.diagnostics")

    def fake_check(model, stages, data_config, train_set, config, *, head, batches, **kw):
        seen["images"] = len(train_set.items)
        return diagnostics.OverfitResult(passed=True, final_loss=0.01, final_acc=1.0, steps=3, verdict="can learn")

    seen: dict = {}
    monkeypatch.setattr(diagnostics, "overfit_check", fake_check)
    data = make_image_folder(tmp_path / "data", per_class=6)
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", "--overfit-batches", "2", *FAST,
                    "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert seen["images"] < 32
    assert (f"overfit check: training on 1 fixed batch ({seen['images']} images) until memorised" in result.stderr
            and "(2 asked: the training set holds no more)" in result.stderr), result.stderr


def test_overfit_batches_with_lr_auto_checks_at_the_suggested_lr(tmp_path, tiny, monkeypatch):
    """QA: --overfit-batches returned before --lr auto ran, so the check trained at --lr's default without a
    word; it now runs the range test first (writing nothing) and overfits at its suggestion."""
    diagnostics = pytest.importorskip("finetune.tools.diagnostics")
    seen = {}

    def fake_lr_find(model, stages, data_config, train_set, config, *, head, **kw):
        seen["plot"] = kw.get("out_png")
        return diagnostics.LRFindResult(lrs=[1e-5, 1e-1], losses=[1.0, 0.5], smoothed=[1.0, 0.5],
                                        suggestion=0.0123, method="valley", valley=0.0123, steepest=None,
                                        stopped_early=False)

    def fake_check(model, stages, data_config, train_set, config, *, head, batches, **kw):
        seen["lr"] = config.lr
        return diagnostics.OverfitResult(passed=True, final_loss=0.01, final_acc=1.0, steps=3, verdict="can learn")

    monkeypatch.setattr(diagnostics, "lr_find", fake_lr_find)
    monkeypatch.setattr(diagnostics, "overfit_check", fake_check)
    data = make_image_folder(tmp_path / "data", per_class=6)
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", "--overfit-batches", "1",
                    "--lr", "auto", *FAST)
    assert result.exit_code == 0, result.output
    assert seen == {"plot": None, "lr": pytest.approx(0.0123)} and "at lr 0.0123" in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bad_lr_is_a_usage_error(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    result = invoke("finetune", "tiny32", "--data", data, "--lr", "fast")
    assert result.exit_code == 2 and "--lr" in result.output


def test_torchrun_cli_matches_single_process(tmp_path, tiny):
    """`torchrun --nproc-per-node 2 -m zoo finetune ...`: one run folder (rank 0's), same weights as 1 process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    root = Path(__file__).resolve().parents[2]
    data = make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, layout="split")
    common = ["--data", str(data), "--freeze", "none", "--head-epochs", "0", "--augment", "none", "--epochs", "1",
              "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-export"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "zoo", "finetune", tiny,
                           "--out", str(tmp_path / "ddp"), *common], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best epoch") == 1          # only rank 0 reports
    assert proc.stderr.count("freeze: ") == 1
    result = invoke("finetune", tiny, "--out", tmp_path / "single", "--quiet", *common)
    assert result.exit_code == 0, result.output
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "best.safetensors"))
    b = load_file(str(tmp_path / "single" / "checkpoints" / "best.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-4), k
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_offline_without_cached_weights_says_so(tmp_path, monkeypatch):
    """The data is fine, the weights are not cached and the network is off: the OfflineError line, exit 1."""
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    data = make_image_folder(tmp_path / "data", per_class=4)
    result = invoke("finetune", "resnet18", "--data", data, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("zoo: error: ") and "offline" in last.lower()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_freeze_deeper_than_the_model_fails_before_any_work(tiny, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(out), "--freeze", "99"])
    assert res.exit_code == 2 and "the most is" in res.output and "Traceback" not in res.output
    assert not out.exists() and "model:" not in res.output      # no run folder, no model built


@pytest.mark.parametrize("flags, expected", [
    (["--no-pretrained"], "train"),                 # random init: frozen initial statistics are an identity
    (["--no-pretrained", "--bn", "eval"], "eval"),  # an explicit --bn wins
    ([], "eval"),                                   # pretrained: keep the statistics it was trained with
    (["--bn", "train"], "train"),
])
def test_no_pretrained_implies_bn_train_unless_bn_is_given(tmp_path, monkeypatch, flags, expected):
    from zoo.jobs import finetune as job

    seen = {}

    def capture(model, data, config, **kw):
        seen["bn"], seen["pretrained"] = config.bn, kw["pretrained"]
        raise SystemExit(0)

    monkeypatch.setattr(job, "run_finetune", capture)
    data = make_image_folder(tmp_path / "data", per_class=2)
    CliRunner().invoke(cli, ["finetune", "tiny32", "--data", str(data), *flags])
    assert seen == {"bn": expected, "pretrained": "--no-pretrained" not in flags}


@pytest.mark.parametrize("command", ["finetune", "lr-find"])
def test_a_config_files_bn_wins_over_the_no_pretrained_default_even_when_it_is_eval(tmp_path, monkeypatch, command):
    """QA: `bn: eval` in --config FILE equals the default, so --no-pretrained took it for unset and trained
    the BatchNorm statistics; the file's value is the user's choice (defaults < YAML < flags)."""
    from finetune.tools import diagnostics
    from zoo.jobs import finetune as job

    seen = {}

    def capture(*args, **kw):
        seen["bn"] = next(a for a in args if hasattr(a, "bn")).bn
        raise SystemExit(0)

    monkeypatch.setattr(job, "run_finetune", capture)
    monkeypatch.setattr(diagnostics, "lr_find", capture)
    register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=2)
    config = tmp_path / "recipe.yaml"
    config.write_text("bn: eval\n")
    CliRunner().invoke(cli, [command, "tiny32", "--data", str(data), "--config", str(config), "--no-pretrained",
                             "--out", str(tmp_path / "out")])
    assert seen == {"bn": "eval"}


def test_no_pretrained_run_updates_bn_statistics_of_trained_stages_only(tmp_path, tiny):
    from safetensors.torch import load_file

    data = make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--no-pretrained", "--freeze", "2",
                    "--head-epochs", "0", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                    "--quiet", "--no-export")
    assert result.exit_code == 0, result.output
    state = load_file(out / "checkpoints" / "best.safetensors")
    means = {k: v for k, v in state.items() if k.endswith("running_mean")}
    # random init: running statistics start at mean 0; the last 2 stages (layer3, layer4) trained theirs
    trained = {k for k in means if k.startswith(("layer3.", "layer4."))}
    assert trained and len(trained) < len(means)
    for k, v in means.items():
        assert bool(v.abs().sum() > 0) == (k in trained), k


def test_img_size_trains_at_that_size_and_the_bundle_keeps_it(tmp_path, tiny):
    """--img-size 48 on a 32 px model entry: the run, its model.json and its bundle say 48, and the bundle's
    own preprocessing (what zoo predict / zoo eval use) crops 48 px."""
    from zoo.bundle import load_bundle

    data = make_image_folder(tmp_path / "data", per_class=6, size=64)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", "head", "--img-size", "48", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model.json").read_text())["data_config"]["input_size"] == [3, 48, 48]
    bundle = load_bundle(out / "export")
    assert tuple(bundle.data_config["input_size"]) == (3, 48, 48)
    from PIL import Image
    x = bundle.transform(Image.new("RGB", (100, 80)))
    assert tuple(x.shape[-2:]) == (48, 48)
    assert invoke("finetune", tiny, "--data", data, "--img-size", "8", *FAST).exit_code == 2   # below 16 px


@pytest.mark.parametrize("how", [("--freeze", "none", "--head-epochs", "0"), ("--freeze", "head")],
                         ids=["network", "cached-head"])
def test_report_uses_the_runs_own_val_predictions(tmp_path, tiny, monkeypatch, how):
    """report.html ranks its wrong validation images from fit's last evaluation (no second pass over val),
    on the network path and on the cached-feature head path alike: the probabilities are those the
    exported bundle predicts for the same images."""
    import torch

    import zoo.jobs.report
    from zoo.bundle import load_bundle
    from zoo.predict import predict_probs

    seen = {}
    real = zoo.jobs.report.make_report

    def spy(run_dir, **kw):
        seen.update(kw)
        return real(run_dir, **kw)

    monkeypatch.setattr(zoo.jobs.report, "make_report", spy)
    monkeypatch.setattr(zoo.jobs.report, "confident_mistakes", lambda *a, **k: pytest.fail("val was predicted again"))
    data = make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, *how,
                    "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    images, classes, probs = seen["val_predictions"]
    split = json.loads((out / "split.json").read_text())
    assert [c for _, c in images] == [c for _, c in split["val"]] and len(images) == len(probs) > 0
    bundle = load_bundle(out / "export", device="cpu")
    kept, again = predict_probs(bundle.model, [p for p, _ in images], bundle.data_config)
    assert classes == bundle.labels and kept == list(range(len(images)))
    assert torch.allclose(probs, again, atol=1e-5)
    assert (out / "report.html").is_file()


def test_head_only_report_shows_the_solve_not_one_point_curves(tmp_path, tiny):
    """A head solved in one step (the default on small data): summary.json keeps the solver's path (val
    loss and accuracy per L2 strength, the kept one marked) and report.html draws it instead of three
    one-point curves."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    result = invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", "head", "--epochs", "5",
                    "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    path = json.loads((out / "summary.json").read_text())["head_solver"]
    assert [p["C"] for p in path] == sorted(p["C"] for p in path) and len(path) >= 3
    assert sum(p["chosen"] for p in path) == 1
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Head solve" in page and "validation loss against log10 C" in page and "<circle" in page
    assert "Curves</h2>" not in page


@pytest.mark.parametrize("command", ["finetune", "lr-find", "sweep"])
def test_a_device_or_package_this_machine_lacks_is_refused_before_any_folder(tmp_path, tiny, monkeypatch,
                                                                              no_model_build, command):
    """`--device cuda` on a machine without one (or a mistyped device, or --tensorboard without the
    package): one line before the output folder exists, so the corrected command can use the same --out
    (QA: the run folder was left half made and refused the retry)."""
    from finetune.core.errors import ConfigError
    from finetune.core.monitor import TensorBoardLogger

    def missing():
        raise ConfigError("--tensorboard needs the tensorboard package: pip install zoo-finetune[tensorboard]")

    monkeypatch.setattr(TensorBoardLogger, "writer_class", staticmethod(missing))
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    extra = {"finetune": ["--epochs", "1"], "lr-find": ["--steps", "5"], "sweep": ["--lr", "1e-3", "--epochs", "1"]}
    cases = [["--device", "nonsense"], ["--device", "cuda:7"]]
    if command == "finetune":       # (the one command that writes TensorBoard logs)
        cases.append(["--device", "cpu", "--tensorboard"])
    for case in cases:
        res = invoke(command, tiny, "--data", data, "--out", out, "--workers", "0", *extra[command], *case)
        assert res.exit_code != 0
        line = res.stderr.strip().splitlines()[-1]
        assert line.startswith("zoo: error: ") and ("device" in line or "tensorboard" in line), line
        assert not out.exists(), (case, sorted(p.name for p in out.iterdir()))


def test_resume_with_another_out_is_refused_not_ignored(tmp_path, tiny):
    """QA: `--resume RUN --out OTHER` went on training in RUN and said nothing of OTHER."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 0
    res = invoke("finetune", "--resume", out, "--out", tmp_path / "other")
    assert res.exit_code == 2
    assert "cannot be combined with --resume: the run continues in its own folder" in res.stderr
    assert not (tmp_path / "other").exists()
    same = invoke("finetune", "--resume", out, "--out", out)      # its own folder: nothing to refuse
    assert same.exit_code == 0 and "finished after epoch 1" in same.stderr


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def _ctrl_c_in(tmp_path, tiny, monkeypatch, where: str):
    """(data, RUN, the CLI's result) of a run that Ctrl-C stopped in ``zoo.jobs.finetune``'s ``where`` (exit 130,
    no traceback: asserted)."""
    import zoo.jobs.finetune as job

    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(job, where, _ctrl_c)
        res = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert res.exit_code == 130 and "Traceback" not in res.output, res.output
    return data, out, res


@pytest.mark.parametrize("where", ["_export", "_report_html"])
def test_ctrl_c_after_training_says_the_run_is_whole_and_how_to_write_the_rest(tmp_path, tiny, monkeypatch, where):
    """QA: Ctrl-C while the bundle or report.html was written said only `zoo: interrupted`, as if the run
    were lost; every epoch is saved and two commands write what is missing."""
    data, out, res = _ctrl_c_in(tmp_path, tiny, monkeypatch, where)
    bundle = f"its bundle with `zoo export {out}` and " if where == "_export" else ""
    assert res.stderr.strip().splitlines()[-1] == (f"zoo: error: interrupted after training: {out} holds the finished "
                                                   f"run; write {bundle}its page with `zoo report {out}`")
    again = invoke("finetune", "--resume", out)      # (helper-102: the resume writes them itself)
    assert again.exit_code == 0 and "not its end: this resume trains nothing, and writes its" in again.stderr
    assert (out / "report.html").is_file() and (out / "export" / "model.safetensors").is_file()


def test_a_run_folder_inside_the_data_folder_is_refused(tmp_path, tiny, no_model_build):
    """QA: `--out DATA/run1` was accepted; the next scan of DATA (a new run, or this run's --resume once
    curves.png existed) read run1/ as a class of its own, trained on curves.png. The scan skips a folder zoo
    wrote now (helper-72), so the refusal says why it still stands (the lead, session 24: it said the old reason)."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "run1", data):
        res = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
        assert res.exit_code == 2
        assert f"--out {out} is inside the data folder {data}; zoo's files would sit among the images, and every " \
               "scan skips a folder zoo writes into: choose another --out" in res.stderr
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_resume_of_a_run_that_stopped_before_its_config_says_start_it_over(tmp_path, tiny, monkeypatch):
    """QA: a run that failed after writing scan.json and model.json but before config.yaml (e.g. a torchrun
    batch size refused by the loaders) was called a run by --out ("continue it with --resume") and no run
    folder by --resume. --resume now says there is nothing to resume and how to start over."""
    import zoo.jobs.finetune as job

    def fails(*a, **k):
        raise KeyboardInterrupt

    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(job, "fit", fails)
        assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 130
    assert (out / "model.json").is_file() and not (out / "config.yaml").exists()
    res = invoke("finetune", "--resume", out)
    assert res.exit_code == 1
    over = shell_command("zoo", "finetune", tiny, "--data", data, "--out", out, "--overwrite")   # (no config.yaml)
    assert f"{out} stopped before its training was set up (no config.yaml): there is nothing to resume; start it " \
           f"over with `{over}`" in res.stderr
    assert pasted(res.stderr, "start it over with").exit_code == 0     # model.json's model, scan.json's data


@pytest.mark.parametrize("where", ["scan_on_main", "build_for_training", "fit"])
def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_trained_and_what_to_run(tmp_path, tiny, monkeypatch,
                                                                                    where):
    """Ctrl-C (or SIGTERM) during the scan or the model build said `zoo: interrupted` alone (fuzz of helper-98,
    left), as did one during fit's set-up. Now the line says what was lost and what to run: the same command
    (the folder this command claimed is gone again), or with --overwrite where the set-up left the scan; the
    same moment of a resume says the run is as it was and how to continue it."""
    import zoo.jobs.resume as resume

    data, out, res = _ctrl_c_in(tmp_path, tiny, monkeypatch, where)
    if where == "fit":      # (after scan.json and model.json: the next command with --out calls it a run)
        want = (f"interrupted before training: nothing was trained, {out} holds its scan and no checkpoint; start "
                "it again with the same command and --overwrite")
        assert invoke("finetune", tiny, "--data", data, "--out", out, "--overwrite", *FAST).exit_code == 0
    else:
        want = "interrupted before training: nothing was trained or saved; run the same command again to start it"
        assert not out.exists()
        assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 0
    assert res.stderr.strip().splitlines()[-1] == f"zoo: error: {want}"
    (out / "summary.json").unlink()       # a run stopped before its end: the resume scans, builds and fits again
    with monkeypatch.context() as m:
        m.setattr(resume, where, _ctrl_c)
        res = invoke("finetune", "--resume", out)
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1] == (f"zoo: error: interrupted before training went on: {out} keeps "
                                                   f"its epochs as they were; continue with `zoo finetune --resume "
                                                   f"{out}`")


@pytest.mark.parametrize("left", ["scan_json", "marker_and_log"])
def test_resume_of_a_run_stopped_before_its_model_json_says_start_it_over(tmp_path, tiny, monkeypatch, left):
    """Chaos QA: a run killed after its scan.json but before model.json was called a run by --out ("continue it
    with zoo finetune --resume RUN") and "not a run folder of `zoo finetune` ... pass the folder a run wrote" by
    --resume (also when only its marker and log were written). --resume now says how to start it over."""
    import zoo.jobs.finetune as job
    from zoo.outdir import MARKER

    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    if left == "scan_json":
        def killed(*a, **k):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(job, "model_info", killed)
            assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 130
        assert (out / "scan.json").is_file() and not (out / "model.json").exists()
        assert "--resume" in invoke("finetune", tiny, "--data", data, "--out", out, *FAST).stderr
    else:
        out.mkdir()
        (out / MARKER).write_text('{"kind": "finetune"}')
        (out / "log.txt").write_text("$ zoo finetune ...\n")
    res = invoke("finetune", "--resume", out)
    assert res.exit_code == 1
    over = shell_command("zoo", "finetune", "MODEL", "--data", data if left == "scan_json" else "DIR", "--out", out,
                         "--overwrite")       # (no model.json: MODEL; scan.json, when written, names the data)
    assert f"{out} stopped before its training was set up (no config.yaml): there is nothing to resume; start it " \
           f"over with `{over}`" in res.stderr
    assert pasted(res.stderr, "start it over with", MODEL=tiny, DIR=str(data)).exit_code == 0


def test_resuming_a_finished_run_changes_none_of_its_files(tmp_path, tiny):
    """QA: `--resume RUN --epochs 5` (or with another --data) on a finished run trained nothing but rewrote
    summary.json (max_epochs 5, the head solver's record gone, metrics of the other folder) and the bundle.
    Now it says the run had finished and what to do, exit 0, and every file of the run stays as it was."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    other = make_image_folder(tmp_path / "other", per_class=5)
    out = tmp_path / "run"
    assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 0

    def files():
        return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "log.txt"}

    before = files()
    for extra in (["--epochs", "5"], ["--data", other]):
        res = invoke("finetune", "--resume", out, *extra)
        assert res.exit_code == 0, res.output
        assert f"{out} finished after epoch 1: resuming it trains nothing" in res.stderr
        assert "zoo export" in res.stderr and "best epoch" not in res.stdout
        assert files() == before


@pytest.mark.parametrize("cut", ["page", "bundle", "earlier-bundle", "staging", "page-drawn-before-the-end"])
def test_resuming_a_run_cut_off_in_its_end_writes_the_bundle_and_page_it_lacks(tmp_path, tiny, cut):
    """A kill (not Ctrl-C, which says so) while the run wrote its bundle or report.html, after summary.json: the
    resume said the run had finished and named `zoo export` / `zoo report` (fuzz of helper-98). It writes them now
    (helper-102): the bundle unless RUN/export holds the run's final export whole (byte-identical to the one the
    run wrote: absent, an earlier `zoo export` of a best epoch so far, a staging copy of a killed export), then the
    page when it is missing or older than summary.json (drawn by `zoo report` before the run ended)."""
    from zoo.bundle.export import export_run

    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    assert invoke("finetune", tiny, "--data", data, "--out", out, *FAST).exit_code == 0
    def files():        # (the folder's marker, .zoo-run.json, says when it was written)
        return {p.name: p.read_bytes() for p in (out / "export").iterdir() if p.name != ".zoo-run.json"}

    bundle = files()
    page = out / "report.html"
    if cut == "page-drawn-before-the-end":
        os.utime(page, ns=(page.stat().st_atime_ns, (out / "summary.json").stat().st_mtime_ns - 10**9))
    else:
        page.unlink()          # what a kill -9 in the export or the page leaves (the page is written last)
    if cut == "bundle":
        shutil.rmtree(out / "export")
    elif cut == "earlier-bundle":    # a `zoo export RUN` while the run trained: no summary then
        (out / "summary.json").rename(out / "summary.keep")
        export_run(out, out / "export")
        (out / "summary.keep").rename(out / "summary.json")
    elif cut == "staging":
        (out / "export" / ".zoo-staging").mkdir()
    weights = out / "export" / "model.safetensors"
    kept = weights.stat().st_ino if weights.exists() else None      # (a re-export replaces the file)
    res = invoke("finetune", "--resume", out)
    assert res.exit_code == 0, res.output
    lacks = "report.html" if cut.startswith("page") else "bundle and report.html"
    assert (f"note: this run had finished (after epoch 1), not its end: this resume trains nothing, and writes its "
            f"{lacks}") in res.stderr
    assert page.is_file() and page.stat().st_mtime_ns >= (out / "summary.json").stat().st_mtime_ns
    assert files() == bundle      # (no staging copy left)
    assert (weights.stat().st_ino == kept) == cut.startswith("page")
    assert ("bundle: " in res.stdout) == (not cut.startswith("page"))
    assert "not its end: this resume trains nothing" in (out / "log.txt").read_text(encoding="utf-8")
    again = invoke("finetune", "--resume", out)      # the end written: the run is finished
    assert f"{out} finished after epoch 1: resuming it trains nothing" in again.stderr


def _start_over(run, model, data, *flags) -> str:
    """The start-over of ``run`` that its folder records (``rerun.start_over_command``): ``model`` on ``data``, its
    config.yaml, then ``flags`` (what model.json records beyond: --no-export)."""
    return shell_command("zoo", "finetune", model, "--data", data, "--out", run, "--overwrite", "--config",
                         run / "config.yaml", *flags)


def _interrupted_run(tmp_path, monkeypatch, tiny, layout="flat", out=None, classes=("cat", "dog", "fox"), extra=()):
    """(data, RUN, the CLI's result): a 3-epoch run stopped by Ctrl-C in epoch 2, so that last.pt holds epoch 1
    (``extra``: more options, e.g. ``("--exclude", FILE)`` made before the data: ``tmp_path / "data"``)."""
    import finetune.engine.epoch_steps as loop

    data = make_image_folder(tmp_path / "data", classes=classes, per_class=6, layout=layout)
    out = out or tmp_path / "run"
    real, calls = loop.train_one_epoch, []

    def ctrl_c_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "train_one_epoch", ctrl_c_in_epoch_2)
        result = invoke("finetune", tiny, "--data", data, "--out", out, "--freeze", "head", "--no-fast-head",
                        "--epochs", "3", "--workers", "0", "--batch-size", "8", "--no-export", "--quiet", *extra)
    assert result.exit_code == 130, result.output
    return data, out, result


def test_resuming_a_run_with_excluded_files_does_not_call_them_added(tmp_path, tiny, monkeypatch):
    """QA (helper-64): every `--resume` of a run made with --exclude warned `files changed since split file
    split.json was written: 2 added, ...; new ones are split by the seed`, the data unchanged: the files the
    run left out are not in its split.json, and the scan counted them as new before they were left out again.
    The scan is told what the run left out (RUN/exclude.txt): no warning, the same files left out."""
    (tmp_path / "exclude.txt").write_text("cat/cat_000.png\ndog/dog_001.png\n")
    _, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=("--exclude", tmp_path / "exclude.txt"))
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 0, res.output
    assert "files changed since" not in res.output and "excluded 2 file(s)" in res.output, res.output
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert not {"cat/cat_000.png", "dog/dog_001.png"} & {p for side in ("train", "val") for p, _ in split[side]}



def test_the_start_over_of_a_run_with_excluded_files_leaves_them_out_again(tmp_path, tiny, monkeypatch):
    """helper-118: the start-over a line names (here: best.safetensors gone) is the run as its folder records it,
    --exclude RUN/exclude.txt included (read before --overwrite empties the folder): pasted, the files stay out."""
    (tmp_path / "exclude.txt").write_text("cat/cat_000.png\ndog/dog_001.png\n")
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=("--exclude", tmp_path / "exclude.txt"))
    (run / "checkpoints" / "best.safetensors").unlink()
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        f"`{_start_over(run, tiny, data, '--no-export', '--exclude', run / 'exclude.txt')}`"), res.output
    again = pasted(res.stderr, "start the run over with")
    assert again.exit_code == 0 and "excluded 2 file(s)" in again.output, again.output
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert not {"cat/cat_000.png", "dog/dog_001.png"} & {p for side in ("train", "val") for p, _ in split[side]}

def test_resuming_a_run_that_excluded_every_validation_image_goes_on_without_validation(tmp_path, tiny, monkeypatch):
    """Review (session 24): a run whose --exclude lists every validation image trains without validation (the
    last epoch is kept). Its --resume split the excluded files again by the seed: when none landed in val it was
    refused, `no validation images in DIR: ... use DIR/<class>/ folders with at least 2 images per class so a
    split can be made` (tests/finetune/test_data.py); here two did, and it warned `class(es) dog have no validation
    images; ... (a class folder needs 2 or more images ...)` of a class of 6, as if the others had some. The
    excluded files stay on the train side, to be left out again; the run goes on as it began, and says why."""
    from finetune.data import scan_folder

    first = scan_folder(make_image_folder(tmp_path / "data", per_class=6))     # the split the run makes
    (tmp_path / "exclude.txt").write_text("".join(f"{first.relpath(p)}\n" for p, _ in first.val.items))
    _, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=("--exclude", tmp_path / "exclude.txt"))
    assert json.loads((run / "split.json").read_text(encoding="utf-8"))["val"] == []
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 0, res.output
    assert "split.json records no validation images" in res.output and "have no validation images" not in res.output
    assert "no validation images, so the last epoch is kept" in res.output


@pytest.mark.parametrize("cls,written", [("f\nox", "f\\nox/f\\nox_000.png"), ("#fox", "./#fox/#fox_000.png")])
def test_an_excluded_file_of_an_odd_class_name_stays_out_when_the_run_is_resumed(tmp_path, tiny, monkeypatch, cls,
                                                                                  written):
    """RUN/exclude.txt is one path per line, read back as a plain list where a line beginning with # is a comment.
    QA (h72): an excluded image named with a newline (listed in a `zoo doctor` findings.csv, where CSV quoting
    keeps it whole) was written raw: two lines matching nothing. Review (h77): one of a class folder `#fox`
    (scraped datasets name folders by hashtag) was written `#fox/#fox_000.png`, read as a comment. Either way the
    resume said `files changed since split file split.json was written: 1 added` and trained on the image the user
    had excluded. exclude.txt writes the first escaped (as bad_files.txt and the console), the second `./#fox/...`
    (doctor.exclude_list_text)."""
    import csv

    image = f"{cls}/{cls}_000.png"
    with (tmp_path / "findings.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["path", "finding", "score", "other", "split", "label", "detail"],
                                  [image, "leak", "1.0", f"{cls}/{cls}_001.png", "val", cls, "x"]])
    _, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, classes=("cat", "dog", cls),
                                 extra=("--exclude", tmp_path / "findings.csv"))
    assert (run / "exclude.txt").read_text(encoding="utf-8") == written + "\n"
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 0, res.output
    assert "files changed since" not in res.output and "excluded 1 file(s)" in res.output, res.output
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert image not in {p for side in ("train", "val") for p, _ in split[side]}


@pytest.mark.parametrize("edit,code,says", [
    (lambda m: [], 2, "model.json holds [], not the JSON object `zoo finetune` writes (was the file edited?)"),
    (lambda m: None, 2, "model.json holds null, not the JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "model"}, 2, "model.json lacks 'model', which `zoo finetune` writes"),
    (lambda m: {**m, "stages": "all"}, 2, 'model.json: stages is "all", not what `zoo finetune` writes'),
    (lambda m: {**m, "builder_kwargs": [1]}, 2, "model.json: builder_kwargs is [1], not what"),
    (lambda m: {**m, "export": "false"}, 2, 'model.json: export is "false", not what'),   # (helper-113: exported)
    (lambda m: {**m, "model": "resnet18"}, 1, "last.pt holds the weights of another model than the one built to "
                                              "continue it (size mismatch for ")])
def test_a_hand_edited_model_json_stops_the_resume_in_one_line(tmp_path, tiny, monkeypatch, edit, code, says):
    """QA session 22: `--resume` of a run whose model.json was edited by hand (a list, null, a field removed or of
    another type, another model's name) was an AttributeError, KeyError or 60-line size-mismatch traceback. Now one
    line saying which field and what to do, and the checkpoint unchanged."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    info = out / "model.json"
    info.write_text(json.dumps(edit(json.loads(info.read_text()))))
    last = (out / "checkpoints" / "last.pt").read_bytes()
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == code, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("zoo: error:")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in result.stderr, result.stderr
    edited = json.loads(info.read_text())
    # the start-over as the folder records it (helper-118): model.json's model where it holds one and the line is
    # not about that model (code 1: the name in doubt stays MODEL), --no-export where it records it
    model = edited.get("model", "MODEL") if isinstance(edited, dict) and code == 2 else "MODEL"
    over = _start_over(out, model, tmp_path / "data",
                       *(["--no-export"] if isinstance(edited, dict) and edited.get("export") is False else []))
    if code == 2:
        assert errors[0].endswith(f"restore it to continue the run, or start the run over with `{over}`")
    else:   # (review: it said "resume it with the model it was trained with", which --resume cannot be given)
        assert errors[0].endswith(f"was the model named in {out / 'model.json'} changed since? Put the one the run "
                                  f"trained back to continue it, or start the run over with `{over}`")
    assert (out / "checkpoints" / "last.pt").read_bytes() == last
    assert pasted(errors[0], "start the run over with", MODEL=tiny).exit_code == 0    # as printed, MODEL filled

def test_a_hand_edited_config_yaml_is_named_on_resume_not_called_a_changed_option(tmp_path, tiny, monkeypatch):
    """QA: editing RUN/config.yaml, then `--resume RUN`, said "changed option(s) lr: drop them", as if a flag had
    been given. It now says the file differs from the checkpoint, with both values, and what to do."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    conf = out / "config.yaml"
    saved = yaml.safe_load(conf.read_text())
    conf.write_text(yaml.safe_dump({**saved, "lr": 0.123}, sort_keys=False))
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"zoo: error: {conf} differs from the options {out / 'checkpoints' / 'last.pt'} was trained with: lr: 0.123 "
        f"(the checkpoint's: {saved['lr']!r}); put the checkpoint's values back in config.yaml to continue the run, "
        f"or train with the new ones in a new run (`zoo finetune {tiny} --data {tmp_path / 'data'} --config {conf} "
        f"--no-export --out NEW`)")
    new = pasted(result.stderr, "in a new run (", NEW=str(tmp_path / "new"))    # (helper-118: was MODEL --data DIR)
    assert new.exit_code == 0, new.output
    assert yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())["lr"] == 0.123
    # written as people write learning rates (plain YAML reads `1e-4` as text; the run reads it as a number)
    conf.write_text(conf.read_text().replace("lr: 0.123", "lr: 1e-4"))
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 2 and f"{conf} differs from the options" in result.stderr, result.stderr
    # an option given to the resume itself is still called one, with its value and the run's
    conf.write_text(yaml.safe_dump(saved, sort_keys=False))
    result = invoke("finetune", "--resume", out, "--optimizer", "sgd", "--workers", "0", "--no-export")
    assert result.exit_code == 2
    assert f"changed option(s) optimizer: 'sgd' (the checkpoint's: {saved['optimizer']!r}): drop them" in result.stderr


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_resuming_on_renamed_class_folders_names_the_classes_that_differ(tmp_path, tiny, monkeypatch, layout):
    """QA: a class folder renamed mid-run, then `--resume`, said "resume with the same data folder" and listed
    the run's classes, not which differ. It now names those the data lacks and those it has besides."""
    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny, layout)
    for base in ([data / "train", data / "val"] if layout == "split" else [data]):
        (base / "dog").rename(base / "dogs")
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"zoo: error: the classes of the data differ from those {out} trained on (not in the data: dog; not "
        "trained on: dogs); resume with the data folder it trained on, its class folders named as they were "
        "(rename them back), or start a new run")


def test_many_classes_that_differ_are_named_a_few_then_how_many_more(tmp_path):
    from finetune.core.checkpoint import save_checkpoint
    from finetune.core.errors import CheckpointError
    from finetune.engine.runfolder import CHECKPOINT_FORMAT, RunFolder

    trained = [f"c{i:02d}" for i in range(9)]
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"format": CHECKPOINT_FORMAT, "classes": trained,
                                                          "epoch": 1, "config": {}})
    with pytest.raises(CheckpointError) as err:
        RunFolder(tmp_path).load_resume([c.upper() for c in trained], FinetuneConfig(epochs=3))
    assert "(not in the data: c00, c01, c02, c03, c04 and 4 more; not trained on: C00, C01, C02, C03, C04 and 4 " \
           "more)" in str(err.value)


def test_resume_without_scan_json_asks_for_the_data_folder_then_continues_and_writes_it_again(tmp_path, tiny,
                                                                                                 monkeypatch):
    """QA: a deleted RUN/scan.json made `--resume` say "start a new run" though checkpoints/last.pt was intact.
    scan.json only records the data folder (the split is split.json's, the classes the checkpoint's): without it
    the resume asks for --data, and with --data it continues and writes scan.json again."""
    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    scan = (out / "scan.json").read_text()
    split = (out / "split.json").read_bytes()
    (out / "scan.json").unlink()
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"zoo: error: {out / 'scan.json'} is missing, and only it records the data folder the run trained on; its "
        f"checkpoint is intact: continue with `zoo finetune --resume {out} --data DIR`, DIR that folder (the run's "
        "split.json and classes are kept, and scan.json written again)")
    other = make_image_folder(tmp_path / "other", classes=("ant", "bee", "cat"), per_class=4)
    result = invoke("finetune", "--resume", out, "--data", other, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 1 and "(not in the data: dog, fox; not trained on: ant, bee)" in result.stderr
    assert not (out / "scan.json").exists()      # not a record of a folder the run did not train on
    result = invoke("finetune", "--resume", out, "--data", data, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3
    assert json.loads((out / "scan.json").read_text()) == json.loads(scan)
    assert (out / "split.json").read_bytes() == split


@pytest.mark.parametrize("damage, problem", [("{\"root\": ", "is unreadable (Expecting value"),
                                            ("[1, 2]", "names no data folder"), ("{\"root\": 3}", "names no data folder")])
def test_resume_with_a_damaged_scan_json_asks_for_the_data_folder_then_continues(tmp_path, tiny, monkeypatch,
                                                                                 damage, problem):
    """A damaged (not deleted) RUN/scan.json said "start a new run" (or a KeyError traceback for JSON of
    another shape) though the checkpoint was intact: it asks for --data as a deleted one does."""
    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    scan = json.loads((out / "scan.json").read_text())
    (out / "scan.json").write_text(damage)
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 2, result.output
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"zoo: error: {out / 'scan.json'} {problem}") and f"--resume {out} --data DIR" in line
    result = invoke("finetune", "--resume", out, "--data", data, "--workers", "0", "--no-export", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scan.json").read_text()) == scan


def test_the_runs_own_export_waits_for_a_zoo_export_writing_run_export_then_writes_the_final_best(tmp_path, tiny,
                                                                                                  monkeypatch):
    """QA: `zoo export RUN` during training (its best epoch so far) still writing RUN/export when the run ended:
    zoo finetune exited 1 with 'RUN/export is in use ... choose another folder', after training, without
    report.html, and RUN/export kept the earlier epoch's bundle. The run now waits, then exports its own."""
    import os
    import socket
    import time

    import zoo.jobs.finetune as job
    import zoo.outdir as outdir

    lock_json = json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "zoo export RUN"})
    real_claim = job.claim_out

    def export_folder_held_by_another_process(path, kind, **kwargs):
        if kind == "export":
            path.mkdir(parents=True, exist_ok=True)
            (path / outdir.LOCK).write_text(lock_json)
        return real_claim(path, kind, **kwargs)

    class Clock:        # the other process finishes while the run waits
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(_seconds):
            (tmp_path / "run" / "export" / outdir.LOCK).unlink()

    monkeypatch.setattr(job, "claim_out", export_folder_held_by_another_process)
    monkeypatch.setattr(outdir, "time", Clock())
    data = make_image_folder(tmp_path / "data", per_class=6)
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    assert "run/export is in use by pid" in result.output and "waiting for it to finish" in result.output
    run = tmp_path / "run"
    assert (run / "report.html").is_file() and not (run / "export" / outdir.LOCK).exists()
    assert (run / "export" / "model.safetensors").stat().st_mtime >= (run / "checkpoints" / "best.safetensors").stat().st_mtime


def test_a_run_copied_without_its_hidden_marker_is_named_so_on_resume(tmp_path):
    """QA (sharing): a run folder copied with `cp -r RUN/* COPY/` (hidden files left out) was 'not a run folder
    of zoo finetune (no model.json/config.yaml)' to --resume, though both are there. It now says the marker is
    missing and how to put it back; with it back the folder resumes."""
    from zoo.errors import UsageError
    from zoo.outdir import MARKER, check_out

    run = tmp_path / "copy"
    run.mkdir()
    (run / "model.json").write_text("{}")
    (run / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(UsageError, match=f"not its marker {MARKER} .*put the marker back with `echo"):
        check_out(run, "finetune", resume=True)
    (run / MARKER).write_text('{"kind": "finetune"}')
    assert check_out(run, "finetune", resume=True) == "resume"


def test_a_resume_with_data_moved_elsewhere_records_the_new_folder(tmp_path, tiny, monkeypatch):
    """QA (sharing): a run copied to another machine, or its data moved, resumed with --data NEW: scan.json kept
    the old folder, so the bundle's data_folders named it, `zoo eval BUNDLE --data NEW` gave the training
    accuracy without its 'the folder this model was trained on' warning, and every later --resume needed --data
    again. scan.json now follows the folder the run goes on with."""
    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    moved = tmp_path / "moved"
    data.rename(moved)
    # (--export: the run was started with --no-export, which its resume follows since helper-112)
    result = invoke("finetune", "--resume", out, "--data", moved, "--workers", "0", "--export", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scan.json").read_text())["root"] == str(moved)
    result = invoke("eval", out / "export", "--data", moved, "--out", tmp_path / "eval")
    assert result.exit_code == 0 and "is the folder this model was trained on" in result.stderr, result.output


@pytest.mark.parametrize("flags, config, note", [
    (["--mlp-hidden", "64", "--mlp-dropout", "0.1"], "", "--mlp-dropout, --mlp-hidden shape the MLP head; this run's "
                                                         "head is linear (add --head mlp)"),
    ([], "mlp_activation: elu\n", "--mlp-activation shapes the MLP head"),        # a --config key counts too
    (["--head", "mlp", "--head-solver", "lbfgs"], "", "--head-solver lbfgs solves a linear head"),
    (["--augment", "none", "--aug-views", "3"], "", "--aug-views 3 with --augment none caches 3 identical views"),
    (["--head", "mlp", "--mlp-hidden", "64"], "", None),
    (["--mlp-hidden", "512"], "head: mlp\n", None),
    # a file that holds every option (lr-find's config.yaml, sweep's best_config.yaml, which their next: lines
    # pass as --config) chose only what differs from the defaults (QA: every such run was told --mlp-* did nothing)
    ([], yaml.safe_dump(FinetuneConfig().to_dict()), None),
    ([], yaml.safe_dump({**FinetuneConfig().to_dict(), "head": "mlp"}), None),
    ([], yaml.safe_dump({**FinetuneConfig().to_dict(), "mlp_hidden": 64}), "--mlp-hidden shapes the MLP head"),
])
def test_options_that_the_run_leaves_without_effect_are_noted(tmp_path, monkeypatch, flags, config, note):
    """QA: --mlp-* with a linear head, --head-solver lbfgs with an MLP head and --aug-views with --augment none
    were accepted without a word and changed nothing."""
    from zoo.jobs import finetune as job

    def stop(*a, **k):
        raise SystemExit(0)

    monkeypatch.setattr(job, "run_finetune", stop)
    data = make_image_folder(tmp_path / "data", per_class=2)
    extra = []
    if config:
        (tmp_path / "c.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "c.yaml")]
    res = invoke("finetune", "tiny32", "--data", data, *flags, *extra)
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
    assert (notes == []) if note is None else (len(notes) == 1 and note in notes[0]), res.stderr


@pytest.mark.parametrize("trained_in, now_in", [("NFC", "NFD"), ("NFD", "NFC")])
def test_resume_after_the_class_folders_were_renamed_into_the_other_unicode_form(tmp_path, tiny, monkeypatch,
                                                                                   trained_in, now_in):
    """QA (helper-45): copying a data folder through macOS writes its names decomposed (NFD); `--resume` then said
    the classes differ ("not in the data: élan; not trained on: élan"), and the split file saw every file of
    the class as moved. The scan reads such names as one (class_key), so the resume goes on with the names and
    split the run trained on; NFD-trained runs (older ones included) resume on NFC copies alike. élan sorts after
    fox composed, before it decomposed: the labels keep the run's order."""
    import unicodedata

    form = lambda name, f: unicodedata.normalize(f, name)        # noqa: E731
    data, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny, classes=(form("élan", trained_in), "fox"))
    trained = json.loads((out / "model.json").read_text())["classes"]
    for folder in list(data.iterdir()):                          # the class folder and its files, renamed
        for f in list(folder.iterdir()):
            f.rename(folder / form(f.name, now_in))
        folder.rename(data / form(folder.name, now_in))
    result = invoke("finetune", "--resume", out, "--workers", "0", "--no-export")
    assert result.exit_code == 0, result.output
    assert "moved to another class" not in result.output and "differ" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == trained and summary["epochs_run"] == 3


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_leaves_the_process_group_before_rank_0_exports_and_reports(tmp_path, monkeypatch, rank):
    """Under torchrun the report of a finetuned run predicts the validation set again on rank 0 (the ranks'
    shards keep no probabilities), on the CPU with --device auto: minutes for a large set, which the other
    ranks spent in the final barrier, where NCCL's watchdog ends a job after 10 minutes (ranks aborted, then
    rank 0 stopped: a finished run failed). _finish now leaves the group first; rank 0 alone goes on."""
    from finetune.core import distributed as ddp
    from zoo.jobs import finetune as job

    events: list[str] = []
    monkeypatch.setattr(ddp, "leave", lambda info: events.append("leave"))
    monkeypatch.setattr(job, "_export", lambda run_dir, say: events.append("export") or run_dir / "export")
    monkeypatch.setattr(job, "_report_html", lambda *a, **k: events.append("report"))
    info = ddp.DistInfo(rank=rank, world_size=2, local_rank=rank, enabled=True)
    job._finish(job.RunOutcome(run_dir=tmp_path), None, FinetuneConfig(), True, info, lambda _m: None)
    assert events == (["leave", "export", "report"] if rank == 0 else ["leave"])


def test_the_report_pass_of_an_auto_run_uses_the_gpu(tmp_path, monkeypatch):
    """QA (helper-48): the end-of-run report mapped --device auto to the CPU. Under torchrun (no validation
    probabilities kept: each rank had a shard) it predicted the whole validation set again on rank 0's CPU,
    minutes for a large set, with the GPU idle. auto is now the run's device (forced CUDA answers here)."""
    import torch
    from zoo.jobs import finetune as job

    asked: list[str] = []
    monkeypatch.setattr(job.zreport, "make_report", lambda run, device, **kw: asked.append(device) or run)
    job._report_html(tmp_path, FinetuneConfig(device="cpu"), lambda _m: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    job._report_html(tmp_path, FinetuneConfig(), lambda _m: None)
    assert asked == ["cpu", "cuda:0"]


def test_a_run_that_balances_its_classes_is_not_told_to_balance_them_again(tmp_path):
    """QA (session 19): with --sampler balanced the scan's imbalance warning still said "consider --class-weights
    auto or --sampler balanced", and the two together count the imbalance twice (docs/guide/data.md)."""
    from finetune.data import scan_folder
    from zoo.jobs.finetune import scan_lines

    make_image_folder(tmp_path / "d", classes=("a",), per_class=3)
    make_image_folder(tmp_path / "d", classes=("b",), per_class=15)
    report = scan_folder(tmp_path / "d")

    def warned(config):
        return [line for line in scan_lines(report, config) if "imbalanced" in line]

    assert [w.endswith("; consider --class-weights auto or --sampler balanced") for w in warned(None)] == [True]
    assert warned(FinetuneConfig()) == warned(None)
    for config, said in ((FinetuneConfig(sampler="balanced"), "--sampler balanced"),
                         (FinetuneConfig(class_weights="auto"), "--class-weights auto")):
        (line,) = warned(config)
        assert line.endswith(f"({said} weighs them alike)") and "consider" not in line


def test_a_bundle_that_cannot_be_written_after_training_says_the_run_is_saved(tmp_path, tiny, monkeypatch):
    """QA (session 19): RUN/export refused after training (here a file of the user's in it) ended the run with
    "choose a new or empty folder with --out (nothing was written ...)": the whole run was written, and a new
    --out trains it all again; report.html was not written either. Now the page is written and the error says
    the run is saved and how to write the bundle."""
    from zoo.jobs import finetune as job

    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    real_fit = job.fit

    def fit_then_a_user_file(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        (out / "export").mkdir()
        (out / "export" / "notes.txt").write_text("mine")
        return result

    monkeypatch.setattr(job, "fit", fit_then_a_user_file)
    result = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(out), "--freeze", "head",
                                      *FAST])
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("zoo: error:")]
    assert line.startswith(f"zoo: error: training finished and is saved in {out}, but its bundle was not written: ")
    assert f"`zoo export {out} --out`" in line and "with --out" not in line
    assert (out / "report.html").is_file() and (out / "export" / "notes.txt").read_text() == "mine"


def test_finetune_of_an_uncached_hf_hub_repo_fetches_its_config_and_weights(tmp_path, hub):
    """`zoo finetune hf-hub:ORG/REPO` stopped at `its config.json is not in the Hugging Face cache ... run hf
    download` while `zoo pull` and `zoo predict` of the same name fetched it: every command resolves an hf-hub:
    name through `zoo.hub.resolve_entry` now, which fetches config.json (then the run pulls the weights)."""
    from safetensors.torch import save

    from tests.zoo.conftest import resnet_state

    config = {"architecture": "test_resnet", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "classifier": "fc"}}
    hub.add_hf("someone/tiny-ft", "config.json", json.dumps(config).encode())
    hub.add_hf("someone/tiny-ft", "model.safetensors", save(resnet_state()))   # (timm's init: BatchNorm as built)
    data = make_image_folder(tmp_path / "data", per_class=4)
    res = invoke("finetune", "hf-hub:someone/tiny-ft", "--data", data, "--out", tmp_path / "run", "--no-export", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "model.json").read_text())["model"] == "hf-hub:someone/tiny-ft"
    assert hub.count("config.json") >= 1 and hub.count("model.safetensors") >= 1


def test_a_network_that_cannot_be_built_on_the_meta_device_is_not_refused_by_the_early_checks(tmp_path):
    """The stage check and the batch-of-one BatchNorm check build the network on the meta device before any
    download; torchvision's RegNets cannot be built there ("Cannot copy out of meta tensor") and `zoo finetune`
    of such an entry crashed. The stage check takes the real network instead (built for training next anyway),
    the BatchNorm check is left to fit's set-up, which makes it on the real network."""
    from finetune.core.distributed import DistInfo
    from finetune.data import scan_folder
    from tests.zoo.conftest import make_entry
    from zoo.jobs.finetune import build_for_training, check_batch_early

    entry = dataclasses.replace(make_entry("reg", builder="torchvision:regnet_x_400mf"),
                                stages=(("stem",), ("trunk_output",)))
    report = scan_folder(make_image_folder(tmp_path / "data", per_class=4), val_split=0.25)
    check_batch_early(entry, report.train, FinetuneConfig(batch_size=1, bn="train", freeze="none"), DistInfo())
    model = build_for_training(entry, pretrained=False, seed=0)
    assert model.fc.out_features == 1000


def test_an_mlp_head_alone_on_cached_features_is_not_refused_a_global_batch_of_one_image_per_process(tmp_path):
    """helper-63: under torchrun, `--head mlp --batch-size 2` on 2 processes (one image each) was refused before the
    download ("the MLP head's fc.bn gets one value per channel"), though a head alone on cached features trains on
    the global batch on every rank. It is refused still when some phase trains on the process's own image: layers
    that train after the head phase, a head trained through the network (--no-fast-head, or mixup)."""
    from finetune.core.distributed import DistInfo
    from finetune.core.errors import ConfigError
    from finetune.data import scan_folder
    from tests.zoo.conftest import make_entry
    from zoo.jobs.finetune import check_batch_early

    entry = make_entry("tiny")
    report = scan_folder(make_image_folder(tmp_path / "data", per_class=4), val_split=0.25)
    two = DistInfo(rank=0, world_size=2, enabled=True)
    head_alone = FinetuneConfig(batch_size=2, head="mlp", freeze="head")
    check_batch_early(entry, report.train, head_alone, two)
    for refused in (head_alone.replace(freeze="none"), head_alone.replace(fast_head=False),
                    head_alone.replace(mixup=0.2)):
        with pytest.raises(ConfigError, match=r"the MLP head's fc\.bn gets one value per channel\): start again "
                                              r"with --batch-size 4 or more \(2 per process\), or --head linear"):
            check_batch_early(entry, report.train, refused, two)
    with pytest.raises(ConfigError, match=r"fc\.bn gets one value per channel"):    # one process: the global batch is 1
        check_batch_early(entry, report.train, head_alone.replace(batch_size=1), DistInfo())


def test_the_early_check_builds_no_network_at_the_models_own_size_and_a_batch_of_two(tmp_path, monkeypatch):
    """helper-141: the --img-size check (helper-136) built the network on the meta device at every `zoo finetune`
    start, at the model's own size too (0.13 to 0.2 s on ResNet-50 on 2 loaded cores; docs/benchmarks.md), where
    nothing was refused: fit's set-up checks that size on the real network. It builds one for --img-size only
    (and, as before, for a batch a lone BatchNorm value could come from)."""
    from finetune.core.distributed import DistInfo
    from finetune.core.errors import ConfigError
    from finetune.data import scan_folder
    from tests.zoo.conftest import make_entry
    from zoo.jobs import finetune as jobs

    entry = make_entry("tiny")
    report = scan_folder(make_image_folder(tmp_path / "data", per_class=4), val_split=0.25)
    built = []
    monkeypatch.setattr(jobs, "meta_network", lambda *a, **k: built.append(a) or None)
    jobs.check_batch_early(entry, report.train, FinetuneConfig(batch_size=2), DistInfo())
    assert built == []
    jobs.check_batch_early(entry, report.train, FinetuneConfig(batch_size=2, img_size=48), DistInfo())
    assert len(built) == 1
    monkeypatch.undo()
    alexnet = make_entry("alex", builder="torchvision:alexnet", classifier="classifier.6")
    with pytest.raises(ConfigError, match=r"pass --img-size 63 or more"):
        jobs.check_batch_early(alexnet, report.train, FinetuneConfig(batch_size=2, img_size=32), DistInfo())


def test_the_per_class_line_lists_the_lowest_scored_classes_and_counts_those_without_validation_apart():
    """QA (session 22): 'the 10 lowest' put classes without validation images ('-') after classes at 1.00."""
    from finetune.core.confusion import FULL_MAX_CLASSES
    from zoo.cli.finetune import _per_class_line

    per_class = {f"k{i:02d}": (None if i % 2 else 1.0) for i in range(FULL_MAX_CLASSES + 10)}
    per_class["k00"] = 0.5
    scored = sum(v is not None for v in per_class.values())
    line = _per_class_line(per_class, None)
    shown = line.split(" ... ")[0].split(": ", 1)[1].split(", ")
    assert shown[0] == "k00 50.00%" and len(shown) == 10 and all(not c.endswith(" -") for c in shown)
    assert f"(20 of them also at 100.00%; {len(per_class) - scored} without validation images; mean over classes " \
        in line


def test_the_per_class_line_counts_the_hidden_classes_tied_with_the_last_shown():
    """helper-82: 1,000 classes x 20 images (4 validation images each) had 25 classes at 0.00%; the line showed
    10 of them, picked by name, and did not say that 15 more were as bad."""
    from zoo.cli.finetune import _per_class_line

    per_class = {f"k{i:03d}": (0.0 if i % 40 == 0 else 0.75) for i in range(1000)}     # 25 at 0.00%
    line = _per_class_line(per_class, None)
    shown = line.split(" ... ")[0].split(": ", 1)[1].split(", ")
    assert shown == [f"k{i:03d} 0.00%" for i in range(0, 400, 40)]
    assert " ... and 990 more (15 of them also at 0.00%; mean over classes " in line
    assert "also at" not in _per_class_line({**per_class, **{f"k{i:03d}": 0.5 for i in range(400, 1000, 40)}}, None)


def test_a_saved_config_with_workers_out_of_bounds_resumes_with_the_default_and_says_so(tmp_path, tiny, monkeypatch):
    """helper-63: config.yaml's workers above 512 (an older version's range, or edited) stopped `--resume` with
    "invalid workers=1000" until the file was edited; workers changes no maths, so the resume goes on with the
    default (or the flag given now) and one line says so."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    conf = out / "config.yaml"
    conf.write_text(conf.read_text().replace("workers: 0", "workers: 1000"))
    result = invoke("finetune", "--resume", out, "--device", "cpu", "--quiet", "--no-export")
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stderr.splitlines() if "workers=1000 is out of bounds" in ln]
    assert said == [f"{conf}: workers=1000 is out of bounds (allowed: 0 <= x <= 512 or -1); this resume uses "
                    "workers=-1 (the default)"]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3


def test_a_hand_edited_lr_beside_an_out_of_bounds_workers_is_still_named_as_an_edit_of_config_yaml(tmp_path, tiny,
                                                                                                   monkeypatch):
    """Review of helper-63's load_resume_config: the resume now reads a config.yaml holding workers: 1000, but the
    message for an edited option that changes the maths read the same file with the strict reader, failed, and
    called the edit an option given to the resume ("changed option(s) lr: drop them"), though no flag was given."""
    _, out, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    conf = out / "config.yaml"
    saved = yaml.safe_load(conf.read_text())
    conf.write_text(yaml.safe_dump({**saved, "lr": 0.123, "workers": 1000}, sort_keys=False))
    result = invoke("finetune", "--resume", out, "--no-export", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"zoo: error: {conf} differs from the options {out / 'checkpoints' / 'last.pt'} was trained with: lr: 0.123 "
        f"(the checkpoint's: {saved['lr']!r}); put the checkpoint's values back in config.yaml to continue the run, "
        f"or train with the new ones in a new run (`zoo finetune {tiny} --data {tmp_path / 'data'} --config {conf} "
        f"--no-export --out NEW`)")


def test_resume_after_a_class_folder_lost_whitespace_at_an_end(tmp_path, tiny, monkeypatch):
    """Review (h68): the class `cat ` is the folder `cat` for the scan and the resume (one class_key since
    6c21e2d); its files' sides in split.json and the run's exclude.txt followed only the NFC form of whole
    paths: every file of the class was re-split by the seed (validation images into training) and the images left
    out trained again."""
    (tmp_path / "exclude.txt").write_text("cat /cat _000.png\n")
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, classes=("cat ", "dog"),
                                    extra=("--exclude", tmp_path / "exclude.txt"))
    (data / "cat ").rename(data / "cat")
    res = invoke("finetune", "--resume", run, "--workers", "0", "--no-export")
    assert res.exit_code == 0, res.output
    assert "files changed" not in res.output and "matched no" not in res.output, res.output
    assert json.loads((run / "summary.json").read_text())["classes"] == ["cat ", "dog"]


@pytest.mark.parametrize("by", ["anyhow", "split_json"])
def test_a_flat_run_resumed_on_its_folder_reorganised_into_train_and_val_refuses_a_val_it_trained_on(
        tmp_path, tiny, monkeypatch, by):
    """QA (helper-72/78, left): a flat run (DIR/<class>/) whose folder was then reorganised into DIR/train/ +
    DIR/val/, resumed: one warning (`split file split.json was made for a flat layout but the folder is now
    split; using the folder's split`) and val/ held images the run had trained on, so early stopping and the
    guard read a flattered score. The saved split cannot be honoured per file there (the folders are the split
    now), so the resume is refused in one line when val/ holds a file split.json records as training; a folder
    reorganised by split.json itself (val/ = the run's validation images) goes on with the folders' split."""
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    saved = json.loads((run / "split.json").read_text())
    sides = {rel: "val" for rel, _ in saved["val"]} | {rel: "train" for rel, _ in saved["train"]}
    moved_to_val = 0
    for cls in ("cat", "dog", "fox"):
        for i, f in enumerate(sorted((data / cls).iterdir())):
            side = sides[f"{cls}/{f.name}"] if by == "split_json" else ("val" if i < 2 else "train")
            moved_to_val += side == "val" and sides[f"{cls}/{f.name}"] == "train"
            (data / side / cls).mkdir(parents=True, exist_ok=True)
            f.rename(data / side / cls / f.name)
        (data / cls).rmdir()
    res = invoke("finetune", "--resume", run, "--workers", "0")
    if by == "split_json":
        assert res.exit_code == 0, res.output
        assert "made for a flat layout but the folder is now split" in res.output
        return
    assert moved_to_val and res.exit_code == 1, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("zoo: error:")]
    assert len(line) == 1 and "Traceback" not in res.output, res.output
    assert (f"val/ holds {moved_to_val} image(s) the run trained on" in line[0]
            and "put the folder back as it was to continue the run, or start a new run" in line[0]), line


def test_a_flat_run_with_exclude_resumed_on_its_folder_reorganised_into_train_and_val_keeps_them_out(
        tmp_path, tiny, monkeypatch):
    """Review (helper-80) of helper-79's refusal: a flat run made with --exclude, its folder then reorganised
    into train/ + val/ by its own split.json (the one reorganisation the resume accepts), resumed: its
    exclude.txt rows (`cat/cat_000.png`) matched nothing under train/ or val/, so the images the run had left
    out (a wrong label, a duplicate) were trained on, said only as `1 listed path(s) are not training or
    validation images`. They are refused as val/'s trained images are: the run's data would change under it."""
    (tmp_path / "exclude.txt").write_text("cat/cat_000.png\n")
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=("--exclude", tmp_path / "exclude.txt"))
    saved = json.loads((run / "split.json").read_text())
    sides = {rel: "val" for rel, _ in saved["val"]} | {rel: "train" for rel, _ in saved["train"]}
    assert "cat/cat_000.png" not in sides
    for cls in ("cat", "dog", "fox"):
        for f in sorted((data / cls).iterdir()):
            side = sides.get(f"{cls}/{f.name}", "train")       # the excluded file: to train/, where it was left out
            (data / side / cls).mkdir(parents=True, exist_ok=True)
            f.rename(data / side / cls / f.name)
        (data / cls).rmdir()
    res = invoke("finetune", "--resume", run, "--workers", "0")
    line = [ln for ln in res.output.splitlines() if ln.startswith("zoo: error:")]
    assert res.exit_code == 1 and len(line) == 1 and "Traceback" not in res.output, res.output
    assert ("train/ holds 1 image(s) the run left out (its exclude.txt, e.g. train/cat/cat_000.png)" in line[0]
            and "put the folder back as it was to continue the run, or start a new run" in line[0]), line


def test_a_run_on_one_of_several_gpus_names_them_before_training(tmp_path, monkeypatch):
    """A one-process CUDA run on a machine with 2+ GPUs says which it trains on and how torchrun uses all (the line
    itself: tests/finetune/test_engine.py); the device is the run's own, checked before any work. The GPU is
    stood in for (this machine has none): training itself is not run."""
    import torch

    import zoo.jobs.finetune as job

    monkeypatch.setattr(job, "check_machine", lambda config, info: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(job, "_train_new", lambda *args: job.RunOutcome(run_dir=tmp_path / "run"))
    lines: list[str] = []
    job.run_finetune("timm:test_resnet", make_image_folder(tmp_path / "data", per_class=4),
                     FinetuneConfig(device="cuda", workers=0, quiet=True), out=tmp_path / "run", log=lines.append)
    assert lines.count("device: cuda:0, one of the 2 GPUs here; to train on all 2, start the same command as "
                       "`torchrun --nproc-per-node 2 -m zoo finetune ...`") == 1


def test_a_resumed_run_on_one_of_several_gpus_names_them_too(tmp_path, tiny, monkeypatch):
    """`zoo finetune --resume RUN` in one process on a machine with 2+ GPUs says what a new run says (the
    one-GPU-of-several note): torchrun resumes it on them all. The GPU is stood in for: training is not run."""
    import torch

    import zoo.jobs.resume as resume

    _, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    monkeypatch.setattr(resume, "resolve_device", lambda name, info: torch.device("cuda", 0), raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(resume, "_train_resumed", lambda run_dir, *args: resume.RunOutcome(run_dir=run_dir))
    lines: list[str] = []
    resume.resume_finetune(run, {}, log=lines.append)
    assert lines.count("device: cuda:0, one of the 2 GPUs here; to train on all 2, start the same command as "
                       "`torchrun --nproc-per-node 2 -m zoo finetune ...`") == 1, lines


def test_a_run_folder_and_zoo_home_named_in_latin_1_train_export_and_resume(tmp_path, tiny, monkeypatch):
    """`zoo finetune ... --out $'run\xe9'` with ZOO_HOME under a Latin-1 name too: safetensors opens only UTF-8
    paths and torch maps only UTF-8 ones, so such a run trained and then called its best checkpoint damaged
    (then cfd5f33 refused the folder up front). The weights files are read and written through Python's open()
    now: the cached weights, the feature cache, the checkpoints and the bundle all work there."""
    import os

    from zoo.bundle import load_bundle

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / os.fsdecode(b"home\xe9")))
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / os.fsdecode(b"run\xe9")
    res = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert load_bundle(out / "export").labels == ["cat", "dog", "fox"]
    assert list((tmp_path / os.fsdecode(b"home\xe9") / "features").glob("*.safetensors"))    # the cache was written
    res = invoke("finetune", "--resume", out)     # reads last.pt, which torch could not map there
    assert res.exit_code == 0 and "finished after epoch 1" in res.output, res.output


def test_a_peer_lost_before_the_run_folder_is_claimed_does_not_offer_to_resume_the_run_it_replaces(tmp_path,
                                                                                                   monkeypatch):
    """helper-100: under torchrun, another process that ended before rank 0 claimed --out (here met in the
    broadcast of the folder's name) made rank 0 say "RUN keeps its last checkpoint: continue with `zoo finetune
    --resume RUN`" wherever RUN held an earlier run: the run this command was to replace (--overwrite), never
    touched. Only a folder this command claimed is offered to resume. The process group is stood in for."""
    import torch

    import zoo.jobs.finetune as job
    from finetune.core import distributed as ddp
    from finetune.core.errors import FinetuneError

    earlier = tmp_path / "run"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.pt").write_bytes(b"an earlier run's")
    scan = job.scan_on_main
    monkeypatch.setattr(ddp, "setup", lambda device: ddp.DistInfo(rank=0, world_size=2, local_rank=0, enabled=True))
    monkeypatch.setattr(job, "scan_on_main", lambda data, config, info, **kw: scan(data, config, ddp.DistInfo()))
    monkeypatch.setattr(job, "check_machine", lambda config, info: torch.device("cpu"))
    monkeypatch.setattr(job, "check_batch_early", lambda *args: None)

    def lost(obj, info):
        raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                           "[127.0.0.1]:21181. This is typically caused by a remote worker crashing.")
    monkeypatch.setattr(ddp, "broadcast_object", lost)
    with pytest.raises(FinetuneError) as err:
        job.run_finetune("timm:test_resnet", make_image_folder(tmp_path / "data", per_class=4),
                         FinetuneConfig(device="cpu", workers=0, quiet=True), out=earlier, overwrite=True)
    said = str(err.value)
    assert said.startswith("another process of this torchrun job stopped") and "--resume" not in said
    assert said.endswith("no epoch was saved: start the run again")
    assert (earlier / "checkpoints" / "last.pt").read_bytes() == b"an earlier run's"


def test_a_no_export_run_cut_off_in_its_page_is_ended_without_a_bundle(tmp_path, tiny):
    """helper-113: a `--no-export` run killed while it wrote report.html, resumed without --export/--no-export, writes
    its page and no bundle (model.json's `export`: it said it would write a bundle before helper-112); resumed again,
    the finished run's line says it has no bundle and that `zoo export RUN` writes one. Before: "(`zoo export RUN`
    writes it again)" of a bundle it never had."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    assert invoke("finetune", tiny, "--data", data, "--out", out, "--no-export", *FAST).exit_code == 0
    (out / "report.html").unlink()
    res = invoke("finetune", "--resume", out)
    assert res.exit_code == 0, res.output
    assert "not its end: this resume trains nothing, and writes its report.html" in res.stderr, res.stderr
    assert (out / "report.html").is_file() and not (out / "export").exists() and "bundle: " not in res.stdout
    again = invoke("finetune", "--resume", out)
    assert again.exit_code == 0, again.output
    assert f"it has no bundle yet (`zoo export {out}` writes it). Start a new run" in again.stderr, again.stderr


def test_ctrl_c_caught_by_the_job_after_a_checkpoint_says_resume_never_overwrite(tmp_path, tiny, monkeypatch):
    """Ctrl-C that reached run_finetune's own handler once fit had saved checkpoints/last.pt (here: as fit returned,
    before the end's handler) was told "nothing was trained ... no checkpoint; start it again with --overwrite":
    the handler judged by where it caught the interrupt. What is on disk decides: a checkpoint is resumed."""
    import zoo.jobs.finetune as job

    real_fit = job.fit

    def fit_then_ctrl_c(*args, **kwargs):
        real_fit(*args, **kwargs)
        raise KeyboardInterrupt

    data, out = make_image_folder(tmp_path / "data", per_class=6), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(job, "fit", fit_then_ctrl_c)
        res = invoke("finetune", tiny, "--data", data, "--out", out, *FAST)
    assert res.exit_code == 130 and (out / "checkpoints" / "last.pt").is_file(), res.output
    last = res.stderr.strip().splitlines()[-1]
    assert "--overwrite" not in last and "nothing was trained" not in last, last
    assert _pasted(res.stderr, "continue with") == ["zoo", "finetune", "--resume", str(out)]
    again = invoke("finetune", "--resume", out, "--workers", "0", "--quiet")    # the line named: the run's end
    assert again.exit_code == 0 and (out / "export" / "model.safetensors").is_file(), again.output


def test_lr_auto_says_the_setups_notes_once(tmp_path, tiny):
    """Session 35's walk-through (helper-153): under --lr auto the range test's set-up said its notes (Setup.notes,
    helper-149), then the run's set-up said the same lines again after its freeze: line. The probe leaves them to
    the run that follows: each note once, after the freeze decision."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    result = invoke("finetune", tiny, "--data", data, "--out", tmp_path / "run", "--lr", "auto", "--freeze", "head",
                    "--mixup", "0.2", "--no-export", *FAST)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("note: --mixup/--cutmix mix images")]
    freeze = [i for i, line in enumerate(lines) if line.startswith("freeze: head (")]
    assert len(said) == 1 and len(freeze) == 1 and freeze[0] < said[0], result.stderr
