"""Under torchrun the training sampler pads an epoch's global order to a whole number of rows of ranks with copies
of its first images (``data.loaders.EpochSeededSampler``, as ``DistributedSampler`` pads): the copies run forward
and backward on their ranks but add nothing to the loss (``engine.passes.Pads``), so N processes train as one."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.core import distributed as ddp
from finetune.core.checkpoint import LAST, load_checkpoint
from finetune.engine import passes
from tests.conftest import make_image_folder
from tests.finetune.test_distributed import TORCHRUN, _torchrun_fit, ddp_cfg
from tests.finetune.test_train import run, tiny_model


class _Grads:
    """An optimizer that keeps the gradients its step is given (DDP's average is taken over these)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.param_groups, self.got = model, [{"lr": 0.1}], None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.got = torch.cat([p.grad.flatten() for p in self.model.parameters()])


@pytest.mark.parametrize("per_rank,real", [(2, 6), (3, 9), (1, 3)])
@pytest.mark.parametrize("kind", ["plain", "class_weights", "mixed"])
@pytest.mark.parametrize("micro", [0, 2])
def test_the_ranks_average_gradient_is_one_process_gradient_over_the_real_images(monkeypatch, per_rank, real, kind,
                                                                                  micro):
    """helper-124: the copies padding the ranks' shares trained with full weight (each rank's plain mean over its
    rows, copies included: 18 images on 4 ranks counted 2 of them twice). Four ranks of ``per_rank`` images whose
    global batch holds ``real`` of the set's images and copies of the first ones after them (rank r holds global
    positions r, r + 4, ...; (1, 3): rank 3 holds only a copy, as a stand-in step holds nothing): the average of
    the ranks' gradients (DDP's) is one process's gradient of the mean over the ``real`` images, in one pass and
    in passes (``--micro-batch 2``), for a plain mean, a class-weighted one (whose weight is all-reduced: faked
    here as the sum over the ranks) and mixed (probability) targets."""
    world, gen = 4, torch.Generator().manual_seed(0)
    size = world * per_rank
    x = torch.randn(real, 5, generator=gen)
    y = torch.randint(0, 3, (real,), generator=gen)
    target = torch.softmax(torch.randn(real, 3, generator=gen), 1) if kind == "mixed" else y
    x_all, t_all = (torch.cat([v, v[:size - real]]) for v in (x, target))    # the padded global order
    weight = torch.tensor([0.5, 2.0, 4.0]) if kind == "class_weights" else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    shared = float(weight[y].sum()) if weight is not None else None        # the real rows' weight, all ranks
    sent: list[float] = []
    monkeypatch.setattr(passes.ddp, "all_reduce_sum", lambda t, info: (sent.append(float(t)), t.fill_(shared))[1])

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)    # (take_step takes the loss in float32)
    one = _Grads(model)
    passes.take_step(model, x, target, loss_fn, ddp.DistInfo(), step=1, amp=None, drops=None, optimizer=one,
                     scaler=None)
    grads = []
    for rank in range(world):
        mine = _Grads(model)
        rows = len(range(rank, real, world))           # this rank's real rows: its first ones
        passes.take_step(model, x_all[rank::world], t_all[rank::world], loss_fn,
                         ddp.DistInfo(rank=rank, world_size=world, enabled=True), step=1, amp=None, drops=None,
                         optimizer=mine, scaler=None, micro=micro, pads=passes.Pads(rows, real))
        grads.append(mine.got)
    assert torch.allclose(torch.stack(grads).mean(0), one.got, rtol=1e-5, atol=1e-7)
    if shared is not None:         # one all-reduce a rank, of its real rows' weight only
        assert len(sent) == world and sum(sent) == pytest.approx(shared, rel=1e-6)


def test_a_stand_in_step_all_reduces_as_the_others_and_adds_nothing(monkeypatch):
    """A rank whose every image failed to decode (``stand_in_step``) counts no row: a zero loss that still reaches
    every parameter, and with class weights the all-reduce the other ranks take, of a zero weight."""
    sent: list[float] = []
    monkeypatch.setattr(passes.ddp, "all_reduce_sum", lambda t, info: (sent.append(float(t)), t.fill_(3.0))[1])
    model = torch.nn.Linear(5, 3)
    out = model(torch.randn(4, 5))
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 4.0]))
    info = ddp.DistInfo(rank=1, world_size=2, enabled=True)
    loss = passes.batch_loss(loss_fn, out, torch.zeros(4, dtype=torch.int64), info, pads=passes.Pads(0, 0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and sent == [0.0]
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_torchrun_two_processes_on_a_set_that_leaves_a_padding_copy_train_as_one_process(tmp_path):
    """helper-124: 17 training images on 2 processes at a global batch of 18 (9 a rank, one step an epoch): the
    sampler pads the order to 18 with a copy of its first image, which trained with full weight, so the run was
    not one process's (measured: epoch 3's val loss 0.0142 off, 0.0087 with class weights; the last weights up to
    0.17). The copy now adds nothing: the per-epoch losses and the weights are one process's up to float order
    (measured: 1.5e-7 at most), in one pass, with class weights, and in passes (``--micro-batch 4``)."""
    from finetune.data import ImageSet, scan_folder

    report = scan_folder(make_image_folder(tmp_path / "data", per_class=6, val_per_class=2, layout="split"))
    train = ImageSet(report.train.items[:17], report.train.classes)         # 6 + 6 + 5 images
    base = ddp_cfg().replace(epochs=3, head_epochs=1, batch_size=18, lr=0.05)
    configs = {"plain": base, "class_weights": base.replace(class_weights="auto"),
               "passes": base.replace(micro_batch=4)}
    _torchrun_fit(tmp_path, train, report.val, f"""
        from finetune.core import distributed
        from finetune.core.config import FinetuneConfig
        from finetune.tools.train import fit
        from tests.finetune.test_train import STAGES, DATA_CONFIG, tiny_model
        out = {{name: fit(tiny_model(), STAGES, DATA_CONFIG, train, val, FinetuneConfig.from_dict(config), head="fc",
                          run_dir={str(tmp_path)!r} + "/two-" + name).history
               for name, config in {({k: c.to_dict() for k, c in configs.items()})!r}.items()}}
        if distributed.setup("cpu").is_main:
            json.dump(out, open({str(tmp_path / "two.json")!r}, "w"))
    """)
    two = json.loads((tmp_path / "two.json").read_text())
    for name, config in configs.items():
        one = run((train, report.val), config, run_dir=tmp_path / f"one-{name}").history
        assert [r["phase"] for r in two[name]] == [r["phase"] for r in one] == ["head"] + ["finetune"] * 2
        for epoch, (a, b) in enumerate(zip(two[name], one), 1):
            for key in ("train_loss", "val_loss"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (name, epoch, key)
        # the last epoch's weights (the backbone's too: the best epoch's may be the head's)
        a, b = (load_checkpoint(tmp_path / f"{who}-{name}" / LAST)["model"] for who in ("two", "one"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5), (name, k)


@pytest.mark.parametrize("sampler", ["random", "balanced"])
@pytest.mark.parametrize("n,world,batch", [(17, 2, 9), (18, 4, 8), (11, 2, 2), (24, 4, 2), (22, 4, 1), (17, 2, 4)])
def test_the_sampler_names_the_step_holding_the_copies_and_its_own_images(sampler, n, world, batch):
    """``EpochSeededSampler.share`` (no collective: the order's length, the ranks and the batch) names what the
    ranks' batches hold: the one step whose global batch holds copies (the rows of a rank past its ``counted``), and the
    set's own images in it; none when no rank holds one (24 on 4; 17 on 2 at 4 a rank drops its last partial
    batch, one image)."""
    from finetune.data.loaders import train_batches

    class Set:
        targets = [i % 3 for i in range(n)]

        def __len__(self) -> int:
            return n

    own: dict[int, int] = {}
    copies: set[int] = set()
    shares = set()
    for rank in range(world):
        order = train_batches(Set(), batch, sampler=sampler, world_size=world, rank=rank)
        order.sampler.set_epoch(0, 5)
        counted, seen = order.sampler.counted(), 0
        for step, rows in enumerate(order, 1):
            mine = max(0, min(len(rows), counted - seen))
            own[step] = own.get(step, 0) + mine
            copies |= {step} if mine < len(rows) else set()
            seen += len(rows)
        shares.add(order.sampler.share(batch)[1:])
    assert len(copies) <= 1 and len(shares) == 1          # one step at most, the same on every rank
    padded, images = shares.pop()
    assert (padded, images) == ((copies.pop(), own[padded]) if copies else (0, 0))
