"""`zoo finetune --fc-dropout P` (VGG's FC-4096 dropout, ``zoo.network.builder_kwargs``) across the lines that
name the run again (helper-119): model.json records the P the run used, a resume builds with it, and the start-over
line (``rerun.start_over_command``) carries it, so that pasted it trains the same network. VGG itself is too big
for these tests: the tiny entry (test_resnet, whose ``drop_rate`` is a dropout before its classifier) stands in,
``has_fc_dropout`` saying it has the FC dropout."""
from __future__ import annotations

import json

import zoo.jobs.finetune
import zoo.jobs.resume
import zoo.network
from tests.conftest import register_tiny
from tests.zoo.test_cli_export_predict_eval import pasted
from tests.zoo.test_cli_finetune import _interrupted_run, _start_over, invoke


def _with_fc_dropout(tmp_path, monkeypatch) -> tuple[str, list]:
    """The tiny entry, taken for a model with the FC dropout; the networks built for training (zoo.jobs' builds)."""
    tiny = register_tiny(tmp_path, monkeypatch)
    monkeypatch.setattr(zoo.network, "has_fc_dropout", lambda entry: entry.name == tiny)
    monkeypatch.setattr(zoo.jobs.resume, "has_fc_dropout", lambda entry: entry.name == tiny)
    built: list = []
    for module in (zoo.jobs.finetune, zoo.jobs.resume):
        real = module.build_for_training
        monkeypatch.setattr(module, "build_for_training",
                            lambda *a, real=real, **k: built.append(real(*a, **k)) or built[-1])
    return tiny, built


def test_the_start_over_of_a_run_given_fc_dropout_trains_with_it_again(tmp_path, monkeypatch):
    """Before: the start-over line left --fc-dropout out, so pasted it trained with the original 0.5 (and recorded
    0.5 in model.json); the resume itself built with the run's 0.3 (model.json)."""
    tiny, built = _with_fc_dropout(tmp_path, monkeypatch)
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny, extra=("--fc-dropout", "0.3"))
    assert json.loads((run / "model.json").read_text())["builder_kwargs"] == {"drop_rate": 0.3}
    assert built[-1].drop_rate == 0.3
    (run / "checkpoints" / "best.safetensors").unlink()     # a resume that names the start-over
    res = invoke("finetune", "--resume", run)
    assert built[-1].drop_rate == 0.3        # the resume's build: model.json's P
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        f"`{_start_over(run, tiny, data, '--fc-dropout', '0.3', '--no-export')}`"), res.output
    again = pasted(res.stderr, "start the run over with")
    assert again.exit_code == 0, again.output
    assert built[-1].drop_rate == 0.3
    assert json.loads((run / "model.json").read_text())["builder_kwargs"] == {"drop_rate": 0.3}


def test_a_run_without_fc_dropout_given_records_and_names_the_one_it_used(tmp_path, monkeypatch):
    """No --fc-dropout: the network's default (0.5, VGG's original) is recorded, and the line names it, exactly."""
    tiny, built = _with_fc_dropout(tmp_path, monkeypatch)
    data, run, _ = _interrupted_run(tmp_path, monkeypatch, tiny)
    assert json.loads((run / "model.json").read_text())["builder_kwargs"] == {"drop_rate": 0.5}
    (run / "checkpoints" / "best.safetensors").unlink()
    res = invoke("finetune", "--resume", run)
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        f"`{_start_over(run, tiny, data, '--fc-dropout', '0.5', '--no-export')}`"), res.output


def test_the_lines_after_a_sweep_given_fc_dropout_name_it(tmp_path, monkeypatch):
    """The sweep's `next:` line and the best trial's new run (``rerun.best_trial_command``, said of a kept trial)
    left --fc-dropout out, though sweep.json records it: the new run trained with the original 0.5. Review
    (helper-123): each line names it exactly, by one rule (``rerun.model_flags``): sweep's and lr-find's `next:`
    lines wrote ``:g`` (0.1234567 as 0.123457), the best trial's line ``repr``."""
    import shlex

    from finetune.core.rerun import best_trial_command
    from tests.conftest import make_image_folder

    tiny, _ = _with_fc_dropout(tmp_path, monkeypatch)
    data, out = make_image_folder(tmp_path / "data", per_class=6), tmp_path / "sweep"
    p = "0.1234567"
    res = invoke("sweep", tiny, "--data", data, "--out", out, "--lr", "1e-3", "--epochs", "1", "--fc-dropout", p,
                 "--freeze", "head", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    assert res.exit_code == 0, res.output
    (nxt,) = [ln for ln in res.output.splitlines() if ln.startswith("next: ")]
    assert shlex.split(nxt)[-2:] == ["--fc-dropout", p], nxt
    assert shlex.split(best_trial_command(out))[-2:] == ["--fc-dropout", p]
    res = invoke("lr-find", tiny, "--data", data, "--out", tmp_path / "lr", "--steps", "10", "--fc-dropout", p,
                 "--freeze", "none", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    assert res.exit_code == 0, res.output
    (nxt,) = [ln for ln in res.output.splitlines() if ln.startswith("next: ")]
    assert shlex.split(nxt)[-2:] == ["--fc-dropout", p], nxt
