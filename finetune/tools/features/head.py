"""The head phase on cached features: when every parameter outside the head is frozen, the backbone
computes the same features every epoch (it runs in eval mode: BatchNorm uses its stored statistics,
dropout and drop-path are off), so re-running it is pure waste. :class:`CachedHeadSteps` computes them
once per view and is the head phase's epoch source in ``fit``'s loop (``finetune.engine.Trainer``):

* view 0, the un-augmented (evaluation-transform) view, always used for validation; for training, when
  the training augmentation flips (``augment`` with ``hflip > 0``), also its horizontal mirror: the one
  augmentation that is fixed, so a solved head sees twice the images at the cost of one more pass
  (measured on real photos: docs/peers.md); ``--hflip 0`` keeps one view, for data whose mirror is
  another class, and so does ``--hflip`` auto in a run that finetunes layers when the images have a
  handedness (:mod:`.handedness`: digits, text; the finetune phase then trains without flips too);
* with ``config.aug_views = K > 0`` instead, K randomly augmented views per training image.
Each epoch of the gradient solver draws one view per image; the L-BFGS solver fits all views at once.

Everything else is the engine's: the loss, optimizer and scheduler of the setup, the batch kernel
(``engine.train_one_epoch`` / ``evaluate`` over batches of features), the batch order of the setup's
training loader (``data.train_batches``, iterated without a DataLoader), early stopping, the history and the
run folder. As in the slow head phase the whole model is in eval mode and only the head trains, so dropout before
the classifier (timm's ``drop_rate``) and stochastic depth are off in both paths; an MLP head's own BatchNorm and
Dropout train normally in both."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.data import ImageDataset, build_transform, count_draw, set_epoch_order, train_batches
from finetune.data.transforms import trains_mirrored
from finetune.engine.setup import Setup
from finetune.engine.drops import epoch_drops
from finetune.engine.runtime import to_device
from finetune.engine.steps import evaluate, train_one_epoch
from finetune.core.errors import FinetuneError
from finetune.core.metrics import accuracy_text
from finetune.core.optim import lbfgs_iterations, lbfgs_minimise
from finetune.core.progress import progress_bar
from finetune.core.seeding import view_pick_seed, view_seed
from finetune.core.threads import one_thread
from finetune.tools.features.banks import _bank_to, _gather_bank, agreed_load, join_mirror, mirrored
from finetune.tools.features.cache import FeatureBank, FeatureCache, _strip, backbone_digest, feature_cache_key
from finetune.tools.features.extract import _extract, _logits
from finetune.tools.features.handedness import MAX_IMAGES as HANDEDNESS_MAX_IMAGES, MIN_PER_CLASS, handedness

__all__ = ["CachedHeadSteps"]

# head_solver="lbfgs": the inverse L2 strengths tried (scikit-learn's C; L2 = 1 / (C x N) on the mean loss),
# strongest first, each warm-started from the last; the best on the validation split is kept.
SOLVER_C = tuple(10.0 ** k for k in range(-2, 5))
SOLVER_MAX_ITER = 500
# A solve of at most this many (rows x features x classes) runs on the CPU, on one thread (threads.one_thread),
# whatever the device: its line search reads a number on the host dozens of times an iteration, which a GPU answers
# slowly (docs/benchmarks.md, "The head's solve on the CPU", "... on one thread").
SOLVE_ON_CPU_UP_TO = 250_000_000
Log = Callable[[str], None]


def mirror_view(config) -> bool:
    """The cached head's training features include each image's mirror (see the module docstring)."""
    return not int(config.aug_views or 0) and trains_mirrored(config)


class _Targets(torch.utils.data.Dataset):
    """The training dataset's length and ``targets`` (the balanced sampler's weights) for its batch order, no images."""

    def __init__(self, image_set) -> None:
        self.targets = [int(y) for _, y in image_set.items]

    def __len__(self) -> int:
        return len(self.targets)


class FeatureHead(nn.Module):
    """The head as the batch kernel runs it on features: ``head(x)``, a 1x1-conv head's output flattened."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.head, x)


class CachedHeadSteps:
    """The head phase's epochs on cached features (see the module docstring).

    Args:
        setup: the shared setup (its model's backbone must be frozen when a phase begins).
        cache: where banks are kept: a :class:`FeatureCache` shared between runs (a sweep's trials, the
            LR range test before ``fit``) computes each bank once; None = in memory for this run.
        log: one-line messages (cache hits, extraction speed, decode failures).
    """

    label = " (cached features)"

    def __init__(self, setup: Setup, cache: FeatureCache | None = None, log: Log | None = None) -> None:
        self.s = setup
        self.cache = cache if cache is not None else FeatureCache(None)
        self.say = log or (lambda _msg: None)
        self._failures: dict[str, str] = {}
        self._ready = False
        self.solver_path: list[dict] = []   # the L-BFGS solve: per L2 strength, its val loss/acc (summary.json)
        self.mirror: dict | None = None     # the mirror test (``_mirror_test``), when it ran (summary.json)
        self.val_probs: torch.Tensor | None = None     # of the last evaluate() (see FitResult.val_probs)
        self.val_correct: torch.Tensor | None = None   # of the last evaluate(): hits on the decoded images
        self.val_losses: torch.Tensor | None = None    # ... and their cross-entropy (float64)
        self._prep_seconds = 0.0
        self.net = FeatureHead(setup.head_module)      # what the kernel trains and evaluates

    @property
    def ready(self) -> bool:
        """The features are computed (a phase began)."""
        return self._ready

    # ----------------------------------------------------------------------------- features
    def begin_phase(self, phase: str) -> None:
        s = self.s
        trainable = [n for n, p in s.model.named_parameters() if p.requires_grad and not _strip(n, s.head)]
        if trainable:
            raise FinetuneError(f"the fast head path needs a frozen backbone, but {trainable[0]} is trainable; "
                                "freeze the backbone or run with fast_head off")
        if self._ready:
            return
        t0 = time.perf_counter()
        views = int(s.config.aug_views or 0)
        output, self.normalize = s.features_io
        eval_tf = build_transform(s.data_config, False, s.config, output=output)
        weights = backbone_digest(s.model, s.head)
        train_tf = build_transform(s.data_config, True, s.config, output=output) if views > 0 else eval_tf
        self.train_bank = self._bank("train", s.train_set, train_tf, views, weights, mirror=mirror_view(s.config))
        self.val_bank = (self._bank("val", s.val_set, eval_tf, 0, weights) if s.has_val else None)
        if self.val_bank is not None and self.val_bank.feature_shape != self.train_bank.feature_shape:
            raise FinetuneError("train and val features differ in shape; clear the feature cache and retry")
        dev = s.device
        self.train_feats = _bank_to(self.train_bank, dev)
        if self._mirror_testable():
            self._mirror_test()
        self.shape = self.train_bank.feature_shape
        if self.val_bank is not None:
            self.val_feats = _bank_to(self.val_bank, dev)[0]
            self.val_labels = self.val_bank.labels[self.val_bank.valid]
            self.val_rows = self.val_bank.valid.nonzero().squeeze(1)
        self.bank_labels = self.train_bank.labels.tolist()
        # The setup's own training order (sampler, seed, drop_last), iterated without a DataLoader. Under
        # torchrun every rank takes the global order on all the features, with the loaders' steps (the schedule's
        # steps_per_epoch: QA, it took a batch more at 34 images); rank 0's head is broadcast after each epoch.
        c = s.config
        self.order = train_batches(_Targets(s.train_set), int(c.batch_size), sampler=c.sampler, seed=int(c.seed),
                                   processes=s.info.world_size)
        self._ready = True
        self._prep_seconds = time.perf_counter() - t0

    def _bank(self, split: str, image_set, transform, n_views: int, weights: str,
              mirror: bool = False) -> FeatureBank:
        """One split's features: the view of ``transform`` (``n_views`` = 0), or ``n_views`` seeded random
        views of it; ``mirror`` (with ``n_views`` = 0): plus its horizontal mirror, of which only the mirror
        is computed when the plain view's bank is cached (``zoo doctor``'s, a ``--hflip 0`` run's)."""
        s = self.s
        seed = int(s.config.seed)
        # An un-mirrored single view has the key finetune.tools.doctor.folder_features gives it (shared banks).
        extra = {"amp": s.amp.enabled, "device": s.device.type, "channels_last": s.channels_last,
                 "views": n_views, "seed": seed if n_views else None}

        def key_of(extra: dict) -> str:
            return feature_cache_key(split=split, items=image_set.items, backbone=weights,
                                     data_config=s.data_config, transform=transform, extra=extra)

        plain_key = key_of(extra) if mirror else None
        # a plain bank is also the plain view of its mirrored bank (a default run's, for a --hflip 0 run)
        view_of = key_of(mirrored(extra)) if not (mirror or n_views) else None
        if mirror:
            extra = mirrored(extra)
        elif n_views:     # (a bank of an earlier version drew its views from one stream per rank and worker)
            extra["draws"] = "per image"
        key = key_of(extra)
        info, per_pass = s.info, s.pass_images      # a rank forwards no more images at once than in training

        def compute(plain: FeatureBank | None = None) -> FeatureBank:
            """The bank, all its views computed, or only the mirror's to join to ``plain``."""
            t0 = time.perf_counter()
            # under torchrun each rank extracts its strided shard of the images; all ranks get every row
            shard = range(info.rank if info.enabled else 0, len(image_set.items), info.world_size)
            ds = ImageDataset(image_set, transform)
            parts = []
            for v in range(max(1, n_views)):
                # An augmented view's draws are seeded per image, by (view seed, its index in the split)
                # (``ImageDataset``'s keyed form; it forks the global RNG, which the head's dropout uses): the
                # same on any number of ranks and with any --workers, as the training loader's (QA: one stream
                # per rank and worker gave 2 ranks, or --workers 2, other views and another head).
                keys = [(i, view_seed(seed, v)) for i in shard] if n_views else shard
                parts.append(_extract(s.model, s.head, ds, per_pass, s.device,
                                      workers=int(s.config.workers), amp=s.amp, channels_last=s.channels_last,
                                      desc=f"features {split}" + (f" view {v + 1}" if n_views > 1 else "")
                                      + (" mirror" if plain is not None else ""),
                                      quiet=bool(s.config.quiet) or not info.is_main, keys=keys,
                                      normalize=self.normalize, mirror=mirror and plain is None,
                                      flipped=plain is not None, allow_empty=info.enabled))
            bank = _gather_bank(parts, len(image_set.items), info)
            bank = bank if plain is None else join_mirror(plain, bank)
            for failed in ddp.gather_objects(ds.failures(), info):   # reported once, with the loop's,
                for path, reason in failed:                          # at the end of fit
                    self._failures.setdefault(path, reason)
            dt = time.perf_counter() - t0
            n, rate = len(image_set.items), len(image_set.items) / max(dt, 1e-9)     # img/s: images, as everywhere
            views = max(1, n_views) * (2 if mirror and plain is None else 1)
            self.say(f"features: {split} {n} images x {views} view(s) computed in {dt:.1f}s ({rate:.0f} img/s"
                     + (f", {rate * views:.0f} views/s)" if views > 1 else ")")
                     + (", the plain view's from the cache" if plain is not None else ""))
            return bank

        def compute_reusing() -> FeatureBank:
            # every rank reuses the plain bank, or none does (``agreed_load``)
            return compute(agreed_load(self.cache, plain_key, info) if plain_key else None)

        def load() -> FeatureBank | None:
            return agreed_load(self.cache, key, info, view_of=view_of)

        if info.enabled:     # every rank takes the same branch: all load, or all extract their shard
            bank = load()     # ... and loads the same bank
            hit = bank is not None
            if not hit:
                bank = compute_reusing()
                if info.is_node_main:      # every machine's cache, so that a re-run hits on every rank
                    self.cache.save(key, bank)
        else:
            bank, hit = self.cache.get_or_compute(key, compute_reusing, load)
        if hit:
            self.say(f"features: {split} loaded from cache ({bank.views} view(s), {len(bank)} images"
                     + (", the plain view of the mirrored bank)" if bank.plain_of_mirrored else ")"))
        return bank

    def failures(self) -> dict[str, str]:
        return dict(self._failures)

    # ----------------------------------------------------------------------------- batches
    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """Epoch ``epoch``'s training batches of features ``(x, y)`` on the device, in the training loader's
        order (undecodable images dropped from their batch, as ``collate_skip_none`` does; a batch of none but
        them is None, as the loader's: it takes its step number, which seeds the step's dropout masks)."""
        s = self.s
        n_views = int(self.train_feats.shape[0])
        g = torch.Generator().manual_seed(view_pick_seed(s.config.seed, epoch))
        view_of = torch.randint(n_views, (len(self.train_bank),), generator=g)     # the view each image shows
        set_epoch_order(self.order.sampler, int(s.config.seed), epoch)
        drawn = {} if n_views > 1 and s.config.sampler == "balanced" else None    # a repeat shows the next view
        for batch in self.order:
            keep = [i for i, _seed in batch if self.bank_labels[i] >= 0]
            if not keep:
                yield None
                continue
            idx = torch.tensor(keep, dtype=torch.int64)
            y = self.train_bank.labels[idx]
            turns = 0 if drawn is None else [count_draw(drawn, i) for i in keep]
            views = (view_of[idx] + torch.tensor(turns)) % n_views
            x, y = to_device(self.train_feats[views.to(self.train_feats.device), idx.to(self.train_feats.device)], y,
                             s.device)
            yield x.reshape(-1, *self.shape), y

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation features ``(x, y)`` on the device, in val_set order, batch by batch."""
        s = self.s
        bs = int(s.config.batch_size)
        for start in range(0, int(self.val_rows.shape[0]), bs):
            r = self.val_rows[start:start + bs]
            x, y = to_device(self.val_feats[r.to(self.val_feats.device)], self.val_labels[start:start + bs], s.device)
            yield x.reshape(-1, *self.shape), y

    @property
    def solves(self) -> bool:
        """A linear head with ``head_solver="lbfgs"``: the phase is one convex solve, not epochs of SGD."""
        return self.s.config.head_solver == "lbfgs" and isinstance(self.s.head_module, torch.nn.Linear)

    def train_epoch(self, epoch: int, phase: str, optimizer, scheduler, scaler) -> dict:
        out = self._solve() if self.solves else self._gradient_epoch(epoch, optimizer, scheduler, scaler)
        # Every rank trained the same head on the same features; rank 0's is made everyone's, so that
        # no GPU's rounding can leave the ranks with different heads.
        ddp.broadcast_module(self.s.head_module, self.s.info)
        return out

    def _gradient_epoch(self, epoch: int, optimizer, scheduler, scaler) -> dict:
        s = self.s
        s.model.eval()       # as in the slow head phase: the whole model in eval mode, the head trains
        out = train_one_epoch(self.net, self.batches(epoch), optimizer, scheduler, s.loss_fn, s.device, amp=s.amp,
                              scaler=scaler, epoch=epoch, drops=epoch_drops(s.config, epoch))   # whole batches
        # the first epoch pays for the extraction: its seconds and speed say so
        out["seconds"] += self._prep_seconds
        out["images_per_s"] = out["images"] / max(out["seconds"], 1e-9)
        self._prep_seconds = 0.0
        return out

    def _solve(self) -> dict:
        """Multinomial logistic regression of the head on the training features: full-batch L-BFGS to
        convergence for each L2 strength of SOLVER_C, the one with the best validation accuracy (then loss)
        kept; without a validation split, L2 = ``config.weight_decay``. Returns the epoch's train metrics
        with ``phase_done``: a converged head needs no more epochs.

        The objective, also the epoch's train loss, is ``Setup.full_batch_loss`` (class-weighted under ``--sampler
        balanced``; ``label_smoothing`` smooths it too, still convex: cross-entropy against fixed soft targets);
        C is picked on the plain validation loss/accuracy."""
        s = self.s
        t0 = time.perf_counter()
        views = int(self.train_feats.shape[0])
        ok = self.train_bank.valid
        feats = self.train_feats[:, ok.to(self.train_feats.device)].to(s.device).float()
        labels = self.train_bank.labels[ok].to(s.device)
        head = self.s.head_module
        x, y = feats[:views].reshape(views * int(ok.sum()), -1), labels.repeat(views)
        with one_thread(int(x.numel()) * int(head.weight.shape[0]) <= SOLVE_ON_CPU_UP_TO):
            c, l2, state, va, path = self._solve_path(x, y)
            self.solver_path = path
            with torch.no_grad():
                head.weight.copy_(state[0])
                if head.bias is not None:
                    head.bias.copy_(state[1])
                logits = torch.nn.functional.linear(x, head.weight, head.bias)
                loss = float(s.full_batch_loss(x.device)(logits, y))     # the objective solved
                acc = float((logits.argmax(1) == y).float().mean())
        picked = (f"C={c:g} (L2 {l2:.2g}) picked on the validation split: val acc {accuracy_text(va['acc'])}, "
                  f"loss {va['loss']:.4f}" if c is not None else f"L2 {l2:.2g} (--weight-decay; no validation split)")
        n = int(y.shape[0])
        its = lbfgs_iterations(SOLVER_MAX_ITER, n, sum(int(p.numel()) for p in head.parameters()))
        how = ("to convergence" if its == SOLVER_MAX_ITER
               else f"at most {its} iterations per C ({n} rows: a large solve)")
        self.say(f"head: L-BFGS on cached features {how}, {picked}")
        seconds = time.perf_counter() - t0 + self._prep_seconds
        self._prep_seconds = 0.0
        return {"loss": loss, "acc": acc, "images": n, "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
                "phase_done": True, "solver": "L-BFGS"}

    def _solve_path(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """The L-BFGS solves of the head on features ``x`` (rows) with labels ``y``, strongest L2 first, each
        warm-started from the last. Returns ``(C, l2, (weight, bias), its val loss/acc, path)`` of
        the one kept (C None without a validation split), ``path`` the val loss/acc per C for summary.json."""
        s = self.s
        head = s.head_module
        n = int(y.shape[0])
        strengths = ([(c, 1.0 / (c * n)) for c in SOLVER_C] if self.val_bank is not None
                     else [(None, float(s.config.weight_decay))])
        dev = solve_device(s.device, n * int(x.shape[1]) * int(head.weight.shape[0]))
        x, y = x.to(dev), y.to(dev)
        loss_fn = s.full_batch_loss(dev)      # its class weights where the solve runs
        # the solve's own weights, copied into the head for each validation; convex: start from zero, then
        # warm-start each weaker L2 from the last
        w = torch.zeros_like(head.weight, device=dev, requires_grad=True)
        b = None if head.bias is None else torch.zeros_like(head.bias, device=dev, requires_grad=True)
        best = None
        path: list[dict] = []
        head.train()
        # seconds to minutes for thousands of images and classes: a bar over the strengths (not on a pipe)
        quiet = bool(s.config.quiet) or not s.info.is_main or len(strengths) < 2
        for c, l2 in progress_bar(desc="head: L-BFGS solve per C", unit="C", quiet=quiet, iterable=strengths):
            def objective(l2: float = l2) -> torch.Tensor:
                return loss_fn(torch.nn.functional.linear(x, w, b), y) + 0.5 * l2 * w.pow(2).sum()

            lbfgs_minimise([p for p in (w, b) if p is not None], objective, SOLVER_MAX_ITER, rows=n)
            with torch.no_grad():
                head.weight.copy_(w)
                if b is not None:
                    head.bias.copy_(b)
            va = self.evaluate()
            if c is not None:
                path.append({"C": c, "l2": l2, "val_loss": va["loss"], "val_acc": va["acc"]})
            key = (va["acc"], -va["loss"]) if self.val_bank is not None else (0.0, 0.0)
            if best is None or key > best[0]:
                best = (key, c, l2, (w.detach().clone(), None if b is None else b.detach().clone()), va)
        _, c, l2, state, va = best
        return c, l2, state, va, [dict(p, chosen=p["C"] == c) for p in path]

    def _mirror_testable(self) -> bool:
        """The mirror is judged when it matters and can be: a run that trains layers after the head (a head-only
        run loses nothing to the mirrored views, even on digits: docs/peers.md), auto ``--hflip``, a mirrored view
        in the bank, and at least ``handedness.MIN_PER_CLASS`` decoded training images per class."""
        s = self.s
        return (not s.head_only and float(s.config.hflip) < 0 and self.train_bank.views == 2
                and mirror_view(s.config) and int(self.train_bank.valid.sum()) >= MIN_PER_CLASS * len(s.classes))

    def _mirror_test(self) -> None:
        """Whether the training images have a handedness (:mod:`.handedness`): then the mirrored views are
        dropped from the head's training features and the finetune phase trains without flips
        (``Trainer`` calls ``Setup.train_without_flip``). Rank 0 decides for every rank; kept in ``self.mirror``."""
        s = self.s
        ok = self.train_bank.valid.to(self.train_feats.device)
        verdict = None
        if s.info.is_main:   # two L-BFGS fits of 2K classes, on the CPU when small (as the head's solve)
            plain, mirrored = self.train_feats[0, ok], self.train_feats[1, ok]
            rows = min(int(plain.shape[0]), HANDEDNESS_MAX_IMAGES)     # what the fits use of them
            dev = solve_device(s.device, size := rows * int(plain[0].numel()) * 2 * len(s.classes))
            with one_thread(size <= SOLVE_ON_CPU_UP_TO):     # (as the head's solve: the same on any thread count)
                verdict = handedness(plain.to(dev), mirrored.to(dev),
                                     self.train_bank.labels[self.train_bank.valid].to(dev),
                                     len(s.classes), seed=int(s.config.seed), quiet=bool(s.config.quiet)).to_dict()
        verdict = ddp.broadcast_object(verdict, s.info)
        handed = verdict.pop("handed")
        self.mirror = {"dropped": handed, **verdict}
        line = (f"mirror: the features tell a training image from its mirror, given its class, "
                f"{verdict['score']:.0%} of the time (95% bound {verdict['low']:.0%}; chance 50%, "
                f"threshold {verdict['threshold']:.0%}, {verdict['images']} images): ")
        if handed:
            self.train_feats = self.train_feats[:1]
            self.say(line + "the images have a handedness (text, digits, fixed scenes), so this run trains "
                            "without flips (pass --hflip 0.5 to flip anyway)")
        else:
            self.say(line + "flips kept")

    def evaluate(self, full: bool = False) -> dict:
        """Mean loss and accuracy of the head over the validation features (``engine.evaluate``; the head's
        mode restored after); with ``full``, per-class accuracy and the confusion matrix too (the features
        are exactly what the head sees there: no second pass through the backbone).
        ``val_probs`` then holds each validation image's softmax (a row of NaN: an image that failed to decode)."""
        self.val_probs = self.val_correct = self.val_losses = None
        if self.val_bank is None:
            return {"loss": math.nan, "acc": math.nan}
        s = self.s
        was = s.head_module.training
        probs, correct, losses = [], [], []     # (engine.evaluate fills them)
        try:
            out = evaluate(self.net, self.val_batches(), s.eval_loss_fn, s.device, s.classes, amp=s.amp,
                           probs=probs, correct=correct, losses=losses)
        finally:
            s.head_module.train(was)
        self.val_correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
        self.val_losses = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
        if s.info.enabled and len(self.val_correct):
            # the head guard pairs these with LoaderSteps' on this rank's strided shard, and combines
            # the ranks' evidence: each rank keeps its own images'
            mine = (self.val_rows % s.info.world_size == s.info.rank).cpu()
            self.val_correct, self.val_losses = self.val_correct[mine], self.val_losses[mine]
        if probs:   # one row per val_set item (as LoaderSteps.val_probs): NaN for an image that failed to decode
            self.val_probs = torch.full((len(s.val_set), len(s.classes)), math.nan)
            self.val_probs[self.val_rows.cpu()] = torch.cat(probs)
        return out if full else {"loss": out["loss"], "acc": out["acc"]}


def solve_device(device: torch.device, size: int) -> torch.device:
    """Where the head's L-BFGS solve of ``size`` = rows x features x classes runs: the CPU up to
    SOLVE_ON_CPU_UP_TO (the host looks at the line search's numbers dozens of times per iteration, which
    a GPU answers slowly), else ``device``."""
    return torch.device("cpu") if size <= SOLVE_ON_CPU_UP_TO else device
