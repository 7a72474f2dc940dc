"""The training engine every tool stands on (imports run downward: tools -> engine -> data):

- ``runtime``: the device resolver, the one mixed-precision policy, the loss, batches to the device;
- ``setup``: one :class:`Setup` built once (prepared model, loss, AMP policy, loaders);
- ``steps``: ``train_one_epoch`` / ``evaluate``;
- ``runfolder``: the run folder's writers;
- ``trainer``: ``fit``'s phase loop (:class:`Trainer`).
"""
from __future__ import annotations

from finetune.engine.runfolder import CHECKPOINT_FORMAT, HISTORY_KEYS, RESUME_FREE, RunFolder
from finetune.engine.runtime import (AmpPolicy, amp_policy, build_loss, nhwc, resolve_device, check_machine,
                                     caller_state_kept, idle_gpus_note, to_device)
from finetune.engine.setup import Setup, build_setup
from finetune.engine.passes import diverged, optimizer_step
from finetune.engine.steps import evaluate, train_one_epoch
from finetune.engine.epoch_steps import EpochSteps, LoaderSteps
from finetune.core.policy import HEAD_WARMUP_CAP, plan_phases
from finetune.engine.trainer import FitResult, Trainer

__all__ = [
    "resolve_device", "check_machine", "idle_gpus_note", "nhwc", "AmpPolicy", "amp_policy", "build_loss", "to_device",
    "caller_state_kept",
    "Setup", "build_setup", "train_one_epoch", "evaluate", "optimizer_step", "diverged",
    "RunFolder", "HISTORY_KEYS", "CHECKPOINT_FORMAT", "RESUME_FREE",
    "Trainer", "EpochSteps", "LoaderSteps", "FitResult", "HEAD_WARMUP_CAP", "plan_phases",
]
