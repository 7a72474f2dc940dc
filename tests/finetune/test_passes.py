"""A step in several forward passes (``--micro-batch``, ``finetune.engine.passes.take_step``): the steps of one pass,
in less memory."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.core.checkpoint import load_weights
from finetune.engine.runfolder import BEST
from tests.conftest import make_image_folder
from tests.finetune.test_distributed import TORCHRUN, _torchrun_fit, ddp_cfg
from tests.finetune.test_train import DATA_CONFIG, cfg, data, run, tiny_model  # noqa: F401 (data: a fixture)


def _same_run(a, b, dir_a, dir_b) -> None:
    assert [r["phase"] for r in a.history] == [r["phase"] for r in b.history]
    _same_history(a.history, b.history)
    _same_weights(dir_a, dir_b)


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


def _same_weights(dir_a, dir_b) -> None:
    wa, wb = load_weights(dir_a / BEST), load_weights(dir_b / BEST)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), atol=1e-5), k


@pytest.mark.parametrize("option", [{}, {"class_weights": "auto"}, {"mixup": 0.4}, {"ema": 0.9}])
def test_a_step_in_passes_trains_as_the_step_in_one_pass(data, tmp_path, monkeypatch, option):
    """27 training images at batch 9 in passes of at most 4 (3 + 3 + 3: ``pass_bounds``): the gradients of a step's
    passes add up to the one-pass step's (the loss of each pass is its part of the batch's, class-weighted too), the
    dropout masks and the mixup pairs are drawn for the whole batch, so the run's epochs and weights are the one-pass
    run's."""
    from finetune.engine import passes

    sizes: list[int] = []
    forward = passes.train_forward
    monkeypatch.setattr(passes, "train_forward", lambda model, x, *a: (sizes.append(int(x.shape[0])),
                                                                        forward(model, x, *a))[1])
    config = cfg(epochs=2, freeze="none", head_epochs=1, **option)
    one = run(data, config, run_dir=tmp_path / "one", model=tiny_model(drop_rate=0.3))
    assert set(sizes) == {9}
    sizes.clear()
    several = run(data, config.replace(micro_batch=4), run_dir=tmp_path / "passes", model=tiny_model(drop_rate=0.3))
    assert sizes[:3] == [3, 3, 3] and set(sizes) == {3}     # every step of both phases in even passes
    _same_run(several, one, tmp_path / "passes", tmp_path / "one")


def test_evaluation_in_passes_gives_the_same_numbers(data, tmp_path):
    """Validation's forward passes take at most --micro-batch images too (9 validation images in passes of 2)."""
    from finetune.data import ImageDataset, build_transform
    from finetune.engine.steps import evaluate

    model = tiny_model().eval()
    _, val = data
    ds = ImageDataset(val, build_transform(dict(DATA_CONFIG), train=False))
    batches = [(torch.stack([ds[i][0] for i in range(9)]), torch.tensor([ds[i][1] for i in range(9)]))]
    loss = torch.nn.CrossEntropyLoss()
    whole = evaluate(model, batches, loss, torch.device("cpu"), val.classes)
    passes = evaluate(model, batches, loss, torch.device("cpu"), val.classes, micro=2)
    assert passes["confusion"] == whole["confusion"]
    assert passes["loss"] == pytest.approx(whole["loss"], abs=1e-6)


def test_a_pass_of_one_image_through_a_training_batchnorm_names_the_micro_batch():
    """--bn train with --micro-batch 1 gives a BatchNorm whose maps are 1x1 one value per channel in each pass:
    refused before any step, naming the option to change (not --batch-size, which is large enough)."""
    from finetune.core.errors import ConfigError
    from finetune.core.policy import batchnorm_batch
    from finetune.core.recipe import check_batchnorm_batch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 32), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))          # 1x1 maps at 32 px
    config = cfg(freeze="none", bn="train", batch_size=8)
    assert batchnorm_batch(config, 1, 8) == 8
    assert batchnorm_batch(config.replace(micro_batch=3), 1, 8) == 3
    assert batchnorm_batch(config.replace(micro_batch=1), 1, 8) == 1
    check_batchnorm_batch(model, (3, 32, 32), 3, head="3", micro=3)
    with pytest.raises(ConfigError, match=r"\(1 gets one value per channel at 32x32 px under --bn train\): start "
                                          r"again with --micro-batch 3 or more"):
        check_batchnorm_batch(model, (3, 32, 32), 1, head="3", micro=1)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_in_passes_train_as_one_process_in_one_pass(tmp_path):
    """Under DDP the passes before a step's last one keep their gradients on the rank (``no_sync``) and the last
    one all-reduces the sum: 2 processes of 4 images each in passes of at most 3 (2 + 2), with dropout and the class
    weights of an imbalanced set (each pass divides by the whole global batch's weight), train as one process taking
    each batch of 8 in one pass."""
    from finetune.data import ImageSet, scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=10, val_per_class=3, layout="split"))
    kept = [item for item in report.train.items if item[1] != 1 or item[0].endswith(("_000.png", "_001.png",
                                                                                      "_002.png", "_003.png"))]
    train = ImageSet(kept, report.train.classes)       # 10 + 4 + 10 images: the middle class is rare
    config = ddp_cfg().replace(class_weights="auto")
    _torchrun_fit(tmp_path, train, report.val, f"""
        from finetune.core import distributed
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        result = fit(tiny_model(drop_rate=0.3), STAGES, DATA_CONFIG, train, val,
                     FinetuneConfig.from_dict({config.replace(micro_batch=3).to_dict()!r}), head="fc",
                     run_dir={str(tmp_path / "ddp")!r})
        if distributed.setup("cpu").is_main:
            json.dump(result.history, open({str(tmp_path / "history.json")!r}, "w"))
    """)
    one = run((train, report.val), config, run_dir=tmp_path / "one", model=tiny_model(drop_rate=0.3))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["phase"] for r in history] == ["head", "finetune"]
    _same_history(history, one.history)
    _same_weights(tmp_path / "ddp", tmp_path / "one")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_compiled_model_in_passes_trains_as_one_process(tmp_path):
    """``--compile`` under DDP in passes: torch.compile wraps the DDP module, and ``no_sync`` reaches DDP through the
    compiled wrapper. 2 processes of 4 images each in passes of at most 3, compiled, train as one process taking each
    batch of 8 in one pass, uncompiled. Slow: Inductor's C++ build of the graphs, ~50 s on 2 cores."""
    from finetune.data import scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=10, val_per_class=3, layout="split"))
    config = ddp_cfg()
    _torchrun_fit(tmp_path, report.train, report.val, f"""
        from finetune.core import distributed
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        result = fit(tiny_model(), STAGES, DATA_CONFIG, train, val,
                     FinetuneConfig.from_dict({config.replace(micro_batch=3, compile=True).to_dict()!r}), head="fc",
                     run_dir={str(tmp_path / "ddp")!r})
        if distributed.setup("cpu").is_main:
            json.dump(result.history, open({str(tmp_path / "history.json")!r}, "w"))
    """, timeout=600)
    one = run((report.train, report.val), config, run_dir=tmp_path / "one", model=tiny_model())
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["phase"] for r in history] == ["head", "finetune"]
    _same_history(history, one.history)
    _same_weights(tmp_path / "ddp", tmp_path / "one")


def test_a_step_in_passes_through_a_grad_scaler_is_the_one_pass_step():
    """fp16 autocast takes a GradScaler (``runtime.amp_policy`` on GPUs without bf16): each pass's backward is
    scaled, the update unscales the sum once. A CPU GradScaler over full-precision passes stands in for it."""
    from finetune.core import distributed as ddp
    from finetune.engine.passes import take_step

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 3, 32, 32, generator=g), torch.randint(0, 3, (9,), generator=g)
    weights = []
    for micro in (0, 4):
        model = tiny_model().eval()           # BatchNorm keeps its statistics, as zoo's default
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for step in (1, 2):
            loss, out = take_step(model, x, y, torch.nn.CrossEntropyLoss(), ddp.DistInfo(), step=step, amp=None,
                                  drops=None, optimizer=optimizer, scaler=scaler, micro=micro)
            assert out.shape == (9, 10) and loss.dim() == 0
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert scaler.get_scale() == 2.0 ** 10         # no step skipped as overflowed
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_in_passes_on_cuda_trains_as_one_pass(data, tmp_path, monkeypatch):
    """On the GPU (full precision, no TF32 convolutions: cuDNN's choice per batch size is the only difference)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = cfg(epochs=2, freeze="none", head_epochs=1, device="cuda", amp=False)
    one = run(data, config, run_dir=tmp_path / "one", model=tiny_model(drop_rate=0.3))
    several = run(data, config.replace(micro_batch=4), run_dir=tmp_path / "passes", model=tiny_model(drop_rate=0.3))
    for x, y in zip(several.history, one.history, strict=True):
        for key in ("train_loss", "val_loss"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), key


def test_a_batch_one_image_past_the_micro_batch_gives_no_pass_of_one_image():
    """helper-104: 9 images in passes of at most 8 through a training BatchNorm (the MLP head's): the passes are
    4 + 5, not 8 + 1, whose lone image torch's BatchNorm refused mid-run (a ConfigError naming --batch-size, which
    was large enough); from --micro-batch 3 up no pass is one image, and 1 or 2 are refused before any step when a
    BatchNorm trains (an odd batch would leave a pass of 1)."""
    from finetune.core import distributed as ddp
    from finetune.core.errors import ConfigError
    from finetune.core.policy import batchnorm_batch
    from finetune.core.recipe import check_batchnorm_batch
    from finetune.engine.passes import pass_bounds, take_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(9, 4), torch.arange(9) % 3
    loss, out = take_step(model, x, y, torch.nn.CrossEntropyLoss(), ddp.DistInfo(), step=1, amp=None, drops=None,
                          optimizer=optimizer, scaler=None, micro=8)
    assert out.shape == (9, 3) and torch.isfinite(loss)
    assert pass_bounds(9, 8) == [(0, 4), (4, 9)] and pass_bounds(9, 0) == [(0, 9)] and pass_bounds(3, 8) == [(0, 3)]
    assert all(min(b - a for a, b in pass_bounds(n, m)) >= 2 for m in range(3, 12) for n in range(2, 40))
    config = cfg(freeze="none", bn="train", batch_size=8)
    assert batchnorm_batch(config.replace(micro_batch=2), 1, 8) == 1      # a last batch of 3 is 2 + 1
    assert batchnorm_batch(config.replace(micro_batch=2), 1, 2) == 2      # one pass
    with pytest.raises(ConfigError, match=r"MLP head's 1 gets one value per channel\): start again with --micro-batch "
                                          r"3 or more"):
        check_batchnorm_batch(model, (4,), 1, head="1", micro=2)


def test_the_smaller_pass_after_out_of_memory_is_the_fewest_images_the_run_takes():
    """helper-107: after a pass out of memory the line names half as many images, or where the run refuses that (a
    BatchNorm layer that trains: passes of 1 or 2 refused, the option that lifts it) the fewest above it; none
    where no pass below it is taken (then only a new run helps: ``RunFolder.start_over``)."""
    from finetune.engine.passes import smaller_pass

    def batchnorm(micro: int) -> str | None:
        return "--bn eval" if micro <= 2 else None

    def anything(micro: int) -> str | None:
        return None

    assert [smaller_pass(n, anything) for n in (8, 5, 4, 2, 1)] == [(4, None), (2, None), (2, None), (1, None),
                                                                    (None, None)]
    assert [smaller_pass(n, batchnorm) for n in (8, 6, 5, 4, 3, 2)] == [(4, None), (3, None), (3, None), (3, None),
                                                                       (None, "--bn eval"), (None, "--bn eval")]
