"""Resume: an interrupted run continued with resume=True ends with exactly the uninterrupted weights."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from finetune.core.checkpoint import BEST, HEAD_BEST, LAST, load_checkpoint, load_weights
from finetune.core.errors import CheckpointError, ConfigError, Interrupted
from tests.finetune.test_train import DEVICES, cfg, devices, run, sets, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sets(tmp_path_factory.mktemp("resumedata") / "data")


# Augmentation on, MLP head with dropout, head warm-up then finetuning with a cosine schedule: every
# source of randomness and every piece of state (optimizer, scheduler, phase, early stopping) is in play.
def resume_cfg(**kw):
    base = dict(epochs=4, freeze="none", head_epochs=1, head="mlp", mlp_hidden=8, mlp_dropout=0.3,
                schedule="cosine", warmup_epochs=0.5, patience=10, optimizer="adam", lr=3e-3)
    base.update(kw)
    return cfg(**base)


def equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run(data, resume_cfg(), run_dir=out)
    return result


def _stop_after(k: int):
    def cb(row):
        if row["epoch"] == k:
            raise KeyboardInterrupt
    return cb


@pytest.mark.parametrize("k", [1, 2])   # at the head -> finetune boundary, and inside the finetune phase
def test_resume_after_interrupt_matches_uninterrupted(data, reference, tmp_path, k):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        run(data, resume_cfg(), run_dir=out, callbacks=[_stop_after(k)])
    assert f"zoo finetune --resume {out}" in str(info.value)
    saved = torch.load(out / LAST, weights_only=True)
    assert saved["epoch"] == k
    before = saved["seconds"]
    # a fresh, differently initialised model: everything must come from the checkpoint
    resumed = run(data, resume_cfg(), run_dir=out, resume=True, model=tiny_model(seed=123))
    assert equal_states(resumed.model.state_dict(), reference.model.state_dict())
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in reference.history]
    assert resumed.best_epoch == reference.best_epoch
    # the head guard decides the same after a resume (the head phase's weights come from head.safetensors)
    guard = json.loads((out / "summary.json").read_text())["head_guard"]
    assert guard is not None and guard == json.loads((reference.run_dir / "summary.json").read_text())["head_guard"]
    # the summary's time counts the interrupted process's too, up to its last checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"] == pytest.approx(before + summary["seconds_this_process"], abs=0.002)
    assert before > 0 and "seconds_this_process" not in json.loads((reference.run_dir / "summary.json").read_text())
    final = torch.load(out / LAST, weights_only=True)
    ref_final = torch.load(reference.run_dir / LAST, weights_only=True)
    assert equal_states(final["model"], ref_final["model"])


def test_resume_is_exact_with_two_workers(data, tmp_path):
    """Persistent DataLoader workers: each sample's augmentation is seeded from (epoch seed, index), so an
    interrupted run resumed in fresh workers equals the uninterrupted one bit for bit; and the draws do
    not depend on the worker count at all (0 workers gives the same run)."""
    config = resume_cfg(workers=2, epochs=3)
    full = run(data, config, run_dir=tmp_path / "full")

    def sigint_after_2(row):      # a real SIGINT to this process while its 2 workers are alive
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "cut", callbacks=[sigint_after_2])
    assert torch.load(tmp_path / "cut" / LAST, weights_only=True)["epoch"] == 2
    resumed = run(data, config, run_dir=tmp_path / "cut", resume=True, model=tiny_model(seed=123))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert equal_states(resumed.model.state_dict(), full.model.state_dict())
    single = run(data, config.replace(workers=0), run_dir=tmp_path / "w0")
    assert [r["train_loss"] for r in single.history] == [r["train_loss"] for r in full.history]


def test_resume_before_first_epoch_completes(data, reference, tmp_path, monkeypatch):
    """Interrupted inside epoch 1: the epoch-0 checkpoint lets the run start over identically."""
    import finetune.engine.epoch_steps as loop

    out = tmp_path / "run"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "train_one_epoch", ctrl_c)
        with pytest.raises(Interrupted, match="interrupted: before the first epoch ended; the run is in "):
            run(data, resume_cfg(), run_dir=out)
    resumed = run(data, resume_cfg(), run_dir=out, resume=True)
    assert equal_states(resumed.model.state_dict(), reference.model.state_dict())


def test_resume_refuses_changed_options(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(data, resume_cfg(), run_dir=out, callbacks=[_stop_after(1)])
    with pytest.raises(ConfigError, match="lr"):
        run(data, resume_cfg(lr=1e-1), run_dir=out, resume=True)


def test_resume_without_checkpoint(data, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(data, resume_cfg(), run_dir=tmp_path / "nothing", resume=True)


def test_kill_9_loses_at_most_the_epoch_in_progress(data, reference, tmp_path):
    """A subprocess is SIGKILLed while epoch 3 runs; resuming from what is on disk gives the same weights."""
    out = tmp_path / "run"
    marker = tmp_path / "epoch2.done"
    train, val = data
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        sys.path.insert(0, {str(ROOT)!r})
        from finetune.data import ImageSet
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        from tests.finetune.test_resume import resume_cfg
        from finetune.tools.train import fit
        train = ImageSet({train.items!r}, {train.classes!r})
        val = ImageSet({val.items!r}, {val.classes!r})
        def cb(row):
            if row["epoch"] == 2:
                pathlib.Path({str(marker)!r}).write_text("x")
                time.sleep(120)   # "epoch 3 in progress" when the kill comes
        fit(tiny_model(), STAGES, DATA_CONFIG, train, val, resume_cfg(), head="fc", run_dir={str(out)!r},
            callbacks=[cb])
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "training subprocess died"
            assert time.time() < deadline, "training subprocess too slow"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(out / LAST, weights_only=True)["epoch"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    resumed = run(data, resume_cfg(), run_dir=out, resume=True)
    assert equal_states(resumed.model.state_dict(), reference.model.state_dict())


def test_resuming_a_finished_run_with_more_epochs_says_it_is_not_extended(data, tmp_path):
    """QA: `--resume RUN --epochs 10` on a run that had finished trained nothing and said nothing. It
    still trains nothing (the LR schedule ended), and now says so and what to do."""
    out = tmp_path / "run"
    run(data, cfg(epochs=2, freeze="none", head_epochs=0), run_dir=out)
    lines: list[str] = []
    again = run(data, cfg(epochs=5, freeze="none", head_epochs=0), run_dir=out, resume=True, log=lines.append)
    assert len(again.history) == 2
    (note,) = [ln for ln in lines if ln.startswith("note: this run had finished")]
    assert "after epoch 2" in note and "--epochs 5 does not extend a finished run" in note
    assert json.loads((out / "summary.json").read_text())["max_epochs"] == 2     # (was 5: helper-102)
    lines.clear()
    run(data, cfg(epochs=2, freeze="none", head_epochs=0), run_dir=out, resume=True, log=lines.append)
    assert not [ln for ln in lines if ln.startswith("note: this run had finished")]


@pytest.mark.parametrize("asked", [5, 1])
def test_a_finished_run_resumed_for_its_summary_with_other_epochs_says_so_and_keeps_its_own(data, tmp_path,
                                                                                           monkeypatch, asked):
    """A run stopped after its last checkpoint, before summary.json (the resume writes it, training nothing),
    resumed with `--epochs 5`: summary.json recorded `max_epochs: 5` without a word (fuzz of helper-98, left).
    Now one note says it (the LR schedule ended) and summary.json keeps the run's own max_epochs, as an
    uninterrupted run writes it; `--epochs 1` too (fewer than trained: refused only for an unfinished run)."""
    import finetune.engine.runfolder as runfolder

    out, real = tmp_path / "run", runfolder.RunFolder.summary

    def ctrl_c(self, summary):
        raise KeyboardInterrupt

    monkeypatch.setattr(runfolder.RunFolder, "summary", ctrl_c)
    with pytest.raises(Interrupted):
        run(data, cfg(epochs=2, freeze="none", head_epochs=0), run_dir=out)
    monkeypatch.setattr(runfolder.RunFolder, "summary", real)
    lines: list[str] = []
    again = run(data, cfg(epochs=asked, freeze="none", head_epochs=0), run_dir=out, resume=True, log=lines.append)
    assert len(again.history) == 2
    (note,) = [ln for ln in lines if ln.startswith("note: the training of this run had finished")]
    assert note.endswith(f"and writes summary.json; --epochs {asked} does not "
                         f"{'extend' if asked > 2 else 'change'} a finished run (its LR schedule ended; max_epochs "
                         "stays 2): start a new run to train longer")
    assert json.loads((out / "summary.json").read_text())["max_epochs"] == 2


def test_resuming_with_fewer_epochs_than_trained_is_refused_and_changes_nothing(data, tmp_path):
    """QA: `--resume RUN --epochs 1` of a run interrupted after epoch 2 trained a third epoch and marked the
    run finished, so that it could no longer be continued to the epochs it was started with."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(data, resume_cfg(), run_dir=out, callbacks=[_stop_after(2)])
    before = (out / LAST).read_bytes()
    for fewer in (1, 2):
        with pytest.raises(ConfigError, match=rf"has trained 2 epochs, and --epochs counts them all \(here {fewer}: "
                                              r"none is left\): pass more than 2 to continue"):
            run(data, resume_cfg(epochs=fewer), run_dir=out, resume=True)
    assert (out / LAST).read_bytes() == before
    assert len(run(data, resume_cfg(), run_dir=out, resume=True).history) == 4


def test_an_interrupted_rank_other_than_0_does_not_say_nothing_was_saved(data, tmp_path, monkeypatch):
    """QA: SIGTERM to `torchrun ... zoo finetune` printed rank 0's "epochs up to 42 are saved in RUN", then
    rank 1's "nothing was saved: pass a run folder to be able to resume". Rank 1 (a run folder it does not
    write) now points at the same resume."""
    from finetune.engine import runfolder

    real_init = runfolder.RunFolder.__init__

    def as_rank_1(self, *a, **k):
        real_init(self, *a, **k)
        self.writes = False

    monkeypatch.setattr(runfolder.RunFolder, "__init__", as_rank_1)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        run(data, resume_cfg(), run_dir=out, callbacks=[_stop_after(1)])
    assert str(info.value) == f"interrupted: rank 0 saves {out}; continue with `zoo finetune --resume {out}`"


def test_a_resumed_run_keeps_its_head_solve_in_the_summary(data, tmp_path):
    """QA: the L-BFGS solve's path (val loss/acc per C) lived only in the head steps, so a run resumed after its
    head phase wrote summary.json with head_solver null; the checkpoint carries it."""
    config = cfg(epochs=3, freeze="none", fast_head=True, head_epochs=-1)
    run(data, config, run_dir=tmp_path / "full")
    with pytest.raises(Interrupted):
        run(data, config, run_dir=tmp_path / "cut", callbacks=[_stop_after(2)])
    run(data, config, run_dir=tmp_path / "cut", resume=True, model=tiny_model(seed=123))
    full, cut = (json.loads((tmp_path / d / "summary.json").read_text())["head_solver"] for d in ("full", "cut"))
    assert full and cut == full


# ---- the accelerator's paths across a resume: the CPU case here, the CUDA case in `pytest -m gpu` ----------
def _cut_and_resume(data, config, out, k: int, keep=None):
    """``config``'s run interrupted after epoch ``k``, then resumed into a fresh, differently initialised model
    (``keep``: a copy of the interrupted run folder is left there)."""
    with pytest.raises(Interrupted):
        run(data, config, run_dir=out, callbacks=[_stop_after(k)])
    cut = load_checkpoint(out / LAST)
    if keep is not None:
        shutil.copytree(out, keep)
    return cut, run(data, config, run_dir=out, resume=True, model=tiny_model(seed=123))


def _same_run(resumed, full, device: str) -> None:
    """The resumed run is the uninterrupted one: bit for bit on the CPU; on CUDA (cuDNN deterministic) within
    float32 rounding of the losses, 1e-3 relative: a lost piece of state (the loss scale, the average, an
    optimizer moment) moves this tiny model's losses by percents (an Adam step on a gradient of ~0 may take
    either sign from one rounding, so the weights themselves are compared on the CPU only)."""
    losses = [[r[k] for r in h.history] for h in (resumed, full) for k in ("train_loss", "val_loss")]
    assert all(math.isfinite(v) for row in losses for v in row)
    if device == "cpu":
        assert losses[:2] == losses[2:]
        assert equal_states(resumed.model.state_dict(), full.model.state_dict())
    else:
        assert losses[0] == pytest.approx(losses[2], rel=1e-3) and losses[1] == pytest.approx(losses[3], rel=1e-3)


def _loads_on_the_cpu(run_dir, model) -> dict:
    """last.pt and the weights files of ``run_dir`` load into a CPU copy of ``model`` (plain key names: no
    ``_orig_mod.`` of torch.compile, no ``module.`` of DDP), as on a machine without a GPU."""
    ckpt = load_checkpoint(run_dir / LAST, map_location="cpu")
    plain = copy.deepcopy(model).cpu()
    keys = set(plain.state_dict())
    states = [ckpt["model"], load_weights(run_dir / BEST)] + ([ckpt["ema"]["model"]] if ckpt["ema"] else [])
    states += [load_weights(run_dir / HEAD_BEST)] if (run_dir / HEAD_BEST).is_file() else []
    for state in states:
        assert set(state) == keys and all(t.device.type == "cpu" for t in state.values())
        plain.load_state_dict(state)
    return ckpt


@pytest.mark.parametrize("device", devices(slow_on_cpu=True))
def test_compile_with_ema_resumes_as_the_uninterrupted_run(data, tmp_path, monkeypatch, device):
    """--compile --ema after a solved head (the default departure): the network and the average are trained
    and validated through torch.compile's wrappers, whose state_dict keys carry ``_orig_mod.``; last.pt, the
    average in it and the weights files hold the plain names, and a run interrupted inside the finetune phase
    resumes (its average included) into the uninterrupted run. The CPU case is slow: Inductor's first C++
    compile of the graphs takes ~30 s on 2 cores (~10 s once its disk cache is warm)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    config = resume_cfg(device=device, compile=True, ema=0.9, fast_head=True, head="linear", epochs=3)
    full = run(data, config, run_dir=tmp_path / "full")
    assert [r["phase"] for r in full.history] == ["head", "finetune", "finetune"]
    assert next(full.model.parameters()).device.type == device
    cut, resumed = _cut_and_resume(data, config, tmp_path / "cut", 2)
    assert cut["ema"] is not None and cut["ema"]["updates"] > 0        # the average was live at the cut
    _same_run(resumed, full, device)
    for out in ("full", "cut"):
        _loads_on_the_cpu(tmp_path / out, full.model)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_loss_scaling_resumes_where_it_stopped(data, tmp_path, monkeypatch, device):
    """AMP in fp16 with a GradScaler (a V100 or T4; on the CPU, whose autocast computes fp16 too, forced
    here): the scaler's scale and growth count are in last.pt, so a resumed run skips and scales the same
    steps as the uninterrupted one. The scaler starts at 2**20 and grows after every 2 good steps, so fp16
    overflows again and again in these 9 steps: a scaler restarted from scratch on resume skips other
    steps and trains other weights. The interrupted run also resumes on a machine without a GPU (or fp16)."""
    from finetune.engine import runtime
    from finetune.engine import setup as setup_module

    class Eager(torch.amp.GradScaler):
        def __init__(self, device="cuda", init_scale=2.0 ** 20, growth_factor=2.0, backoff_factor=0.5,
                     growth_interval=2, enabled=True):
            super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", Eager)
    monkeypatch.setattr(runtime, "bf16_native", lambda dev: False)      # fp16 on any GPU, as on a V100/T4
    if device == "cpu":     # amp_policy gives the CPU full precision: fp16 autocast with a scaler, as on CUDA
        monkeypatch.setattr(setup_module, "amp_policy",
                            lambda dev, enabled, info=None: runtime.AmpPolicy("cpu", torch.float16 if enabled else None))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    config = resume_cfg(device=device, epochs=3)
    full = run(data, config, run_dir=tmp_path / "full")
    cut, resumed = _cut_and_resume(data, config, tmp_path / "cut", 2, keep=tmp_path / "elsewhere")
    scaler = _loads_on_the_cpu(tmp_path / "full", full.model)["scaler"]
    assert scaler["scale"] < 2.0 ** 20 and cut["scaler"]["scale"] < 2.0 ** 20       # fp16 did overflow
    assert _loads_on_the_cpu(tmp_path / "cut", full.model)["scaler"] == scaler
    _same_run(resumed, full, device)
    monkeypatch.setattr(setup_module, "amp_policy", runtime.amp_policy)     # the CPU's own: full precision
    on_cpu = run(data, config.replace(device="cpu"), run_dir=tmp_path / "elsewhere", resume=True)
    losses = [r["train_loss"] for r in on_cpu.history]
    assert len(losses) == 3 and losses[:2] == [r["train_loss"] for r in cut["history"]] and math.isfinite(losses[2])
