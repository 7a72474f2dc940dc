"""Parameter groups, optimizers and learning-rate schedules with linear warm-up; the L-BFGS solve of the
convex problems on features.

Every param group records ``name`` ("head" | "backbone"), ``lr_mult`` (1 for the head,
``backbone_lr_mult`` for pretrained layers, times ``layer_decay ** depth`` per stage with layer decay) and
``base_lr`` (head LR x lr_mult). The scheduler scales
``base_lr`` by one factor for all groups, and the LR finder moves every group together with
:func:`set_base_lr`, so pretrained layers always train at ``backbone_lr_mult`` x the head's LR.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finetune.core.errors import ConfigError
from finetune.core.surgery import stage_parameters

__all__ = [
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "set_base_lr",
    "lr_factor",
    "Scheduler",
    "INV_POWER",
    "plateau_patience",
    "lbfgs_minimise",
    "lbfgs_iterations",
]

# "inv" is 1/t decay: lr * (1 + gamma * t) ** -INV_POWER with t in epochs since warm-up ended
# (Caffe's "inv" policy; power 1 is the textbook 1/t decay).
INV_POWER = 1.0


def _is_no_decay(name: str, p: nn.Parameter, skip: set[str]) -> bool:
    # 1-D tensors are biases and norm scales/shifts: decaying them only hurts (the scale is meaningless).
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: nn.Module, head_name: str, lr: float, backbone_lr_mult: float = 0.1,
                 weight_decay: float = 0.0, stages: Sequence[Sequence[str]] | None = None,
                 layer_decay: float = 1.0) -> list[dict]:
    """Split the trainable parameters into head/backbone x decay/no-decay groups.

    Args:
        model: the network, after ``apply_freeze`` (frozen parameters are left out).
        head_name: module name of the classifier; its parameters train at ``lr``.
        lr: the head's learning rate.
        backbone_lr_mult: pretrained layers train at ``lr * backbone_lr_mult``.
        weight_decay: applied to weights only, never to biases, norm parameters or a timm model's
            ``no_weight_decay()`` names (positional embeddings, class tokens).
        stages: module-name prefixes per stage, input -> output (needed for ``layer_decay`` < 1).
        layer_decay: timm's layer-wise LR decay on top of ``backbone_lr_mult``: of ``n`` stages, stage
            ``i`` (0 = input) trains at ``lr * backbone_lr_mult * layer_decay ** (n - i)`` (the head is depth
            0, the last stage depth 1; with ``backbone_lr_mult=1`` this is timm's rule). Parameters that no
            stage lists count as the first stage (stage lists start at the input, as in ``apply_freeze``).
            Frozen stages have no group; 1 = off (one backbone LR).

    Returns:
        Non-empty groups, each ``{"name", "params", "lr", "base_lr", "lr_mult", "weight_decay", "decay"}``
        (backbone groups under layer decay also carry ``"stage"``), head first, then from the last stage.

    Raises:
        ConfigError: nothing is trainable, or layer decay without a stage list.
    """
    skip: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        try:
            skip = set(model.no_weight_decay())
        except Exception:  # a model's own helper failing must not block training
            skip = set()
    per_stage = float(layer_decay) < 1.0
    if per_stage and not stages:
        raise ConfigError("--layer-decay needs the model's stage list; use --layer-decay 1 for this model")
    n = len(stages or ())
    stage_of = {name: i for i, group in enumerate(stage_parameters(model, stages)) for name, _ in group} \
        if per_stage else {}

    buckets: dict[tuple[str, int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name == head_name or name.startswith(head_name + ".")
        depth = 0 if head else (n - stage_of.get(name, 0) if per_stage else 1)
        decay = not _is_no_decay(name, p, skip)
        buckets.setdefault(("head" if head else "backbone", depth, decay), []).append(p)
    if not buckets:
        raise ConfigError("no parameter is trainable; check --freeze and the classifier name")
    groups = []
    for part, depth, decay in sorted(buckets, key=lambda k: (k[1], not k[2])):
        mult = 1.0 if part == "head" else float(backbone_lr_mult) * (float(layer_decay) ** depth if per_stage else 1.0)
        group = {"name": part, "params": buckets[(part, depth, decay)], "lr": lr * mult, "base_lr": lr * mult,
                 "lr_mult": mult, "weight_decay": float(weight_decay) if decay else 0.0, "decay": decay}
        if per_stage and part == "backbone":
            group["stage"] = n - depth
        groups.append(group)
    return groups


def build_optimizer(config: Any, model: nn.Module, head_name: str,
                    stages: Sequence[Sequence[str]] | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over :func:`param_groups`.

    adam (default), sgd (``config.momentum``, ``config.nesterov``), adamw (decoupled decay), rmsprop
    (``config.momentum``), adagrad, adadelta. The LR is ``config.lr`` for the head and
    ``config.lr * config.backbone_lr_mult`` for the pretrained layers, decayed per stage by
    ``config.layer_decay`` (see :func:`param_groups`; ``stages`` needed then). The auto LR is the optimizer's
    (``policy.default_lr``: adadelta's is 1.0, a multiplier on steps it sizes itself).

    Raises:
        ConfigError: unknown optimizer, nesterov without momentum, or nothing trainable.
    """
    name = config.optimizer
    groups = param_groups(model, head_name, config.lr, config.backbone_lr_mult, config.weight_decay, stages,
                          float(getattr(config, "layer_decay", 1.0)))
    lr = config.lr
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        if config.nesterov and not config.momentum > 0:
            raise ConfigError("nesterov needs momentum > 0; set --momentum 0.9 or drop --nesterov")
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=bool(config.nesterov))
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=config.momentum)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr)
    raise ConfigError(f"invalid optimizer={name!r}: choose adam, sgd, adamw, rmsprop, adagrad or adadelta")


def set_base_lr(optimizer: torch.optim.Optimizer, head_lr: float) -> None:
    """Set every group's base and current LR to ``head_lr * lr_mult`` (LR finder, sweeps).

    Build the scheduler after calling this: it starts from ``base_lr``.
    """
    for g in optimizer.param_groups:
        g["base_lr"] = head_lr * g.get("lr_mult", 1.0)
        g["lr"] = g["base_lr"]
        g["initial_lr"] = g["base_lr"]


def plateau_patience(config: Any) -> int:
    """Epochs without improvement before plateau decays: half the early-stopping patience, so the LR
    drops (and gets a chance to help) before early stopping ends the run."""
    return max(1, int(config.patience) // 2)


def lr_factor(schedule: str, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
              step_size: int = 10, gamma: float = 0.1) -> float:
    """The LR multiplier after ``step`` optimizer steps (pure function; the scheduler uses it).

    Warm-up: the first ``W = round(warmup_epochs * steps_per_epoch)`` steps rise linearly to 1
    (``(step + 1) / (W + 1)``). After warm-up, with ``e`` = epochs since warm-up ended (fractional):
    step: ``gamma ** floor(e / step_size)``; exp: ``gamma ** (e / step_size)`` (the smooth version of
    step); inv: ``(1 + gamma * e) ** -INV_POWER``; cosine: ``0.5 * (1 + cos(pi * progress))`` over the
    remaining steps, reaching 0 at the end; none and plateau: 1 (plateau decays per epoch elsewhere).
    """
    spe = max(1, int(steps_per_epoch))
    warm = int(round(float(warmup_epochs) * spe))
    if step < warm:
        return (step + 1) / (warm + 1)
    t = step - warm
    e = t / spe
    if schedule == "step":
        return float(gamma) ** math.floor(e / max(1, int(step_size)))
    if schedule == "exp":
        return float(gamma) ** (e / max(1, int(step_size)))
    if schedule == "inv":
        return (1.0 + float(gamma) * e) ** -INV_POWER
    if schedule == "cosine":
        total = max(1, int(epochs) * spe - warm)
        progress = min(1.0, t / total)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule in ("none", "plateau"):
        return 1.0
    raise ConfigError(f"invalid schedule={schedule!r}: choose step, exp, inv, cosine, plateau or none")


class Scheduler:
    """One interface over every schedule: call ``step_batch()`` after each optimizer step and
    ``step_epoch(val_metric)`` after each validation.

    Non-plateau schedules are a per-step ``LambdaLR`` over :func:`lr_factor`. ``plateau`` warms up with
    a ``LambdaLR`` and then hands over to ``ReduceLROnPlateau`` (stepped per epoch; metric epochs during
    warm-up are ignored, so the warm-up is never cut short).
    """

    def __init__(self, config: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> None:
        if int(config.epochs) < 1 and config.schedule == "cosine":   # the one schedule that needs its length
            raise ConfigError("the schedule needs a number of epochs: epochs=0 (auto) is resolved by "
                              "finetune.engine.build_setup (finetune.core.policy.default_epochs)")
        if float(config.warmup_epochs) < 0:
            raise ConfigError("the warm-up is still auto (-1): finetune.engine.build_setup resolves it "
                              "(finetune.core.policy.default_departure)")
        self.schedule = config.schedule
        self.optimizer = optimizer
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.warmup_steps = int(round(float(config.warmup_epochs) * self.steps_per_epoch))
        self._step = 0
        kwargs = dict(steps_per_epoch=self.steps_per_epoch, epochs=config.epochs,
                      warmup_epochs=config.warmup_epochs, step_size=config.step_size, gamma=config.gamma)
        lr_factor(self.schedule, 0, **kwargs)  # validates the schedule name before anything changes
        self._factor: Callable[[int], float] = lambda s: lr_factor(self.schedule, s, **kwargs)
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"]
            g["initial_lr"] = g["base_lr"]  # LambdaLR only sets it when missing; a rebuilt scheduler restarts
        self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor)
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        if self.schedule == "plateau":
            mode = "max" if getattr(config, "monitor", "val_loss") == "val_acc" else "min"
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=float(config.gamma), patience=plateau_patience(config),
                threshold=float(getattr(config, "min_delta", 1e-4)), threshold_mode="abs")

    def step_batch(self) -> None:
        """Advance one optimizer step."""
        self._step += 1
        # Plateau owns the LR once warm-up is over: stepping LambdaLR then would undo its reductions.
        if self.plateau is None or self._step <= self.warmup_steps:
            if self._step > 1:
                self.warmup.step()
                return
            # torch checks the first step only: when fp16 loss scaling skipped the first optimizer step (its
            # scale overflowed, as it often does at the start on a V100/T4), it warns that the scheduler
            # stepped first. The schedule counts optimizer steps taken or skipped alike, on purpose.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.warmup.step()

    def step_epoch(self, val_metric: float | None = None) -> None:
        """End of an epoch: plateau looks at ``val_metric``; the per-step schedules ignore it.

        A missing or NaN metric (no validation split) leaves plateau's LR unchanged: there is nothing to
        judge a plateau by, and counting it as "no improvement" would decay the LR blindly.
        """
        if self.plateau is None or self._step < self.warmup_steps:
            return
        if val_metric is None or math.isnan(float(val_metric)):
            return
        self.plateau.step(float(val_metric))

    def current_lr(self) -> float:
        """The head group's current LR (the first group when no group is named "head")."""
        for g in self.optimizer.param_groups:
            if g.get("name") == "head":
                return float(g["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def lrs(self) -> list[float]:
        """Current LR of every param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "step": self._step, "steps_per_epoch": self.steps_per_epoch,
                "lrs": self.lrs(),
                "warmup": {k: v for k, v in self.warmup.state_dict().items() if k != "lr_lambdas"},
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position and the groups' current LRs (so it works with or without the optimizer's
        own state being restored too).

        Raises:
            ConfigError: the state belongs to another schedule.
        """
        if state.get("schedule") != self.schedule:
            raise ConfigError(f"the checkpoint used schedule {state.get('schedule')!r}, not {self.schedule!r}; "
                              "resume with the same --schedule or start a new run")
        self._step, lrs = int(state["step"]), state["lrs"]
        warm = dict(state["warmup"])
        saved_spe = int(state.get("steps_per_epoch") or self.steps_per_epoch)
        if saved_spe != self.steps_per_epoch:
            # Resumed on another number of processes, whose loaders drop a last partial batch that the saved
            # run's kept (or the reverse): the same epochs done, counted in this run's steps (QA: the schedule
            # ran ahead, cosine's last epochs at 0.8x and 0.6x their LR). Resumes are at an epoch's end.
            self._step = self._step * self.steps_per_epoch // saved_spe
            warm["last_epoch"] = self._step
            if self.plateau is None or self._step <= self.warmup_steps:
                lrs = [base * self._factor(self._step) for base in warm["base_lrs"]]
        warm["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.warmup.load_state_dict(warm)
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr


def build_scheduler(config: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """The schedule named by ``config.schedule`` with ``config.warmup_epochs`` of linear warm-up.

    Args:
        config: a FinetuneConfig (schedule, warmup_epochs, step_size, gamma, epochs, patience, monitor).
        optimizer: built by :func:`build_optimizer` (groups carry ``base_lr``).
        steps_per_epoch: optimizer steps per epoch.

    Raises:
        ConfigError: unknown schedule.
    """
    return Scheduler(config, optimizer, steps_per_epoch)


# The work one L-BFGS solve may do: a problem of (rows x parameters) up to LBFGS_FULL_SIZE iterates to
# convergence or its max_iter; a bigger one stops after proportionally fewer iterations, never fewer than
# LBFGS_MIN_ITER. Without it, 20,000 images x 2 views of 100 classes (1,280 features) took 90 s per C on
# 2 cores, over 10 minutes before a medium run's first epoch; 50 iterations per C, warm-started along the
# path, reached the converged solve's validation accuracy (docs/benchmarks.md, "The head's solve at size").
LBFGS_FULL_SIZE = 250_000_000
LBFGS_MIN_ITER = 50


def lbfgs_iterations(max_iter: int, rows: int, params: int) -> int:
    """The iterations a solve of ``rows`` x ``params`` gets: ``max_iter`` up to LBFGS_FULL_SIZE, then fewer in
    proportion to its size, at least LBFGS_MIN_ITER (or ``max_iter`` if that is smaller). The same on every
    device, so a run's head does not depend on where it is solved."""
    size = max(1, int(rows) * int(params))
    return max(min(max_iter, LBFGS_MIN_ITER), min(max_iter, max_iter * LBFGS_FULL_SIZE // size))


def lbfgs_minimise(params: Sequence[torch.Tensor], objective: Callable[[], torch.Tensor], max_iter: int, *,
                   rows: int, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-10) -> None:
    """Minimise ``objective()`` (a full-batch loss of ``params`` over ``rows`` samples) in place by L-BFGS with a
    strong-Wolfe line search, at most :func:`lbfgs_iterations` iterations: the one solver of the convex problems
    on features (the head solve, the handedness test, the doctor's label probe)."""
    params = list(params)
    max_iter = lbfgs_iterations(max_iter, rows, sum(int(p.numel()) for p in params))
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
