"""What scripts/fuzz_options.py (random combinations of `zoo finetune`'s options on tiny data) found, each at its
smallest command; and the fuzz itself on two runs, so the tool keeps working."""
from __future__ import annotations

import json
import math

from click.testing import CliRunner

from tests.conftest import load_script, make_image_folder, register_tiny
from zoo.cli import cli


def test_a_validation_loss_that_is_not_finite_is_a_divergence_not_a_missing_checkpoint(tmp_path, monkeypatch):
    """Fuzz (helper-132): `--lr 1e9 --optimizer sgd --freeze none --head-epochs 0 --epochs 1` took one step whose
    training loss (taken before the update) was fine, then validated NaN: no epoch improved on NaN, and the run
    ended "training finished ... but its bundle was not written: ... the run saved no best checkpoint; train it
    again" with the same command. A NaN/inf validation loss is the divergence the training loss would show one
    step later: the same one line as a NaN training loss (exit 1), saying to lower the learning rate. (The
    NaN is made here by the validation pass itself, so the test does not depend on how the weights overflow.)"""
    from finetune.engine.epoch_steps import LoaderSteps

    real = LoaderSteps.evaluate

    def nan_loss(self, full=False):
        return {**real(self, full), "loss": math.nan}

    monkeypatch.setattr(LoaderSteps, "evaluate", nan_loss)
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    r = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(tmp_path / "run"), "--lr", "1e9",
                                 "--optimizer", "sgd", "--freeze", "none", "--head-epochs", "0", "--epochs", "1",
                                 "--workers", "0", "--device", "cpu", "--quiet"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("zoo: error")]
    assert errors == ["zoo: error: loss diverged after epoch 1 (its validation loss is nan): lower the learning rate "
                      "(was 1e+09)"] and r.exit_code == 1, r.output
    assert not (tmp_path / "run" / "export").exists()


def test_the_fuzz_draws_the_same_runs_and_checks_them(tmp_path):
    """scripts/fuzz_options.py: a run's options depend on (seed, index) alone; a drawn run is checked end to end
    (exit, bundle scored by `zoo eval` on the run's validation images) and logged."""
    fuzz = load_script("fuzz_options")
    assert fuzz.draw(0, 5) == fuzz.draw(0, 5) and fuzz.draw(0, 5) != fuzz.draw(1, 5)
    env = fuzz.setup(tmp_path)
    spec = {"index": 0, "data": "flat", "mode": "plain", "config_keys": [],
            "opts": {"--epochs": 1, "--freeze": "none", "--batch-size": 8}}
    result = fuzz.check_run(spec, env, [], tmp_path, timeout=300)
    assert result["kind"] == "ok", result
    assert json.loads(json.dumps(result))["rc"] == 0


def test_the_fuzz_s_config_file_runs_check_the_typed_value_won(tmp_path):
    """The config-file runs (helper-142): a key in the file and typed too must end as typed in what the run
    recorded; a run that recorded the file's value is caught as `file-won`. Click's usage errors count as refusals."""
    import yaml

    fuzz = load_script("fuzz_options")
    assert fuzz.draw(3, 4, file_share=1.0) == fuzz.draw(3, 4, file_share=1.0)
    assert fuzz.draw(0, 5, file_share=0.0) == fuzz.draw(0, 5)       # (share 0: helper-132's draws)
    env = fuzz.setup(tmp_path)
    spec = {"index": 0, "mode": "file", "command": "finetune",
            "file": {"model": "tiny32", "data": "flat", "epochs": 2, "seed": 1, "out": "run0-file", "quiet": True},
            "line": {"epochs": 1, "seed": 2, "out": "run0", "device": "cpu", "workers": 0, "freeze": "none"}}
    result = fuzz.check_file_run(spec, env, [], tmp_path, timeout=300)
    assert result["kind"] == "ok", result
    run = tmp_path / "run0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 1}))      # as if the file had won
    assert fuzz.typed_wins(spec, run, tmp_path)[0] == "file-won"
    usage = "Usage: zoo finetune [OPTIONS] [MODEL]\nTry 'zoo finetune --help' for help.\n\nError: MODEL is required\n"
    assert fuzz.classify(2, "", usage) == ("refused", "Error: MODEL is required")
