"""``fit`` as a library call in someone else's process (a script, a notebook): it leaves the process-global state as
it found it, whether the run ends, is interrupted or fails; twice in a row and from another thread too."""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from finetune.core.errors import DivergedError, Interrupted
from tests.finetune.test_train import cfg, data, run, tiny_model  # noqa: F401 (data: the fixture)

SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None),
                       getattr(signal, "SIGUSR1", None)) if s is not None]


def process_state() -> dict:
    """What a torch user sets for their own process and expects a library call to leave alone."""
    root = logging.getLogger()
    return {
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].tolist(),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.enabled),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul": torch.get_float32_matmul_precision(),
        "warnings": list(warnings.filters),
        "logging": (root.level, list(root.handlers),
                    {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
                     for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}),
        "excepthook": sys.excepthook,
        "signals": {s: signal.getsignal(s) for s in SIGNALS},
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "streams": (sys.stdout, sys.stderr),
    }


def lingering() -> tuple[set, list]:
    """Threads and child processes still alive, after a short grace for those already told to end."""
    deadline = time.monotonic() + 10
    while True:
        threads = {t.name for t in threading.enumerate() if t is not threading.current_thread()}
        children = multiprocessing.active_children()
        if (threads <= BASE_THREADS and not children) or time.monotonic() > deadline:
            return threads - BASE_THREADS, children
        time.sleep(0.05)


BASE_THREADS: set = set()


def users_own_settings():
    """The process as a user may have set it before calling ``fit``."""
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch.backends.cudnn.benchmark = False
    warnings.simplefilter("default")


def assert_same(before: dict, after: dict) -> None:
    # (loggers made since, by a module imported on first use, are new: not changed)
    kept = {k: v for k, v in after["logging"][2].items() if k in before["logging"][2]}
    after = {**after, "logging": (*after["logging"][:2], kept)}
    changed = [key for key, value in before.items()
               if not (torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key])]
    assert not changed, {key: (before[key], after[key]) for key in changed if key not in ("torch_rng", "numpy_rng")}


def stop_at_epoch_1(row):
    raise KeyboardInterrupt


@pytest.mark.parametrize("ending", ["end", "interrupt", "error"])
@pytest.mark.parametrize("workers", [0, 1])
def test_fit_leaves_the_process_as_it_found_it(data, tmp_path, ending, workers):
    """Normal end, Ctrl-C after epoch 1 (a callback's KeyboardInterrupt), a diverging run: torch's, Python's and
    NumPy's global RNG, the thread count, dtype, cudnn flags, warnings filters, logging, excepthook, signal
    handlers, environment; no thread or worker process left behind."""
    BASE_THREADS.update(t.name for t in threading.enumerate())
    model = tiny_model()      # (seeds torch: before the user's own seeding)
    users_own_settings()
    before = process_state()
    config = cfg(freeze="none", epochs=2, workers=workers)
    if ending == "end":
        run(data, config, model=model, run_dir=tmp_path / "run")
    elif ending == "interrupt":
        with pytest.raises(Interrupted):
            run(data, config, model=model, run_dir=tmp_path / "run", callbacks=[stop_at_epoch_1])
    else:
        model.poison = True
        with pytest.raises(DivergedError):
            run(data, config, model=model, run_dir=tmp_path / "run")
    after = process_state()
    assert_same(before, after)
    threads, children = lingering()
    assert not threads and not children


def test_fit_twice_in_a_process_and_from_another_thread_gives_the_same_run(data):
    """A notebook re-runs its cell: the second ``fit`` (a fresh model, the same seed) trains the same numbers as
    the first; so does one called from a worker thread (where no signal handler can be set)."""
    first = run(data, cfg(freeze="none", epochs=2)).history
    second = run(data, cfg(freeze="none", epochs=2)).history
    box: dict = {}

    def in_thread():
        try:
            box["history"] = run(data, cfg(freeze="none", epochs=2)).history
        except BaseException as e:      # the assertion below shows it
            box["error"] = e

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert "error" not in box, box.get("error")
    keys = ("train_loss", "val_loss", "val_acc")
    for other in (second, box["history"]):
        assert [[r[k] for k in keys] for r in other] == [[r[k] for k in keys] for r in first]


def test_fit_restores_the_callers_cudnn_benchmark(data, monkeypatch):
    """A CUDA run turns cudnn.benchmark on or off for itself (``runtime.cudnn_autotune``, process-wide): the
    caller's setting comes back when ``fit`` returns. (On this CPU the autotune is made to set it as on CUDA.)"""
    import finetune.engine.setup as setup_module

    def as_on_cuda(device, network_steps):
        torch.backends.cudnn.benchmark = True
        return True

    monkeypatch.setattr(setup_module, "cudnn_autotune", as_on_cuda)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run(data, cfg(freeze="none"))
    assert torch.backends.cudnn.benchmark is False


NOTEBOOK_SCRIPT = r"""
import multiprocessing, os, sys, types
from tests.finetune.test_host_process import notebook_stream
from tests.finetune.test_train import cfg, run, sets
os.environ.pop("TQDM_DISABLE", None)     # (set by tests.conftest, which the line above imports)
stream = notebook_stream()
sys.stderr = stream
from finetune.core.progress import LogLines, progress_bar
with progress_bar(3, "pass", unit="img") as bar:
    assert not isinstance(bar, LogLines) and not bar.disable, bar     # tqdm's bar, its lock made
    bar.update(3)
try:
    from pathlib import Path
    run(sets(Path(sys.argv[1])), cfg(freeze="none", workers=1, quiet=False))
finally:
    sys.stderr = sys.__stderr__
print("start method:", multiprocessing.get_start_method(allow_none=True))
multiprocessing.set_start_method("spawn")
"""


def notebook_stream(monkeypatch=None):
    """An object like ipykernel's OutStream (a notebook cell's stdout/stderr): not a terminal, ``write``/``flush``,
    its class ``ipykernel.iostream.OutStream`` (the module is made here: ipykernel is not installed for tests;
    with ``monkeypatch`` it leaves ``sys.modules`` when the test ends)."""
    import types

    module = sys.modules.get("ipykernel.iostream")
    if module is None:
        module = types.ModuleType("ipykernel.iostream")

        class OutStream:
            def __init__(self) -> None:
                self.writes: list[str] = []

            def write(self, text: str) -> int:
                self.writes.append(text)
                return len(text)

            def flush(self) -> None:
                pass

            def isatty(self) -> bool:
                return False

        module.OutStream = OutStream
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, "ipykernel.iostream", module)
        else:
            sys.modules["ipykernel.iostream"] = module
    return module.OutStream()


def test_fit_and_its_bars_leave_the_start_method_to_the_caller(tmp_path):
    """A notebook runs ``fit`` (a tqdm bar, a DataLoader with a worker), then sets the start method its own code
    needs: that worked before any bar or loader only. tqdm's first bar and a DataLoader each asked multiprocessing
    for its default context, which fixes the method: ``set_start_method("spawn")`` then raised RuntimeError.
    (The script drops the TQDM_DISABLE that tests.conftest sets on import: with it every bar was a silent LogLines
    and the test passed without the tqdm lock's fix.)"""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", NOTEBOOK_SCRIPT, str(tmp_path / "data")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "start method: None" in done.stdout


def test_a_notebook_gets_a_bar_redrawn_in_place_not_a_line_a_minute(monkeypatch):
    """In a notebook stderr is the kernel's stream, neither a terminal nor a log file: the bar is tqdm.auto's (a
    widget with ipywidgets; without, tqdm's text bar, which the notebook redraws in place on its carriage returns),
    not LogLines, which showed nothing for the first minute of each pass. Redraws are tqdm's (at most 10 a second),
    not one line a step, and the bar is cleared when it closes."""
    from finetune.core.progress import LogLines, progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = notebook_stream(monkeypatch)
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar(2000, "epoch 1/1 finetune", unit="batch") as bar:
        assert not isinstance(bar, LogLines) and not bar.disable
        assert "epoch 1/1 finetune" in "".join(stream.writes)     # shown from the start
        for _ in range(2000):
            bar.update(1)
    text = "".join(stream.writes)
    assert "\n" not in text.rstrip("\n") and len(stream.writes) < 200     # redrawn in place, not a line a step
    assert text.endswith("\r")          # cleared (leave=False): the cell keeps no stale bar


def test_a_callers_float64_default_dtype_neither_changes_the_run_nor_is_lost(data):
    """A notebook that set ``torch.set_default_dtype(torch.float64)`` for its own work: the run drew its new head's
    init in double precision (another run from the same seed: epoch 1's val loss 1.108 against 1.086); it now
    trains as in a fresh process, and the caller's default is float64 again afterwards."""
    keys = ("train_loss", "val_loss", "val_acc")
    fresh = run(data, cfg(freeze="none", epochs=2)).history
    model = tiny_model()          # (the caller's network, built before: only what the run makes is at stake)
    torch.set_default_dtype(torch.float64)
    try:
        history = run(data, cfg(freeze="none", epochs=2), model=model).history
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in fresh]



def test_the_rng_guard_neither_initialises_cuda_nor_leaves_the_runs_seed_for_it(monkeypatch):
    """``fit``'s guard (``seeding.preserved_rng``) in a process with a GPU where CUDA is not initialised (simulated:
    no GPU on this box; only the guard's CUDA calls are stood in for). It read CUDA's generator states, which
    initialises CUDA: seconds for a CPU run, and in a process forked after its parent used CUDA an error before the
    run began ("Cannot re-initialize CUDA in forked subprocess"). It now reads them only where CUDA is initialised
    (as the checkpoints do), and on exit seeds them with the caller's torch seed, which the run's own
    ``torch.manual_seed`` had replaced as the seed CUDA's generators get when CUDA starts."""
    from finetune.core.seeding import preserved_rng, seed_everything

    seeds: list[int] = []

    def forked_child(*_a, **_k):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you "
                           "must use the 'spawn' start method")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forked_child)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeds.append(int(seed)))
    torch.manual_seed(1234)
    with preserved_rng():
        seed_everything(7)        # what a run does at its set-up
    assert seeds == [1234, 7, 1234] and torch.initial_seed() == 1234
