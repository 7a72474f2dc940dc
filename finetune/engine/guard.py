"""The head guard: after a head phase and a finetune phase, which of the two the run keeps.

Two paired tests of the same validation images at ``ALPHA`` (:func:`judge`):
- accuracy: a one-sided exact McNemar test on the images one got right and the other wrong;
- loss: a one-sided paired bootstrap of the per-image cross-entropy differences, counted only when the
  challenger fixes more images than it breaks and the validation split has at least
  ``LOSS_TEST_PER_CLASS`` images per class. A loss that falls while no prediction changes is confidence,
  not evidence, and a bootstrap of a dozen images is no evidence at all: at 2 validation images per
  class such runs lost test accuracy (docs/peers.md).
Who must pass them depends on how much the validation split can say:
- below ``LOSS_TEST_PER_CLASS`` images per class (few-shot, where the policy trains the head only and a
  user forced finetuning): the finetuned weights (the best epoch on the monitored metric) replace the
  solved head only when a test says they are better. The guard protects the head from a lucky epoch.
- with more, the monitored metric has picked the finetuned weights over the head already (the head's
  epoch competes in early stopping; where the finetune phase mixes images it does not, ``policy.head_competes``,
  and the finetune phase's best is the challenger alone), and the head comes back only when a test says *it* is
  better. On medium digits the other burden vetoed real gains (0.7-4 points: docs/peers.md) and never helped.
Under torchrun each rank holds its strided shard of the validation set: the counts are summed and the loss
differences gathered in item order, so the decision is the one process's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from finetune.core import distributed as ddp
from finetune.core.checkpoint import BEST, HEAD_BEST, load_weights
from finetune.core.io import read_safetensors_header
from finetune.core.metrics import paired_gain_p

__all__ = ["ALPHA", "LOSS_TEST_PER_CLASS", "Evaluation", "Verdict", "HeadGuard", "judge", "paired_loss_p"]

ALPHA = 0.05
BOOTSTRAP_DRAWS = 2000
LOSS_TEST_PER_CLASS = 10      # validation images per class (on average) below which only McNemar counts
_CHUNK = 100          # bootstrap draws computed at once (memory: _CHUNK x images indices)
VERDICT_KEY = "zoo_head_guard"      # best.safetensors' metadata: the verdict that put the head's weights there


class Evaluation(NamedTuple):
    """One evaluation of the validation split, kept with the path that made it."""

    steps: Any                      # the path that evaluated (LoaderSteps or the cached head)
    metrics: dict
    probs: torch.Tensor | None      # each val_set item's softmax (NaN: failed to decode; LoaderSteps: the rank's)
    correct: torch.Tensor | None    # per-image hits on the images this rank evaluated
    losses: torch.Tensor | None     # per-image cross-entropy (float64) on the same images

    @classmethod
    def of(cls, steps: Any, metrics: dict) -> "Evaluation":
        """``metrics`` kept with what ``steps`` recorded of the same evaluation, per image."""
        return cls(steps, metrics, getattr(steps, "val_probs", None), getattr(steps, "val_correct", None),
                   getattr(steps, "val_losses", None))


@dataclass(frozen=True)
class Verdict:
    """What the guard decided, as written into summary.json (``head_guard``)."""

    head_epoch: int
    finetune_epoch: int
    gains: int              # validation images the finetuned weights got right and the head wrong
    losses: int             # the reverse
    p: float                # exact McNemar, one-sided
    loss_gain: float        # mean per-image cross-entropy: the head's minus the finetuned weights'
    p_loss: float           # paired bootstrap, one-sided (1.0 when it does not count: see the module docstring)
    alpha: float
    kept: str               # "finetune" | "head"
    burden: str = "finetune"   # who had to pass a test: the finetuned weights (few-shot) or the head

    def to_dict(self) -> dict:
        return asdict(self)

    def evidence(self) -> str:
        """One clause for the log."""
        return (f"right on {self.gains} validation image(s) the head got wrong, wrong on {self.losses} it got "
                f"right (McNemar p={self.p:.2g}); validation loss {self.loss_gain:+.3g} per image in their "
                f"favour (bootstrap p={self.p_loss:.2g})")


def paired_loss_p(diff: torch.Tensor, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """One-sided paired bootstrap: the share of resampled mean differences at or below zero (with the
    usual +1 correction), i.e. how often the images could have shown no gain. ``diff``: per-image
    (old - new) losses. Deterministic for a given ``seed``; 1.0 for no images."""
    n = int(diff.numel())
    if n == 0:
        return 1.0
    d = diff.detach().cpu().double().reshape(-1)     # (widened on the host: MPS has no float64)
    g = torch.Generator().manual_seed(int(seed))
    at_or_below = 0
    for start in range(0, draws, _CHUNK):
        k = min(_CHUNK, draws - start)
        idx = torch.randint(n, (k, n), generator=g)
        at_or_below += int((d[idx].mean(1) <= 0).sum())
    return (at_or_below + 1) / (draws + 1)


def judge(head: Evaluation, tuned: Evaluation, *, head_epoch: int, finetune_epoch: int, n_val: int,
          n_classes: int, device: torch.device, info: ddp.DistInfo) -> Verdict | None:
    """The guard's decision on two evaluations of the same validation images (``n_val``: the split's size);
    None when they did not see the same images on some rank (an image failed to decode in one of them
    only): nothing to pair."""
    paired = (head.correct is not None and tuned.correct is not None and head.losses is not None
              and tuned.losses is not None and head.correct.shape == tuned.correct.shape
              and head.losses.shape == tuned.losses.shape == head.correct.shape)
    if paired:
        t, h = tuned.correct, head.correct
        counts = torch.tensor([int((t & ~h).sum()), int((h & ~t).sum()), int(h.numel()), 0], dtype=torch.int64,
                              device=device)
    else:
        counts = torch.tensor([0, 0, 0, 1], dtype=torch.int64, device=device)
    ddp.all_reduce_sum(counts, info)
    gains, losses, seen, unpaired = (int(v) for v in counts.tolist())
    if unpaired:
        return None
    diff = head.losses - tuned.losses
    if info.enabled:     # every rank the same differences: in item order when no image failed to decode
        diff = (ddp.gather_strided(diff, n_val, info) if seen == n_val
                else torch.cat([d.cpu() for d in ddp.gather_objects(diff.cpu(), info)]))
    p = paired_gain_p(gains, losses)
    p_loss = paired_loss_p(diff) if gains > losses and seen >= LOSS_TEST_PER_CLASS * n_classes else 1.0
    keep = "finetune" if min(p, p_loss) < ALPHA else "head"
    return Verdict(head_epoch=head_epoch, finetune_epoch=finetune_epoch, gains=gains, losses=losses,
                   p=round(p, 6), loss_gain=round(float(diff.mean()), 6) if diff.numel() else 0.0,
                   p_loss=round(p_loss, 6), alpha=ALPHA, kept=keep)


State = dict[str, torch.Tensor]


class HeadGuard:
    """The guard across a run: :meth:`hold` keeps the head phase's best weights and evaluation when that
    phase ends (the weights also in the run folder, for a run resumed during finetuning); :meth:`settle`
    after the finetune phase returns the weights the run keeps and says why.

    ``evaluate_state(state)`` evaluates weights through the network (for an evaluation not in memory);
    ``folder`` is the run's ``RunFolder``; ``say`` the run's log."""

    def __init__(self, folder: Any, evaluate_state: Callable[[State], Evaluation], say: Callable[[str], None],
                 epoch: int | None = None) -> None:
        self.folder = folder
        self.evaluate_state = evaluate_state
        self.say = say
        self.epoch = epoch                       # the head phase's best epoch (None: no head phase yet)
        self.state: State | None = None
        self.evaluation: Evaluation | None = None
        self.decision: dict[str, Any] | None = None     # summary.json's head_guard

    def hold(self, epoch: int, state: State, evaluation: Evaluation | None) -> None:
        self.epoch, self.state, self.evaluation = epoch, state, evaluation
        self.folder.head(state, {"epoch": str(epoch)})

    @property
    def reverted(self) -> bool:
        return self.decision is not None and self.decision["kept"] == "head"

    def settle(self, tuned_epoch: int, tuned_state: State, tuned_eval: Evaluation | None, *, seconds: float,
               monitor: str, n_val: int, n_classes: int, device: torch.device,
               info: ddp.DistInfo) -> tuple[State, Evaluation] | None:
        """The head phase's weights and evaluation when they stay the run's best, else None (the finetuned
        best stays; also when there was nothing to compare). ``seconds``: what the finetune phase took."""
        if self.epoch is None or tuned_epoch == self.epoch:
            return None
        head_state = self.state
        path = self.folder.path
        if head_state is None and path is not None and (settled := _settled(path / BEST)) is not None:
            # resumed after an earlier process settled (the head's weights in best.safetensors, the finetuned
            # ones gone) but stopped before summary.json: its verdict stands, it cannot be judged again
            self.decision = settled
            self.say(f"head guard: the head of epoch {self.epoch} is kept, as decided before the interruption")
            head_state = load_weights(path / BEST)
            head_eval = self.evaluate_state(head_state)
            settled.setdefault("value", float(head_eval.metrics["acc" if monitor == "val_acc" else "loss"]))
            return head_state, head_eval
        if head_state is None and path is not None and (path / HEAD_BEST).is_file():
            head_state = load_weights(path / HEAD_BEST)     # resumed during finetuning
        if head_state is None:
            return None
        if tuned_eval is None or tuned_eval.losses is None:
            tuned_eval = self.evaluate_state(tuned_state)
        head_eval = self.evaluation
        if head_eval is None or head_eval.losses is None:
            head_eval = self.evaluate_state(head_state)
        kw = dict(head_epoch=self.epoch, finetune_epoch=tuned_epoch, n_val=n_val, n_classes=n_classes,
                  device=device, info=info)
        verdict = judge(head_eval, tuned_eval, **kw)
        if verdict is None:
            return None
        if n_val >= LOSS_TEST_PER_CLASS * n_classes:    # the head must prove itself (module docstring)
            head_wins = judge(tuned_eval, head_eval, **kw)
            verdict = replace(verdict, burden="head",
                              kept="head" if head_wins is not None and head_wins.kept == "finetune" else "finetune")
        self.decision = verdict.to_dict()
        if verdict.kept == "finetune":
            self.say(f"head guard: the finetuned weights of epoch {tuned_epoch} are kept: they were "
                     f"{verdict.evidence()}" + ("" if verdict.burden == "finetune"
                                                else "; the head was not significantly better"))
            return None
        why, more = ((", and the head is significantly better", "") if verdict.burden == "head" else
                     (": not significantly better", ", more validation images give the test more power"))
        self.say(f"head guard: the head of epoch {self.epoch} is kept, not the finetuned weights of epoch "
                 f"{tuned_epoch}: they were {verdict.evidence()}{why}. The finetune phase took {seconds:.0f} s: "
                 f"--freeze head skips it, --no-head-guard keeps its weights{more}")
        self.decision["value"] = float(head_eval.metrics["acc" if monitor == "val_acc" else "loss"])
        self.folder.best(head_state, {"epoch": str(self.epoch), "monitor": "head guard",
                                      "value": repr(min(verdict.p, verdict.p_loss)),
                                      VERDICT_KEY: json.dumps(self.decision, sort_keys=True)})
        return head_state, head_eval


def _settled(best: Path) -> dict[str, Any] | None:
    """The guard's verdict recorded in ``best`` (the run's best.safetensors) when the guard put the head's weights
    there; None otherwise (no such file, the best epoch's weights). A file of a version before the key (its
    metadata's "monitor" says "head guard" alone): the head stays, the test's figures unrecorded."""
    try:
        meta = read_safetensors_header(best).get("__metadata__") or {}
        if VERDICT_KEY not in meta and meta.get("monitor") == "head guard":
            return {"kept": "head", "head_epoch": int(meta["epoch"]), "recorded": False}
        verdict = json.loads(meta[VERDICT_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return verdict if isinstance(verdict, dict) else None
