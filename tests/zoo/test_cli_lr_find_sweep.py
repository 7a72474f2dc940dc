"""`zoo lr-find` and `zoo sweep` through click's CliRunner, on a tiny random-init model at 32 px."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import make_image_folder
from zoo.cli import cli


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A user registry with a 32-px test_resnet entry (weights never fetched: --no-pretrained)."""
    entry = {"name": "tiny-resnet", "builder": "timm:test_resnet",
             "sources": [{"kind": "file", "path": str(tmp_path / "absent.safetensors"),
                          "sha256_note": "test entry; never downloaded"}],
             "preprocessing": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "origin": "test"},
             "stages": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]], "classifier": "fc",
             "params": 1000, "license": "apache-2.0", "family": "test", "year": 2024}
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
    monkeypatch.setenv("ZOO_REGISTRY", str(reg))
    return make_image_folder(tmp_path / "data", per_class=8)


COMMON = ["--no-pretrained", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


def test_lr_find_command(tiny_zoo, tmp_path):
    out = tmp_path / "lr"
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--steps", "30",
                                 "--start-lr", "1e-5", "--end-lr", "1", "--freeze", "none", *COMMON])
    assert r.exit_code == 0, r.output
    assert "valley rule" in r.output and "suggested lr" in r.output
    (nxt,) = [line for line in r.output.splitlines() if line.startswith("next: zoo finetune tiny-resnet")]
    assert nxt.endswith("--no-pretrained")          # the printed command trains the same (random-init) model
    # ... with the options the LR was found for (QA: --freeze none was dropped, so it trained the head only)
    argv = shlex.split(nxt)                         # a shell command: paths with a space are quoted
    assert argv[argv.index("--config") + 1:argv.index("--config") + 3] == [str(out / "config.yaml"), "--lr"]
    summary = json.loads((out / "lr_find.json").read_text())
    assert 1e-5 <= summary["suggestion"] <= 1 and summary["method"] == "valley"
    for name in ("lr_find.png", "lr_find.csv", "config.yaml", "scan.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["freeze"] == "none"


@pytest.mark.parametrize("head_epochs", [None, "0"])
def test_lr_find_where_layers_train_starts_from_the_runs_trained_head(tiny_zoo, tmp_path, head_epochs):
    """Session 37: where layers train, the range test starts from the head the run's head phase trains (solved on
    cached features, C picked on the validation split), as the finetune phase does; --head-epochs 0 (a run with no
    head phase: refused by lr-find before, as an option a range test ignored) probes from a new head, as it trains.
    lr_find.json says which, and the next command trains the same way (config.yaml). Session 39: from the trained
    head the suggestion is the run's policy LR (at most POLICY_REACH x where the loss diverged), from a new one the
    valley rule's."""

    out = tmp_path / "lr"
    more = ["--head-epochs", head_epochs] if head_epochs else []
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--steps", "10",
                                 "--freeze", "1", *more, *COMMON])
    assert r.exit_code == 0, r.output
    trained = head_epochs is None
    summary = json.loads((out / "lr_find.json").read_text())
    assert summary["from_trained_head"] is trained
    # (random init: BatchNorm statistics train, not the recipe the policy LR was measured on: no policy rule)
    assert summary["policy"] is None and summary["method"] in ("edge", "valley", "steepest", "min/10")
    assert ("lr-find: head: L-BFGS on cached features" in r.output) is trained, r.output
    assert ("probing the network from the trained head" in r.output) is trained
    assert yaml.safe_load((out / "config.yaml").read_text())["head_epochs"] == (-1 if trained else 0)


def test_lr_find_from_a_solved_head_keeps_the_default_lr_unless_the_loss_diverged_below_half_of_it(tiny_zoo, tmp_path):
    """Session 39: where layers train from the head solved first with the BatchNorm statistics frozen (the default
    with pretrained weights: --bn eval here, the tiny model has none), the range test's curve reads too low (it has
    no warm-up or weight average; on digits and MNIST its edge rule tested 0.6 and 2.5 points below the default LR):
    the suggestion is the LR `zoo finetune` trains at by default, lowered only to 2x where the loss diverged; the
    next command trains at it."""
    from finetune.core.policy import AUTO_LR_FINETUNE
    from finetune.tools.diagnostics.lrfind import POLICY_REACH

    out = tmp_path / "lr"
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--steps", "12",
                                 "--freeze", "1", "--bn", "eval", *COMMON])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "lr_find.json").read_text())
    last_lr = float((out / "lr_find.csv").read_text().splitlines()[-1].split(",")[1])
    want = min(AUTO_LR_FINETUNE, POLICY_REACH * last_lr) if summary["stopped_early"] else AUTO_LR_FINETUNE
    assert (summary["from_trained_head"], summary["policy"], summary["method"]) == (True, AUTO_LR_FINETUNE, "policy")
    assert summary["suggestion"] == pytest.approx(want) and "(policy rule: the run's default lr" in r.output
    (nxt,) = [line for line in r.output.splitlines() if line.startswith("next: zoo finetune tiny-resnet")]
    assert shlex.split(nxt)[shlex.split(nxt).index("--lr") + 1] == f"{want:.2g}"


def test_lr_find_on_a_head_only_run_says_its_lr_needs_the_gradient_solver(tiny_zoo, tmp_path):
    """QA: the default head-only run solves its head by L-BFGS and uses no LR, so the suggested command
    adds --head-solver gradient and says why; and that run's epoch line says so instead of an LR."""
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tmp_path / "lr"),
                                 "--steps", "20", "--freeze", "head", *COMMON])
    assert r.exit_code == 0, r.output
    (nxt,) = [line for line in r.output.splitlines() if line.startswith("next: zoo finetune tiny-resnet")]
    assert "--head-solver gradient" in nxt and "uses no learning rate" in r.output
    # an MLP head trains by gradient at the LR whatever the solver: no such note (QA)
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tmp_path / "mlp"),
                                 "--steps", "20", "--freeze", "head", "--head", "mlp", *COMMON])
    assert r.exit_code == 0 and "uses no learning rate" not in r.output, r.output
    (nxt,) = [line for line in r.output.splitlines() if line.startswith("next: zoo finetune tiny-resnet")]
    assert "--head-solver" not in nxt
    r = CliRunner().invoke(cli, ["finetune", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tmp_path / "run"),
                                 "--freeze", "head", "--lr", "0.5", "--epochs", "2", "--no-export", *COMMON])
    assert r.exit_code == 0, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("epoch 1/")]
    assert "solved by L-BFGS, no lr" in line and "lr 0.5" not in line


@pytest.mark.parametrize("command", ["lr-find", "sweep"])
def test_lr_find_and_sweep_note_the_options_the_run_leaves_without_effect(tiny_zoo, tmp_path, command):
    """Review: `zoo sweep --mlp-hidden 512` with a linear head ran every trial with the option doing nothing, as
    finetune did before it noted it; the three commands resolve their config in one place, notes included."""
    short = ["--epochs", "1"] if command == "sweep" else ["--steps", "10"]
    r = CliRunner().invoke(cli, [command, "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tmp_path / "o"),
                                 "--mlp-hidden", "64", *short, *COMMON])
    assert r.exit_code == 0, r.output
    assert "note: --mlp-hidden shapes the MLP head; this run's head is linear (add --head mlp)" in r.stderr


def test_lr_find_usage_errors(tiny_zoo):
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--start-lr", "1", "--end-lr",
                                 "0.1", *COMMON])
    assert r.exit_code == 2 and "must be below --end-lr" in r.output
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnt", "--data", str(tiny_zoo), *COMMON])
    assert r.exit_code != 0 and "tiny-resnet" in r.output  # close match offered
    # QA: --steps 100000000000000000000 ran for ever on the cached features
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--steps", "10001", *COMMON])
    assert r.exit_code == 2 and "5 <= x <= 10000" in r.output


def test_sweep_command_ranks_writes_yaml_and_resumes(tiny_zoo, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--lr", "1e-3,1e-2",
            "--freeze", "head,1", "--epochs", "1", "--head-epochs", "0", *COMMON]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("rank"))
    assert len([l for l in lines[header + 1:] if l[:1].isdigit()]) == 4
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["epochs"] == 1 and best["lr"] in (1e-3, 1e-2) and best["freeze"] in ("head", "1")
    assert (out / "sweep.png").is_file() and len((out / "results.csv").read_text().splitlines()) == 5
    # the run to keep: the best trial's options with the auto epochs (was --epochs 30, from before the policy)
    nxt = _next_command(r.output)
    assert nxt[nxt.index("--config") + 1:nxt.index("--config") + 4] == [str(out / "best_config.yaml"), "--epochs", "0"]

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "4 finished trial(s)" in resumed.output


def test_a_resumed_sweep_with_other_values_ranks_the_earlier_trials_too(tiny_zoo, tmp_path):
    """QA: `--resume --lr 5e-2,1e-1` after a sweep of 6 LRs wrote results.csv, best_config.yaml and sweep.png of the
    2 new trials only (the 6 survived in results.jsonl alone, without a word). The fixed options are checked on
    resume, so every trial of the folder is comparable: the resumed sweep ranks them all and says so."""
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--epochs", "1", "--head-epochs", "0",
            "--freeze", "1", *COMMON]
    first = CliRunner().invoke(cli, [*args, "--lr", "1e-3,1e-2"])
    assert first.exit_code == 0, first.output
    r = CliRunner().invoke(cli, [*args, "--lr", "1e-2,5e-2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "1 finished trial(s) taken" in r.output and "1 earlier trial(s) outside this grid kept" in r.output
    lines = r.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("rank"))
    assert len([l for l in lines[header + 1:] if l[:1].isdigit()]) == 3
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(float(row["lr"]) for row in rows) == [1e-3, 1e-2, 5e-2]
    assert yaml.safe_load((out / "best_config.yaml").read_text())["lr"] == float(rows[0]["lr"])   # rank 1 of all 3


def test_a_sweep_resumed_with_another_model_or_data_is_refused_and_an_unidentified_one_ranks_only_its_grid(
        tiny_zoo, tmp_path):
    """Review (helper-57): the resume check compared the config, not the model, its starting weights or the data
    folder, so an extended sweep ranked another model's trials and wrote one as the best config. sweep.json
    records them (``identity``); a sweep recorded before it resumes, but its trials outside the grid stay out."""
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--out", str(out), "--epochs", "1", "--head-epochs", "0", "--freeze", "1", *COMMON]
    assert CliRunner().invoke(cli, [*args, "--data", str(tiny_zoo), "--lr", "1e-3"]).exit_code == 0
    other = ["sweep", "timm:test_efficientnet", *args[2:], "--data", str(tiny_zoo)]
    moved = tmp_path / "other-data"
    shutil.copytree(tiny_zoo, moved)
    (next(moved.rglob("*.png"))).rename(moved / "cat" / "renamed.png")      # same counts, other files
    for changed in (other, [*args, "--data", str(moved)]):
        r = CliRunner().invoke(cli, [*changed, "--lr", "1e-2", "--resume"])
        assert r.exit_code != 0 and "used other fixed options (model, epochs, folds, data...)" in r.output, r.output
    spec = json.loads((out / "sweep.json").read_text())
    del spec["fixed"]["identity"]                          # as a sweep recorded before identities
    (out / "sweep.json").write_text(json.dumps(spec))
    for _ in range(2):                                     # and it stays unidentified
        r = CliRunner().invoke(cli, [*args, "--data", str(tiny_zoo), "--lr", "1e-2", "--resume"])
        assert r.exit_code == 0 and "outside this grid kept" not in r.output, r.output
        assert [float(row["lr"]) for row in csv.DictReader((out / "results.csv").open())] == [1e-2]


def test_a_sweep_whose_trials_all_keep_the_solved_head_says_the_lr_ranked_nothing(tiny_zoo, tmp_path):
    """QA: with --freeze none each trial's best epoch was its head epoch, solved by L-BFGS (no LR in play): equal
    val losses ranked, a "best" LR named, no note. Also the resumed sweep, whose features all came from the disk
    cache, said "0 bank(s) computed once, reused 2 time(s) by later trials"."""
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--epochs", "3", "--freeze", "none",
            *COMMON]
    r = CliRunner().invoke(cli, [*args, "--lr", "1e-7,1e-6"])
    assert r.exit_code == 0, r.output
    assert all(t["solved_head"] for t in map(json.loads, (out / "results.jsonl").read_text().splitlines()))
    assert "note: every trial kept its head epoch, solved by L-BFGS" in r.output
    assert "the --lr values rank by nothing" in r.output
    assert "features: 2 bank(s) computed once, reused 2 time(s) by later trials" in r.output
    resumed = CliRunner().invoke(cli, [*args, "--lr", "1e-5", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "features: 2 bank load(s) from the feature cache, computed by an earlier run; none computed" \
        in resumed.output
    assert "reused" not in resumed.output


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_says_which_trials_are_saved_and_how_to_go_on(tiny_zoo, tmp_path, monkeypatch, request, how):
    """QA: Ctrl-C in the second trial said "interrupted in epoch 1; nothing was saved: pass a run folder"
    (the trial's own message) although the first trial was in results.jsonl and --resume went on.
    SIGTERM between two trials (outside a training loop's own handler) ended the process with 143 and no
    word; the CLI takes it as Ctrl-C now."""
    import signal

    import finetune.tools.sweep.run as sweep_run

    class NotTakenAsCtrlC(Exception):
        pass

    def not_ctrl_c(signum, frame):      # what SIGTERM does here unless the CLI takes it as Ctrl-C
        raise NotTakenAsCtrlC

    previous = signal.signal(signal.SIGTERM, not_ctrl_c)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    real, calls = sweep_run._fit_split, []

    def stop_in_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_run, "_fit_split", stop_in_the_second)
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--lr", "1e-3,1e-2", "--epochs", "1",
            "--head-epochs", "0", "--freeze", "1", *COMMON]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    line = r.output.strip().splitlines()[-1]
    assert line == (f"zoo: error: interrupted: 1 of 2 trial(s) are saved in {out / 'results.jsonl'}; continue with "
                    f"the same command and --resume (--out {out})"), line
    monkeypatch.setattr(sweep_run, "_fit_split", real)
    resumed = CliRunner().invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 0 and "1 finished trial(s)" in resumed.output, resumed.output

def test_a_sweep_of_learning_rates_that_train_nothing_says_so(tiny_zoo, tmp_path):
    """QA: head-only trials solve the head by L-BFGS, so every --lr gave the same val loss and the "best"
    was the first; the sweep now says so before it starts (not when a trial trains layers)."""
    base = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--lr", "1e-3,1e-2", "--epochs", "1", *COMMON]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "the --lr values rank by nothing" in r.output and "--head-solver gradient" in r.output
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b"), "--freeze", "head,1", "--head-epochs", "0"])
    assert r.exit_code == 0 and "trains nothing" not in r.output, r.output

def test_a_sweep_of_optimizers_and_weight_decays_that_train_nothing_says_so(tiny_zoo, tmp_path):
    """QA: L-BFGS picks its own L2 on the validation split and takes no optimizer steps, so head-only trials
    over --optimizer and --weight-decay were all equal, without the note --lr lists get."""
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--lr", "1e-3", "--epochs", "1",
                                 *COMMON, "--out", str(tmp_path / "c"), "--optimizer", "adam,sgd",
                                 "--weight-decay", "0,1e-2"])
    assert r.exit_code == 0 and "the --optimizer, --weight-decay values rank by nothing" in r.output, r.output


def test_a_sweep_with_auto_epochs_from_its_config_says_auto(tiny_zoo, tmp_path):
    """QA: `epochs: 0` in --config (auto: each trial's policy) was announced as "of 0 epoch(s)"."""
    (tmp_path / "auto.yaml").write_text("epochs: 0\n")
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--lr", "1e-3", *COMMON,
                                 "--config", str(tmp_path / "auto.yaml"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0 and "of auto epochs (8 when layers train, 30 for the head only)" in r.output, r.output


def test_sweep_bad_specs_are_usage_errors(tiny_zoo, tmp_path):
    for command in ("lr-find", "sweep"):    # QA: their lr_find.png / sweep.png became a class of the next scan
        r = CliRunner().invoke(cli, [command, "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tiny_zoo / "o"),
                                     *COMMON])
        assert r.exit_code == 2 and "is inside the data folder" in r.output and not (tiny_zoo / "o").exists()
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--lr", "1e-4:1e-2", *COMMON])
    assert r.exit_code == 2 and "START:END:COUNT" in r.output
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--resume", *COMMON])
    assert r.exit_code == 2 and "--resume needs --out" in r.output



def test_sweep_refuses_one_fold_before_reading_anything(tiny_zoo, tmp_path, monkeypatch):
    """User-guide audit: --folds 1 was refused (exit 2) only after the data scan and the model build, below a
    `sweep: N training run(s) ... into OUT` line for a folder it never made; now before the scan, as --lr is."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--folds", "1", *COMMON])
    assert r.exit_code == 2 and "--folds 1: cross-validation needs at least 2 folds" in r.stderr
    assert "data:" not in r.stderr and "sweep:" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()

def test_help_has_examples_and_defaults():
    for cmd in ("lr-find", "sweep"):
        r = CliRunner().invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output and "[default:" in r.output
    ctx_cmds = {c.name: c for c in [cli.commands["lr-find"], cli.commands["sweep"]]}
    for cmd in ctx_cmds.values():
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{cmd.name} {p.name} has no help"


def test_lr_find_offers_no_option_that_a_range_test_ignores(tiny_zoo):
    """QA: --epochs, --patience, --schedule, --ema, --head-solver... were listed, accepted and ignored."""
    from zoo.cli.lr_find import NOT_IN_A_RANGE_TEST

    names = {p.name for p in cli.commands["lr-find"].params}
    assert not names & set(NOT_IN_A_RANGE_TEST) and {"freeze", "optimizer", "batch_size"} <= names
    r = CliRunner().invoke(cli, ["lr-find", "tiny-resnet", "--data", str(tiny_zoo), "--epochs", "7", *COMMON])
    # click's own wording: "No such option '--epochs'" (8.3 on), "No such option: --epochs" (8.2)
    assert r.exit_code == 2 and re.search(r"No such option:? '?--epochs\b", r.output), r.output


@pytest.mark.parametrize("command", ["lr-find", "sweep"])
def test_no_sync_bn_where_one_process_runs(tiny_zoo, command):
    """QA (session 19): --sync-bn, generated from the option table with the rest, was listed by lr-find and sweep,
    which run in one process only (torchrun is refused), where it does nothing: accepted and ignored."""
    assert "sync_bn" not in {p.name for p in cli.commands[command].params}
    r = CliRunner().invoke(cli, [command, "tiny-resnet", "--data", str(tiny_zoo), "--sync-bn", *COMMON])
    assert r.exit_code == 2 and re.search(r"No such option:? '?--sync-bn\b", r.output), r.output


def _next_command(output: str) -> list[str]:
    """The arguments of the `next: zoo ...` line a command printed (without the leading `zoo`)."""
    (line,) = [ln for ln in output.splitlines() if ln.startswith("next: zoo ")]
    return shlex.split(line.removeprefix("next: zoo "))


@pytest.mark.parametrize("command", ["lr-find", "sweep"])
def test_the_finetune_a_command_suggests_loads_the_features_it_computed(tiny_zoo, tmp_path, command):
    """QA: lr-find and sweep kept the backbone features in memory only, so the `zoo finetune` their `next:`
    line prints computed them again (41 s for 400 digits at 64 px on 2 cores); they now share
    ZOO_HOME/features with finetune and doctor."""
    short = ["--lr", "1e-3", "--epochs", "1"] if command == "sweep" else ["--steps", "10"]
    r = CliRunner().invoke(cli, [command, "tiny-resnet", "--data", str(tiny_zoo), "--out", str(tmp_path / "o"),
                                 "--freeze", "head", *short, *COMMON])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*_next_command(r.output), "--epochs", "1", "--no-export", "--out",
                                 str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "features: train loaded from cache" in r.output
    # lr-find's too: it takes the validation split since session 37 (a run that trains layers solves its head first,
    # its L2 strength picked there), and a head-only test computes its features with the training split's
    assert "features: val loaded from cache" in r.output
    assert "note:" not in r.output      # its --config holds every option: none of them was chosen (QA)


def test_a_head_only_sweep_extended_on_resume_says_the_head_only_note(tiny_zoo, tmp_path):
    """Review (helper-57): a head-only sweep at one LR, extended with --resume --lr OTHER, printed "sweep more
    --epochs so that training the layers can beat the solved head", while no layer trains: the head-only note is
    the one that applies (as for the same grid swept at once)."""
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--epochs", "2", "--freeze", "head",
            *COMMON]
    assert CliRunner().invoke(cli, [*args, "--lr", "1e-3"]).exit_code == 0
    r = CliRunner().invoke(cli, [*args, "--lr", "1e-2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "note: every trial trains the head only, solved by L-BFGS" in r.output and "more --epochs" not in r.output


@pytest.mark.parametrize("fold", ["", "fold-0"])
def test_a_kept_sweep_trial_is_named_as_one_by_predict_export_and_resume(tmp_path, fold, tiny_zoo, monkeypatch):
    """QA (helper-64): a trial folder kept by `zoo sweep --keep-runs` (OUT/trials/<id>, or its fold-K) has
    checkpoints but no model.json. `zoo predict TRIAL` said to export it first with `zoo export TRIAL`, which
    said `TRIAL/model.json is missing; the run did not finish or was not made by zoo finetune; re-run it`, and
    `zoo finetune --resume TRIAL` that it `was written by the Python API ... continue it with fit(...)`.
    Each says now what it is and the way on: train its options as a run, with the model and starting weights
    sweep.json records (helper-118: MODEL; the data folder is not recorded: DIR), which runs pasted."""
    sweep = tmp_path / "sweep"
    trial = sweep / "trials" / "lr0.001_wd0.0001_freeze-auto_adam" / fold
    (trial / "checkpoints").mkdir(parents=True)
    (trial / "checkpoints" / "best.safetensors").write_bytes(b"")
    (trial / "config.yaml").write_text("lr: 0.001\n")
    (sweep / ".zoo-run.json").write_text('{"kind": "sweep"}')
    (sweep / "best_config.yaml").write_text("lr: 0.001\nepochs: 1\nworkers: 0\n")
    (sweep / "sweep.json").write_text(json.dumps({"fixed": {"identity": {"model": "tiny-resnet", "pretrained": False}}}))
    says = (f"zoo: error: {trial} is a trial of the zoo sweep in {sweep} (kept by --keep-runs), which zoo does not "
            "export or continue: train its options as a run (`zoo finetune tiny-resnet --data DIR --config "
            f"{sweep / 'best_config.yaml'} --no-pretrained` trains the best trial's) and use that run's bundle")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    for args, code in ((["predict", trial, image], 1), (["export", trial], 1), (["finetune", "--resume", trial], 2)):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert res.exit_code == code and res.output.strip() == says, (args, res.output)
    monkeypatch.chdir(tmp_path)         # (the new run's default folder: runs/tiny-resnet-TIME)
    named = [{"DIR": str(tiny_zoo)}.get(w, w) for w in shlex.split(says.split("`")[1])]
    res = CliRunner().invoke(cli, [*named[1:], "--device", "cpu", "--quiet", "--no-export"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("trials, kept", [(5, "0"), (8, "0"), (12, "12")])
def test_the_best_trial_s_new_run_takes_the_auto_epochs_unless_the_trials_ran_longer(tmp_path, trials, kept):
    """The sweep's next: line (test_sweep_command_ranks_writes_yaml_and_resumes) and a kept trial's line name one
    run to keep: the trials are short on purpose, so the auto epochs (--epochs 0), or the trials' own beyond 8
    (rerun.kept_run_epochs; the next: line had max(30, trials'), from before the auto policy)."""
    from finetune.core.rerun import best_trial_command

    (tmp_path / "sweep.json").write_text(json.dumps({"fixed": {"config": {"epochs": trials},
                                                               "identity": {"model": "m"}}}))
    argv = shlex.split(best_trial_command(tmp_path))
    assert argv[argv.index("--epochs") + 1] == kept, argv


def test_sweep_overwrite_keeps_the_users_files_inside_trials(tiny_zoo, tmp_path):
    """QA (helper-64): `zoo sweep --overwrite` removed OUT/trials whole, with the user's files in it (notes
    beside a kept trial, a folder of their own), though --overwrite promises to remove only what the command
    writes. The trials go by the rule RUN/export and RUN/checkpoints go by (zoo.outdir, one place): a kept
    trial's files and folders go, the user's stay, and a trial folder with nothing of the user's goes whole."""
    from finetune.tools.sweep.space import trial_id

    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--epochs", "1", "--lr", "1e-3",
            *COMMON]
    r = CliRunner().invoke(cli, [*args, "--keep-runs"])
    assert r.exit_code == 0, r.output
    (trial,) = os.listdir(out / "trials")
    (out / "trials" / trial / "notes.md").write_text("mine")
    (out / "trials" / "mine").mkdir()
    (out / "trials" / "mine" / "config.yaml").write_text("mine")
    (out / "trials" / "README.txt").write_text("mine")
    other = out / "trials" / trial_id({"lr": 0.5, "weight_decay": 0.1, "freeze": "head", "optimizer": "sgd"})
    (other / "fold-0" / "checkpoints").mkdir(parents=True)     # an older --folds trial, nothing of the user's
    for name in ("fold-0/config.yaml", "fold-0/metrics.csv", "fold-0/checkpoints/best.safetensors"):
        (other / name).write_text("old")
    r = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out / "trials")) == sorted(["README.txt", "mine", trial])
    assert os.listdir(out / "trials" / trial) == ["notes.md"]
    assert (out / "trials" / "mine" / "config.yaml").read_text() == "mine"


@pytest.mark.parametrize("command", ["finetune", "lr-find", "sweep", "doctor"])
def test_a_mistyped_model_is_refused_before_the_data_is_scanned(tiny_zoo, tmp_path, monkeypatch, command):
    """QA (helper-64): `zoo finetune resnt50 --data DIR` scanned the data first (minutes on a big folder), then
    said `unknown model` (lr-find, sweep and doctor's --model too, and lr-find and sweep fetched an hf-hub: name
    before the scan). A registry or timm: name is resolved before the scan now (the close matches as
    before); an hf-hub: name not cached is still fetched after it, so unusable data downloads nothing."""
    import zoo.jobs.doctor
    import zoo.jobs.finetune as job

    scanned = []
    real_scan, real_doctor_scan = job.scan_on_main, zoo.jobs.doctor.scan_folder
    monkeypatch.setattr(job, "scan_on_main", lambda *a, **k: scanned.append(a) or real_scan(*a, **k))
    monkeypatch.setattr(zoo.jobs.doctor, "scan_folder", lambda *a, **k: scanned.append(a) or real_doctor_scan(*a, **k))

    def invoke(model: str):
        if command == "doctor":     # (doctor's MODEL is --model)
            return CliRunner().invoke(cli, ["doctor", str(tiny_zoo), "--model", model, "--out", str(tmp_path / "out")])
        return CliRunner().invoke(cli, [command, model, "--data", str(tiny_zoo), "--out", str(tmp_path / "out"),
                                        *COMMON])

    for typed, says in (("tiny-resnt", "unknown model 'tiny-resnt'; did you mean tiny-resnet?"),
                        ("timm:test_resnt", "has no architecture 'test_resnt'; did you mean timm:test_resnet")):
        r = invoke(typed)
        assert r.exit_code == 2 and says in r.output and not scanned, (typed, r.output)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    r = invoke("hf-hub:someone/model")
    assert r.exit_code == 1 and "hf-hub:someone/model is not cached" in r.output and len(scanned) == 1, r.output


@pytest.mark.parametrize("command", ["finetune", "lr-find", "sweep"])
def test_a_freeze_too_deep_in_a_config_file_is_said_of_the_file(tiny_zoo, tmp_path, command):
    """QA (helper-64): `freeze: 99` in a --config file was reported as `--freeze 99: this model has 5 stages`,
    a flag never typed, the file not named. Said of the file now; a --freeze typed keeps the flag's wording
    (over the file's value too)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("freeze: 99\n")
    args = [command, "tiny-resnet", "--data", str(tiny_zoo), "--config", str(recipe), *COMMON]
    rest = ": this model has 5 stages, so the most is 5 (or use none to train everything)"
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and r.output.strip().endswith(f"freeze 99 in {recipe}{rest}"), r.output
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--freeze", "42"])
    assert r.exit_code == 2 and r.output.strip().endswith(f"--freeze 42{rest}"), r.output


def test_a_sweep_resumed_after_a_trial_was_interrupted_runs_that_trial_again(tiny_zoo, tmp_path):
    """Review (h68): a trial interrupted under --keep-runs leaves its run folder (last.pt) unrecorded in
    results.jsonl; `zoo sweep --resume` ran it again into that folder and failed ("... already holds a run:
    continue it with resume=True"), pointing at `zoo finetune --resume` of a trial, which zoo refuses. Its
    zoo files go first, by the rule --overwrite goes by (the user's stay)."""
    out = tmp_path / "sw"
    args = ["sweep", "tiny-resnet", "--data", str(tiny_zoo), "--out", str(out), "--epochs", "1", "--keep-runs", *COMMON]
    r = CliRunner().invoke(cli, [*args, "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    (done,) = os.listdir(out / "trials")
    cut = out / "trials" / done.replace("lr0.001", "lr0.01")     # what an interrupted second trial leaves
    shutil.copytree(out / "trials" / done, cut)
    (cut / "notes.md").write_text("mine")
    r = CliRunner().invoke(cli, [*args, "--lr", "1e-3,1e-2", "--resume"])
    assert r.exit_code == 0, r.output
    assert (cut / "notes.md").read_text() == "mine" and (cut / "checkpoints" / "last.pt").is_file()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("freeze", ["auto", "head", "none", "0", "12"])
def test_every_trial_folder_name_is_one_overwrite_takes_for_a_trial(freeze):
    """Review (h68): zoo.outdir recognises a trial folder by a pattern of trial_id's names ("a test checks"; none
    did): a name it misses keeps an old trial's last.pt and checkpoints through --overwrite."""
    from finetune.core.config import OPTIMIZERS
    from finetune.tools.sweep.space import trial_id
    from zoo.outdir import _TRIAL

    for lr, wd, opt in ((1e-5, 0.0, OPTIMIZERS[0]), (0.3, 1e-4, OPTIMIZERS[-1]), (12.5, 0.05, OPTIMIZERS[0])):
        name = trial_id({"lr": lr, "weight_decay": wd, "freeze": freeze, "optimizer": opt})
        assert _TRIAL.fullmatch(name), name


@pytest.mark.parametrize("command", ["lr-find", "sweep"])
def test_the_default_out_folder_is_named_for_the_command(tmp_path, monkeypatch, command):
    """Review (helper-78) of zoo.cli.shared.claimed_out, the one start of both commands: without --out the folder is
    runs/MODEL-lrfind-TIME / runs/MODEL-sweep-TIME, as each command's own copy named it; a folder that holds
    nothing but its log when the command ends is removed again."""
    import click
    from finetune.core.config import FinetuneConfig
    from zoo.cli.shared import claimed_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    ctx = click.Context(click.Command(command))
    with claimed_out(ctx, command, FinetuneConfig(quiet=True), None, {}, [], "test_resnet", "data",
                     None) as (out_dir, say):
        assert (tmp_path / out_dir).parent == tmp_path / "runs" and (tmp_path / out_dir).is_dir()
        assert re.fullmatch(rf"test_resnet-{command.replace('-', '')}-\d{{8}}-\d{{6}}(-\d+)?", out_dir.name)
    assert not (tmp_path / out_dir).exists()


@pytest.mark.parametrize("options, line", [
    ({}, "auto epochs (8 when layers train, 30 for the head only)"),
    ({"head": "mlp"}, "auto epochs (17 when layers train, 30 for the head only)"),
    ({"head_solver": "gradient", "head_epochs": 3}, "auto epochs (10 when layers train, 30 for the head only)"),
    ({"epochs": 4}, "4 epoch(s)"),
])
def test_a_sweeps_auto_epochs_line_counts_a_head_warm_up_trained_by_gradient(options, line):
    """helper-101: with `epochs: 0` and `head: mlp` in --config, the sweep's first line said "8 when layers train"
    where each such trial runs up to 17 (policy.default_epochs: the head's warm-up epochs on top of the
    finetune phase's 7)."""
    from finetune.core.config import FinetuneConfig
    from zoo.cli.sweep import _length

    assert _length(FinetuneConfig(**options)) == line


def test_a_kept_sweep_trials_line_names_the_sweeps_data_folder_and_runs_pasted(tiny_zoo, tmp_path, monkeypatch):
    """Session 35 (helper-143): sweep.json recorded only a fingerprint of the data, so the line that names a kept
    trial (`zoo export TRIAL` ...) said `--data DIR`, to fill in by hand. The sweep records the data folder's
    absolute path (`data_dir`, not checked on resume): the line names it, and pasted as printed it trains, from
    another folder too (the sweep was given a relative --data)."""
    monkeypatch.chdir(tiny_zoo.parent)
    out = tmp_path / "sw"
    r = CliRunner().invoke(cli, ["sweep", "tiny-resnet", "--data", tiny_zoo.name, "--out", str(out), "--lr", "1e-3",
                                 "--epochs", "1", "--keep-runs", "--quiet", *COMMON])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "sweep.json").read_text())["data_dir"] == str(tiny_zoo)
    (trial,) = (out / "trials").iterdir()
    res = CliRunner().invoke(cli, ["export", str(trial)])
    assert res.exit_code == 1 and "`zoo finetune" in res.output, res.output
    line = res.output.split("`")[1]
    assert shlex.split(line)[:4] == ["zoo", "finetune", "tiny-resnet", "--data"] and "DIR" not in shlex.split(line)
    monkeypatch.chdir(tmp_path / "sw")          # pasted elsewhere: the path is absolute
    pasted = CliRunner().invoke(cli, [*shlex.split(line)[1:], "--out", str(tmp_path / "kept"), "--epochs", "1",
                                      "--quiet", "--no-export", "--workers", "0", "--device", "cpu"])
    assert pasted.exit_code == 0, pasted.output
    assert json.loads((tmp_path / "kept" / "scan.json").read_text())["root"] == str(tiny_zoo)


@pytest.mark.parametrize("command", ["lr-find", "sweep"])
def test_the_next_line_names_absolute_paths_and_runs_pasted_from_another_folder(tiny_zoo, tmp_path, monkeypatch,
                                                                                 command):
    """Session 35's walk-through (helper-153): the `next: zoo finetune ...` line of lr-find and sweep gave --data and
    --config as typed (`--data data --config lr/config.yaml`): pasted from another folder, the command failed. The
    line names the folder the command scanned and its own out folder absolutely (quoted as every pasted line),
    through io.new_run_command, the one spelling of a new run."""
    monkeypatch.chdir(tmp_path)
    short = ["--lr", "1e-3", "--epochs", "1"] if command == "sweep" else ["--steps", "10"]
    r = CliRunner().invoke(cli, [command, "tiny-resnet", "--data", tiny_zoo.name, "--out", "o", "--freeze", "head",
                                 *short, *COMMON])
    assert r.exit_code == 0, r.output
    argv = _next_command(r.output)
    assert argv[argv.index("--data") + 1] == str(tiny_zoo)
    assert os.path.isabs(argv[argv.index("--config") + 1]), argv
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = CliRunner().invoke(cli, [*argv, "--epochs", "1", "--no-export", "--out", "run"])
    assert r.exit_code == 0, r.output
