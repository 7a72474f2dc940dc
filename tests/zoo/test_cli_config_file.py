"""A ``--config`` file takes every option of the command's line, the run-level ones too (model, data, out, ...):
flags and arguments typed win over the file, the file over the defaults; its paths are relative to the current
directory; options that act on a run folder or delete one (resume, overwrite) and config itself are refused."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from finetune.core.config import FinetuneConfig, read_config_file, save_config
from finetune.core.errors import ConfigError
from tests.conftest import make_image_folder, register_tiny
from zoo.cli import cli

FAST = {"epochs": 1, "batch_size": 8, "workers": 0, "device": "cpu", "quiet": True}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def recipe(path: Path, **values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    return path


@pytest.fixture
def finetune_calls(monkeypatch):
    """zoo finetune's job replaced by a recorder of what it was given (nothing trained)."""
    from zoo.jobs import finetune as job

    calls = []

    def record(model, data, config, **kwargs):
        calls.append(SimpleNamespace(model=model, data=data, config=config, **kwargs))
        return SimpleNamespace(result=None, overfit=None, export_dir=None)

    monkeypatch.setattr(job, "run_finetune", record)
    return calls


def test_a_config_file_naming_model_data_and_out_runs_with_no_arguments(tmp_path, monkeypatch):
    """Task 134: `export: false`, `data:`, `out:`, `model:` in a --config file were "unknown option(s)"; a recipe
    holds the whole run: `zoo finetune --config recipe.yaml` with nothing else trains it, and writes no bundle."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=8)
    cfg = recipe(tmp_path / "recipe.yaml", model=tiny, data=data, out=tmp_path / "run", export=False,
                 pretrained=True, **FAST)
    result = invoke("finetune", "--config", cfg)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert (run / "summary.json").is_file() and not (run / "export").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 1
    # the run's saved config.yaml (the options only) still passes as --config, with MODEL and --data typed
    again = invoke("finetune", tiny, "--data", data, "--config", run / "config.yaml", "--out", tmp_path / "run2",
                   "--no-export")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run2" / "summary.json").is_file()


def test_a_flag_or_argument_typed_overrides_each_run_level_key_of_the_file(tmp_path, finetune_calls):
    data, other = make_image_folder(tmp_path / "data", per_class=2), make_image_folder(tmp_path / "other", per_class=2)
    exclude, other_exclude = tmp_path / "ex.txt", tmp_path / "ex2.txt"
    exclude.write_text("")
    other_exclude.write_text("")
    cfg = recipe(tmp_path / "recipe.yaml", model="tiny32", data=data, out=tmp_path / "run", pretrained=True,
                 export=True, exclude=exclude, fc_dropout=0.2, lr=0.01)
    assert invoke("finetune", "--config", cfg).exit_code == 0
    got = finetune_calls[-1]
    assert (got.model, got.data, got.out, got.pretrained, got.export, got.exclude, got.fc_dropout, got.config.lr) == (
        "tiny32", str(data), str(tmp_path / "run"), True, True, str(exclude), 0.2, 0.01)
    result = invoke("finetune", "other32", "--config", cfg, "--data", other, "--out", tmp_path / "o", "--no-pretrained",
                    "--no-export", "--exclude", other_exclude, "--fc-dropout", "0.3", "--lr", "0.02")
    assert result.exit_code == 0, result.output
    got = finetune_calls[-1]
    assert (got.model, got.data, got.out, got.pretrained, got.export, got.exclude, got.fc_dropout, got.config.lr) == (
        "other32", str(other), str(tmp_path / "o"), False, False, str(other_exclude), 0.3, 0.02)
    assert got.config.bn == "train"      # --no-pretrained typed: BatchNorm follows it, as without a file


@pytest.mark.parametrize("key, value, says", [
    ("resume", "runs/x", "resume: continuing acts on the folder that holds the run: type --resume"),
    ("overwrite", True, "overwrite: starting over deletes an earlier run's files: type --overwrite"),
    ("config", "other.yaml", "config: a config file cannot name another: give that file as --config")])
def test_resume_overwrite_or_config_in_a_file_is_refused_in_one_line_before_any_folder(tmp_path, finetune_calls,
                                                                                         key, value, says):
    data = make_image_folder(tmp_path / "data", per_class=2)
    cfg = recipe(tmp_path / "recipe.yaml", model="tiny32", data=data, out=tmp_path / "run", **{key: value})
    for command in (["finetune"], ["lr-find"], ["sweep"], ["doctor"]):     # (lr-find's, doctor's too: no --resume)
        result = invoke(*command, "--config", cfg)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"{cfg}: {says}" in lines[0], (command, result.output)
    assert not (tmp_path / "run").exists() and finetune_calls == []


def test_a_relative_data_in_a_file_is_relative_to_the_current_directory_not_the_file(tmp_path, monkeypatch,
                                                                                    finetune_calls):
    make_image_folder(tmp_path / "work" / "photos", per_class=2)
    cfg = recipe(tmp_path / "recipes" / "r.yaml", model="tiny32", data="photos", out="runs/x", exclude="ex.txt")
    (tmp_path / "work" / "ex.txt").write_text("")
    monkeypatch.chdir(tmp_path / "work")
    result = invoke("finetune", "--config", cfg)
    assert result.exit_code == 0, result.output
    got = finetune_calls[-1]
    assert (got.data, got.out, got.exclude) == ("photos", "runs/x", "ex.txt")
    monkeypatch.chdir(tmp_path / "recipes")     # the same file from another folder: no photos/ there
    result = invoke("lr-find", "--config", recipe(tmp_path / "recipes" / "l.yaml", model="tiny32", data="photos"))
    assert result.exit_code == 2 and "l.yaml: data: Directory 'photos' does not exist" in result.output, result.output


def test_a_data_in_a_file_gets_the_flags_message_naming_the_file(tmp_path, finetune_calls):
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    cfg = recipe(tmp_path / "r.yaml", model="tiny32", data=archive)
    result = invoke("finetune", "--config", cfg)
    assert result.exit_code == 2 and finetune_calls == []
    assert f"{cfg}: data: {archive} is a .zip archive, not a folder: extract it" in result.output, result.output


def test_a_key_no_command_takes_is_refused_with_the_close_matches(tmp_path, finetune_calls):
    data = make_image_folder(tmp_path / "data", per_class=2)
    result = invoke("doctor", "--config", recipe(tmp_path / "c.yaml", data=data, nera=0.9))
    assert result.exit_code == 2 and "unknown option(s) nera (did you mean near?)" in result.output
    assert "see `zoo doctor --help`" in result.output
    result = invoke("doctor", "--config", recipe(tmp_path / "e.yaml", data=data, stpes=20))    # another command's
    assert result.exit_code == 2 and "unknown option(s) stpes (did you mean steps?)" in result.output
    result = invoke("finetune", "--config", recipe(tmp_path / "d.yaml", **{"fc-dropout": 0.1}))
    assert result.exit_code == 2 and "unknown option(s) fc-dropout (did you mean fc_dropout?)" in result.output
    assert finetune_calls == []


def test_lr_find_and_sweep_take_their_own_keys_from_the_file(tmp_path, monkeypatch):
    from zoo.cli import lr_find, sweep

    data = make_image_folder(tmp_path / "data", per_class=2)
    seen = {}
    monkeypatch.setattr(lr_find, "_lr_find_into", lambda out_dir, model, data, config, pretrained, fc_dropout,
                        start_lr, end_lr, steps, *a: seen.update(lr=(out_dir, model, data, pretrained, start_lr,
                                                                      steps, config.seed)))
    monkeypatch.setattr(sweep, "_sweep_into", lambda ctx, out_dir, model, data, config, pretrained, fc_dropout, lrs,
                        wds, freezes, optimizers, folds, resume, keep_runs, say: seen.update(
                            sweep=(out_dir, model, lrs, wds, freezes, optimizers, folds, keep_runs, config.epochs)))
    cfg = recipe(tmp_path / "l.yaml", model="tiny32", data=data, out=tmp_path / "lr", pretrained=False,
                 start_lr=1e-5, steps=20, seed=3, device="cpu")
    result = invoke("lr-find", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert seen["lr"] == (tmp_path / "lr", "tiny32", str(data), False, 1e-5, 20, 3)
    assert invoke("lr-find", "--config", cfg, "--steps", "30", "--out", tmp_path / "lr2").exit_code == 0
    assert seen["lr"][0] == tmp_path / "lr2" and seen["lr"][5] == 30
    # sweep: its grid flags in the file (a list, A:B:N, a comma list); a single value is the config's, as before
    cfg = recipe(tmp_path / "s.yaml", model="tiny32", data=data, out=tmp_path / "sw", lr=[1e-3, 1e-2],
                 freeze="head,1", optimizer="sgd", folds=2, keep_runs=True, epochs=2, device="cpu")
    result = invoke("sweep", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert seen["sweep"] == (tmp_path / "sw", "tiny32", [1e-3, 1e-2], None, ["head", "1"], None, 2, True, 2)
    assert invoke("sweep", "--config", cfg, "--lr", "0.1", "--out", tmp_path / "sw2").exit_code == 0
    assert seen["sweep"][2] == [0.1]


def test_doctor_takes_its_dir_model_and_options_from_the_file(tmp_path, monkeypatch):
    from zoo.jobs import doctor

    data, other = make_image_folder(tmp_path / "data", per_class=2), make_image_folder(tmp_path / "o", per_class=2)
    seen = []

    def run(data, *, model=None, out=None, options=None, config=None, **kwargs):
        seen.append((data, model, out, options.folds, config.seed, config.val_split))
        return SimpleNamespace(findings=[], images=0, classes=[], by_kind=dict), Path(out)

    monkeypatch.setattr(doctor, "run", run)
    cfg = recipe(tmp_path / "d.yaml", data=data, model="tiny32", out=tmp_path / "doc", folds=3, seed=2, val_split=0.5)
    assert invoke("doctor", "--config", cfg).exit_code == 0
    assert seen[-1] == (str(data), "tiny32", str(tmp_path / "doc"), 3, 2, 0.5)
    result = invoke("doctor", other, "--config", cfg, "--seed", "4")      # DIR typed wins over the file's data
    assert result.exit_code == 0, result.output
    assert seen[-1][0] == str(other) and seen[-1][4] == 4


def test_saved_configs_of_lr_find_and_sweep_still_pass_as_config(tmp_path, finetune_calls):
    """lr-find's OUT/config.yaml and sweep's best_config.yaml (every option, as their next: lines pass them)."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    save_config(FinetuneConfig(lr=0.02, freeze="head", seed=5), tmp_path / "config.yaml")
    result = invoke("finetune", "tiny32", "--data", data, "--config", tmp_path / "config.yaml", "--lr", "0.003")
    assert result.exit_code == 0, result.output
    assert (finetune_calls[-1].config.lr, finetune_calls[-1].config.seed) == (0.003, 5)


@pytest.mark.parametrize("text, says", [
    ("freeze: null", "freeze=None should be auto, head, none or a number of stages"),
    ("optimizer: null", "optimizer=None should be adam, sgd, adamw, rmsprop, adagrad or adadelta"),
    ("epochs: null", "epochs=None should be a whole number"),
    ("device: null", "device=None should be auto, cpu, cuda, cuda:N or mps")])
def test_a_null_in_a_file_is_refused_naming_the_allowed_values(tmp_path, text, says):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config_file(tmp_path / "c.yaml")
    assert str(err.value) == f"{tmp_path / 'c.yaml'}: {says}"


# ----------------------------------------------------------------------------------------------------------------
# Found reviewing helper-134's config files (helper-139): a file's value of a command's own option is taken as the
# same flag typed would be, or refused in one line naming the file (exit 2, before anything is read or written)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, text, says", [
    ("lr-find", "steps: 20.5", "steps: '20.5' is not a valid integer."),      # was cut to 20 without a word
    ("lr-find", "start_lr: true", "start_lr: 'true' is not a valid float."),    # was 1.0
    ("lr-find", "method: [valley]", "method=['valley'] should be auto, valley, steepest, edge or policy"),
    ("finetune", "data: [a, b]", "data=['a', 'b'] should be a folder"),         # was the folder "a,b"
    ("finetune", "data: {a: 1}", "data={'a': '1'} should be a folder"),          # was a TypeError traceback
    ("lr-find", "data: null", "data=None should be a folder"),                   # was a TypeError traceback
    ("finetune", "out: ''", "out='' should be a folder"),                        # was an IndexError traceback
    ("finetune", "exclude: [ex.txt]", "exclude=['ex.txt'] should be a file"),
    ("finetune", "export: maybe", "export='maybe' should be true or false"),      # (`no`, `null`: helper-152)
    ("finetune", "fc_dropout: true", "fc_dropout: 'true' is not a valid float.")])
def test_a_files_value_of_a_run_level_option_is_taken_as_typed_or_refused_naming_the_file(tmp_path, monkeypatch,
                                                                                           finetune_calls, command,
                                                                                           text, says):
    data = make_image_folder(tmp_path / "data", per_class=2)
    (tmp_path / "ex.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny32", "data": str(data), "out": str(tmp_path / "out"),
                                   **yaml.safe_load(text)}))
    result = invoke(command, "--config", cfg)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"zoo: error: {cfg}: {says}"]
    assert finetune_calls == [] and not (tmp_path / "out").exists()


def test_a_number_where_text_or_a_path_goes_is_its_text_as_typed(tmp_path, monkeypatch, finetune_calls):
    """`out: 5` reached the run as the int 5 (a TypeError traceback from the folder checks); `model: 5` is "5"."""
    make_image_folder(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    result = invoke("finetune", "--config", recipe(tmp_path / "c.yaml", model=5, data="photos", out=5))
    assert result.exit_code == 0, result.output
    assert (finetune_calls[-1].model, finetune_calls[-1].out) == ("5", "5")


@pytest.mark.parametrize("key", ["data", "out", "exclude"])
def test_a_leading_tilde_in_a_files_path_says_the_path_to_write_not_the_shells_quoting(tmp_path, monkeypatch,
                                                                                        finetune_calls, key):
    """The flag's advice ("which the shell expands only when it is not quoted ... or leave the ~ unquoted") is no
    way on in a file, which no shell reads; `out: ~/runs` was said of `--out`, the file not named."""
    home = tmp_path / "home"
    make_image_folder(home / "photos", per_class=2)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    values = {"model": "tiny32", "data": str(home / "photos"), key: f"~/{key}"}
    result = invoke("finetune", "--config", recipe(tmp_path / "c.yaml", **values))
    assert result.exit_code == 2, result.output
    expected = f"zoo: error: {tmp_path / 'c.yaml'}: {key}: ~/{key} begins with ~, which a --config file does not " \
               f"expand: write {home / key}"
    assert result.output.strip().splitlines() == [expected]
    assert finetune_calls == [] and not (tmp_path / "~").exists()


def test_a_freeze_too_deep_in_a_sweep_grid_in_the_file_is_said_of_the_file(tmp_path, monkeypatch):
    """`freeze: 1,99` (zoo sweep's grid) in the file was said as `--freeze 99`, a flag never typed, the file not
    named (naming_the_file looked at the config's keys only; the grid is --freeze's default from the file)."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    cfg = recipe(tmp_path / "s.yaml", model=tiny, data=data, freeze="1,99", lr=0.01, epochs=1, workers=0,
                 device="cpu", batch_size=8, quiet=True)
    rest = ": this model has 5 stages, so the most is 5 (or use none to train everything)"
    result = invoke("sweep", "--config", cfg, "--out", tmp_path / "a")
    assert result.exit_code == 2 and result.output.strip().endswith(f"freeze 99 in {cfg}{rest}"), result.output
    result = invoke("sweep", "--config", cfg, "--out", tmp_path / "b", "--freeze", "1,42")
    assert result.exit_code == 2 and result.output.strip().endswith(f"--freeze 42{rest}"), result.output


def test_an_empty_out_typed_is_the_current_folder_not_a_traceback():
    """`--out ""` typed: unexpanded_home("") looked at the first part of a path that has none (IndexError)."""
    from finetune.core.io import unexpanded_home

    assert unexpanded_home("") is None and unexpanded_home(".") is None


@pytest.mark.parametrize("command", ["finetune", "lr-find"])
def test_an_fc_dropout_in_the_file_for_a_model_without_fc_layers_is_said_of_the_file(tmp_path, monkeypatch, command):
    """`fc_dropout: 0.3` in a --config file for a non-VGG model was refused as `--fc-dropout applies to VGG's ...`,
    a flag never typed, the file not named (naming_the_file knew freeze only); a typed --fc-dropout keeps the flag."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    cfg = recipe(tmp_path / "f.yaml", model=tiny, data=data, fc_dropout=0.3, **FAST)
    result = invoke(command, "--config", cfg, "--out", tmp_path / "a")
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith(f"zoo: error: fc_dropout 0.3 in {cfg} applies to VGG's FC-4096 "
                                                     f"layers; {tiny} has none"), result.output
    result = invoke(command, "--config", cfg, "--out", tmp_path / "b", "--fc-dropout", "0.2")
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("zoo: error: --fc-dropout applies to VGG's"), result.output


@pytest.mark.parametrize("text, says", [
    ("lr: 0.01,abc", "lr: 'abc' is not a number; use e.g. 1e-4:1e-2:5 or 1e-4,1e-3"),
    ("optimizer: adam,foo", "optimizer: foo not known; choose from adam, sgd, adamw, rmsprop, adagrad, adadelta"),
    ("weight_decay: [inf]", "weight_decay: inf is not allowed"),        # (`.inf`: not a number, as typed)
    ("folds: 1", "folds: 1: cross-validation needs at least 2 folds")])
def test_a_bad_sweep_grid_or_folds_in_the_file_is_said_of_the_file(tmp_path, text, says):
    """Fuzz (helper-142): zoo sweep's grid (`lr: 0.01,abc`, `optimizer: adam,foo`) or `folds: 1` given in the
    --config file was refused as `--lr: ...`, `--folds 1: ...`, flags never typed, the file not named."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"model: tiny32\ndata: {data}\n{text}\n")
    result = invoke("sweep", "--config", cfg, "--out", tmp_path / "sw")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        f"zoo: error: {cfg}: {says}"), result.output
    typed = text.split(":")[0].replace("_", "-")
    result = invoke("sweep", "--config", cfg, "--out", tmp_path / "sw", f"--{typed}", text.split(": ")[1])
    assert result.exit_code == 2 and f"zoo: error: --{typed}" in result.output, result.output


def test_an_unreadable_exclude_in_the_file_is_said_of_the_file(tmp_path, monkeypatch):
    """Fuzz (helper-142): `exclude: some.png` (a file that is no list) in the --config file was refused as
    `--exclude: cannot read the exclude file ...`, a flag never typed; typed, the flag keeps its words."""
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\xff\xfe\x00\xd8\x00")
    cfg = recipe(tmp_path / "e.yaml", model=tiny, data=data, exclude=bad, **FAST)
    result = invoke("finetune", "--config", cfg, "--out", tmp_path / "a")
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith(f"zoo: error: {cfg}: exclude: cannot read the exclude file"), last
    result = invoke("finetune", "--config", recipe(tmp_path / "f.yaml", model=tiny, data=data, **FAST), "--out",
                    tmp_path / "b", "--exclude", bad)
    assert result.exit_code == 2 and "zoo: error: --exclude: cannot read" in result.output, result.output


# ----------------------------------------------------------------------------------------------------------------
# Found by session 35's config leftovers (helper-143)
# ----------------------------------------------------------------------------------------------------------------
def test_one_recipe_runs_doctor_lr_find_sweep_and_finetune_each_skipping_the_others_keys(tmp_path, monkeypatch,
                                                                                          finetune_calls):
    """One recipe.yaml per project: `zoo doctor --config recipe.yaml` refused its `lr:` ("zoo doctor takes no lr"),
    `zoo finetune --config` its `steps:`/`folds:`. Each command now skips the keys another zoo command takes, with
    one note naming them and whose they are; its own keys are still checked as its flags'."""
    from zoo.cli import lr_find, sweep
    from zoo.jobs import doctor

    data = make_image_folder(tmp_path / "data", per_class=2)
    seen = {}
    monkeypatch.setattr(doctor, "run", lambda data, *, out=None, options=None, **kw: (seen.update(doctor=options.folds),
                        (SimpleNamespace(findings=[], images=0, classes=[], by_kind=dict), Path(out)))[1])
    monkeypatch.setattr(lr_find, "_lr_find_into", lambda out_dir, model, data, config, pretrained, fc_dropout,
                        start_lr, end_lr, steps, *a: seen.update(lr_find=(steps, config.lr, config.epochs)))
    monkeypatch.setattr(sweep, "_sweep_into", lambda ctx, out_dir, model, data, config, pretrained, fc_dropout, lrs,
                        *a: seen.update(sweep=(a[3], config.lr, config.epochs)))
    cfg = tmp_path / "recipe.yaml"          # (keys in this order: the note names them in the file's order)
    cfg.write_text(f"model: tiny32\ndata: {data}\nlr: 0.01\nepochs: 3\nsteps: 20\nstart_lr: 1e-5\nfolds: 2\n"
                   "near: 0.97\nkeep_runs: true\ndevice: cpu\n")
    notes = {}
    for command in ("doctor", "lr-find", "sweep", "finetune"):
        result = invoke(command, "--config", cfg, "--out", tmp_path / command)
        assert result.exit_code == 0, (command, result.output)
        notes[command] = [line for line in result.output.splitlines() if line.startswith(f"note: {cfg}")]
    assert notes == {
        "doctor": [f"note: {cfg}: zoo doctor skips lr, epochs (for zoo finetune, lr-find, sweep); steps, "
                   "start_lr (for zoo lr-find); keep_runs (for zoo sweep)"],
        "lr-find": [f"note: {cfg}: zoo lr-find skips folds (for zoo sweep, doctor); near (for zoo doctor); keep_runs "
                    "(for zoo sweep)"],
        "sweep": [f"note: {cfg}: zoo sweep skips steps, start_lr (for zoo lr-find); near (for zoo doctor)"],
        "finetune": [f"note: {cfg}: zoo finetune skips steps, start_lr (for zoo lr-find); folds (for zoo sweep, "
                     "doctor); near (for zoo doctor); keep_runs (for zoo sweep)"]}
    assert seen == {"doctor": 2, "lr_find": (20, 0.01, 3), "sweep": (2, 0.01, 3)}
    assert (finetune_calls[-1].config.lr, finetune_calls[-1].config.epochs) == (0.01, 3)
    # the keys a command takes are still checked as its flags (steps: 20.5 is no whole number for lr-find)
    bad = recipe(tmp_path / "bad.yaml", model="tiny32", data=data, steps=20.5)
    assert invoke("finetune", "--config", bad, "--out", tmp_path / "f2").exit_code == 0
    result = invoke("lr-find", "--config", bad, "--out", tmp_path / "l2")
    assert result.exit_code == 2 and "bad.yaml: steps: '20.5' is not a valid integer." in result.output


@pytest.mark.parametrize("text, typed, field, value", [
    ("out: 10:30", ["--out", "10:30"], "out", "10:30"),                    # was the folder 630 (base 60)
    ("model: '010'", ["010"], "model", "010"),                             # (quoted: text before too)
    ("model: 010", ["010"], "model", "010"),                               # was "8" (octal)
    ("model: 0x1F", ["0x1F"], "model", "0x1F"),                            # was "31"
    ("epochs: 010", ["--epochs", "010"], "epochs", 10),                    # was 8
    ("epochs: 1_0", ["--epochs", "1_0"], "epochs", 10),                    # (Python's int() and click's take _ too)
    ("out: 2024-01-01", ["--out", "2024-01-01"], "out", "2024-01-01")])   # was "out=datetime.date(...) should be"
def test_a_files_plain_text_means_what_the_same_text_typed_means(tmp_path, monkeypatch, finetune_calls, text, typed,
                                                                   field, value):
    """YAML 1.1 (PyYAML) read `1:0:3`, `10:30` as base-60 numbers, `010` as octal, `0x1F` as hex, `2024-01-01` as a
    date: a --config value meant another thing than the same text after its flag. finetune.core.yamlschema: such
    text stays text, and the option's own parser reads it as it reads the typed flag."""
    make_image_folder(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    got = []
    for args in (["--config", "c.yaml"], [*typed, "--config", "c.yaml"]):
        (tmp_path / "c.yaml").write_text(f"model: m\ndata: photos\n{text}\n" if not text.startswith("model")
                                         else f"data: photos\n{text}\n")
        result = invoke("finetune", *args)
        assert result.exit_code == 0, result.output
        call = finetune_calls[-1]
        got.append(getattr(call.config, field) if field == "epochs" else getattr(call, field))
    assert got == [value, value]


@pytest.mark.parametrize("command, text, says", [
    ("finetune", "amp: maybe", "amp='maybe' should be true or false"),           # (`on`, `yes`: true, helper-152)
    ("lr-find", "start_lr: 1:30", "start_lr: '1:30' is not a valid float."),     # was 90.0
    ("sweep", "lr: 1:0:3", "lr: '1:0:3': a log-spaced range needs positive ends")])  # was lr 3603, the default grid
def test_yaml_1_1_words_and_base_60_in_a_file_are_refused_as_the_typed_text_would_be(tmp_path, command, text, says):
    data = make_image_folder(tmp_path / "data", per_class=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny32\ndata: {data}\n{text}\n")
    result = invoke(command, "--config", cfg, "--out", tmp_path / "o")
    assert result.exit_code == 2 and f"zoo: error: {cfg}: {says}" in result.output, result.output


def test_every_yaml_file_zoo_writes_reads_back_the_same(tmp_path):
    """yaml.safe_dump (YAML 1.1's resolver) quotes each string it would read as another type; the narrower reader
    must read back what zoo writes: a run's config.yaml (save_config), lr-find's and sweep's alike, with values
    that look like numbers, words YAML 1.1 reads as true/false, dates and base-60 text."""
    from finetune.core.io import load_yaml

    tricky = ["010", "0x1F", "1:0:3", "10:30", "yes", "off", "2024-01-01", "1_000", "1e-3", ".5", "=", "~", "null"]
    config = FinetuneConfig(lr=1e-5, weight_decay=0.0, freeze="2", epochs=12, seed=0, mixup=0.25)
    save_config(config, tmp_path / "config.yaml")
    assert read_config_file(tmp_path / "config.yaml")[0] == config
    written = {"strings": tricky, "numbers": [0, -1, 10**20, 1e-5, 1e16, -0.0, 3.5, float("inf")],
               "flags": [True, False, None], **{t: t for t in tricky}}
    text = yaml.safe_dump(written)
    assert load_yaml(text) == yaml.safe_load(text) == written
    # the files of option values (config, registry) read as text, each value by its kind (helper-152)
    from finetune.core.yamlschema import as_bool, as_float, as_int

    read = load_yaml(text, as_text=True)
    assert read["strings"] == tricky and {t: read[t] for t in tricky} == {t: t for t in tricky}
    assert [as_float(v) for v in read["numbers"]] == written["numbers"]
    assert [as_int(v) for v in read["numbers"][:3]] == written["numbers"][:3]
    assert [as_bool(v) for v in read["flags"][:2]] == [True, False] and read["flags"][2] is None


@pytest.mark.parametrize("command", ["finetune", "lr-find", "sweep", "doctor"])
def test_an_unknown_model_in_the_file_is_said_of_the_file(tmp_path, command):
    """`model: .inf` (or `model: 5`) in a --config file was refused as if MODEL had been typed (`unknown model
    'inf'`), the file not named; a MODEL typed (doctor: --model) keeps the plain words."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"model: .inf\ndata: {data}\n")
    result = invoke(command, "--config", cfg, "--out", tmp_path / "a")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"zoo: error: {cfg}: model: unknown model '.inf'; ")
    typed = ["--model", "nope"] if command == "doctor" else ["nope"]
    result = invoke(command, *typed, "--config", cfg, "--out", tmp_path / "b")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        "zoo: error: unknown model 'nope'; "), result.output


# ----------------------------------------------------------------------------------------------------------------
# Found by session 36's YAML leftovers (helper-152): a text option keeps the file's spelling, an on/off option reads
# the words zoo's boolean flags take, null is "not set" where the option may be left unset
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("out: 1.50", "1.50"), ("out: 010", "010"), ("out: 1e3", "1e3"), ("out: .inf", ".inf"), ("out: -0", "-0"),
    ("out: +5", "+5"), ("out: 1.0", "1.0"), ("out: true", "true"), ("out: 'null'", "null")])
def test_a_text_option_keeps_the_text_as_written_in_the_file(tmp_path, monkeypatch, finetune_calls, text, value):
    """`out: 1.50` became the folder 1.5 (YAML's float, then its str), `out: .inf` the folder inf: typed after
    --out, the same text is the folder as written."""
    make_image_folder(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model: tiny32\ndata: photos\n{text}\n")
    result = invoke("finetune", "--config", "c.yaml")
    assert result.exit_code == 0, result.output
    assert finetune_calls[-1].out == value


def test_a_null_is_not_set_where_the_option_may_be_left_unset(tmp_path, monkeypatch, finetune_calls):
    """`out: null` (or `~`, or nothing after the colon) is the key left out where the flag may be left out (its
    default is "none given": the run's folder is then named for the model); a flag that needs a value refuses it
    (`model: null`, and every FinetuneConfig option: test_a_null_in_a_file_is_refused_naming_the_allowed_values)."""
    make_image_folder(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("model: tiny32\ndata: photos\nout: null\nexport: ~\nfc_dropout:\n")
    result = invoke("finetune", "--config", "c.yaml")
    assert result.exit_code == 0, result.output
    (tmp_path / "c.yaml").write_text("model: null\ndata: photos\n")
    result = invoke("finetune", "--config", "c.yaml")
    assert result.exit_code == 2 and "c.yaml: model=None should be text" in result.output, result.output


@pytest.mark.parametrize("word, value", [("on", True), ("off", False), ("yes", True), ("No", False), ("Y", True),
                                         ("n", False), ("TRUE", True), ("false", False), ("t", True), ("F", False),
                                         ("1", True), ("0", False), ("'on'", True)])
def test_an_on_off_option_in_a_file_reads_the_words_of_zoo_s_boolean_flags(tmp_path, monkeypatch, finetune_calls,
                                                                            word, value):
    """`amp: on` and `export: yes` were refused after session 35 (`should be true or false`): an on/off option
    reads the words click's BOOL takes (the values zoo's boolean flags take from a default map), in any case,
    through the one reader (finetune.core.yamlschema.as_bool) the registry's `override:` uses too."""
    make_image_folder(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model: tiny32\ndata: photos\namp: {word}\nexport: {word}\n")
    result = invoke("finetune", "--config", "c.yaml")
    assert result.exit_code == 0, result.output
    assert finetune_calls[-1].config.amp is value and finetune_calls[-1].export is value
