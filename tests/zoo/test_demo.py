"""`zoo demo` end to end on a reduced size: real digits, real packaged ImageNet weights, no network."""
import json

import pytest
from click.testing import CliRunner

from zoo.cli import cli


def test_demo_runs_the_whole_journey_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--train-per-class", "3", "--val-per-class", "2",
                                      "--test-per-class", "2", "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    # each step ran, and the policy's decision was printed
    for marker in ("$ zoo import efficientnet_lite0", "$ zoo finetune efficientnet_lite0", "-> training the head only",
                   "$ zoo predict", "$ zoo eval", "accuracy:"):
        assert marker in result.output, marker
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test", "train", "val"]
    assert (out / "run" / "export" / "model.safetensors").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 20 and metrics["split"] == "test"
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("mine", ["run/metrics.csv", "data/cats/a.png", "notes.txt"])
def test_demo_refuses_a_folder_it_did_not_make(tmp_path, mine):
    """A folder the demo did not make is refused if anything is in it (QA helper-53: the digits went into a
    user's own data/ beside their classes), before anything is written; a bad --lr too, not at step 3."""
    (tmp_path / mine).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / mine).write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not empty and was not made by `zoo demo`: pass a new or empty --out" in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before    # nothing touched
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "new"), "--lr", "-1"])
    assert result.exit_code == 2 and "invalid lr=-1.0 (--lr)" in result.output and not (tmp_path / "new").exists()


def test_a_second_demo_replaces_the_first(tmp_path):
    from zoo.demo import MARKER, prepare_out

    out = tmp_path / "demo"
    assert prepare_out(out) is False and (out / MARKER).is_file()
    (out / "run").mkdir()
    (out / "run" / "metrics.csv").write_text("x")
    assert prepare_out(out) is True                               # the demo's own folder: replaced
    assert not (out / "run").exists() and (out / MARKER).is_file()
