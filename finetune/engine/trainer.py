"""``fit``'s phase loop: head surgery + freeze decision (the setup) + an optional head phase + the
finetune phase, with early stopping, a checkpoint after every epoch, exact resume, a NaN guard,
progress, and the run folder.

One loop for every path: an epoch's batches come from :class:`LoaderSteps` (images through the
network) or from any other object with the same three methods (the cached-feature head path of
``finetune.tools.features`` is one); the loop alone keeps the history, the LR log, early stopping, the best
weights, checkpoints and the printout, so each is done once.

Reproducibility: everything random in epoch ``e`` is seeded from ``(config.seed, e, rank)`` at its start
(``finetune.core.seeding``), so a run resumed from the checkpoint of epoch ``e - 1`` replays epoch ``e``
exactly as an uninterrupted run would.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.checkpoint import BEST, CpuStateCache, cpu_copy, load_weights
from finetune.engine.guard import Evaluation, HeadGuard
from finetune.engine.epoch_steps import EpochSteps, LoaderSteps
from finetune.engine.passes import diverged
from finetune.engine.runfolder import RunFolder
from finetune.engine.setup import Log, Setup
from finetune.core.errors import CheckpointError, DataError, stops_run
from finetune.core.rerun import start_over_command
from finetune.core.metrics import EarlyStopping, accuracy_text
from finetune.core.monitor import advise, data_advice, waited
from finetune.core.policy import head_competes, plan_phases
from finetune.core.seeding import epoch_seed, rng_state, seed_everything, set_rng_state
from finetune.core.signals import sigterm_as_interrupt
from finetune.core.surgery import apply_freeze

__all__ = ["FitResult", "Trainer"]

# curves.png is redrawn at most this often (and after a phase's last epoch): a drawing costs more than an
# epoch on cached features (docs/benchmarks.md, "When curves.png is redrawn"). The other files are written
# after every epoch, last.pt and the weights in the background while the next epoch trains: a SIGKILL loses
# at most the epoch in progress and the one before it, when its files were still on their way.
CURVES_EVERY_S = 30.0


@dataclass
class FitResult:
    """What ``fit`` returns. ``model`` holds the best epoch's weights (unwrapped, on the training device)."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    run_dir: Any                        # Path | None
    decision: Any                       # finetune.core.policy.FreezeDecision
    metrics: dict = field(default_factory=dict)   # val metrics of the returned weights: loss, acc, per_class, confusion
    # softmax probabilities of the returned weights on the val set, one row per image in val_set order (a float
    # tensor [n_val, C] on the CPU; a row of NaN: an image that failed to decode), on every rank; None when unknown
    val_probs: Any = None


class Trainer:
    """Runs the phases of one setup into one run folder. ``head_steps`` (optional) computes the head
    phase's epochs instead of :class:`LoaderSteps` (e.g. on cached features)."""

    def __init__(self, setup: Setup, run: RunFolder, *, resume: bool = False, log: Log | None = None,
                 callbacks: Iterable[Callable[[dict], Any]] = (), head_steps: EpochSteps | None = None) -> None:
        self.s = setup
        self.folder = run
        self.resume = resume
        self.seconds_before, self.t_run = 0.0, time.perf_counter()
        self.callbacks = list(callbacks)
        main = setup.info.is_main
        self.say: Log = log if (log is not None and main) else (lambda _msg: None)
        self.epoch_say: Log = (lambda _msg: None) if setup.config.quiet else self.say
        self.loader_steps = LoaderSteps(setup, run, self.say)     # (a warm-up out of memory: smaller passes)
        self.head_steps = head_steps
        self.phases, self.warm_cap = plan_phases(setup.decision.trainable_stages, setup.config)
        mode = "max" if setup.config.monitor == "val_acc" else "min"
        self.stopper = EarlyStopping(int(setup.config.patience), float(setup.config.min_delta), mode)
        self.head_stop = EarlyStopping(patience=1, min_delta=float(setup.config.min_delta), mode="min")
        self.history: list[dict] = []
        self.epoch, self.pi, self.phase_start, self.stopped_early = 0, 0, None, False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.optimizer = self.scheduler = None
        self.scaler = setup.amp.make_scaler()
        self.advised: set[str] = set()    # advice already printed during this run (each rule once)
        self.ckpt: dict | None = None
        self.snapshot = CpuStateCache(setup.model)    # the frozen backbone is copied once, not every epoch
        self._ema_snapshot: CpuStateCache | None = None
        # the best weights' evaluation, kept: the run's end need not pass the validation set through the net again
        self.best_eval: Evaluation | None = None
        # (through a weak reference: the guard holding the trainer's bound method would keep the trainer, its
        # setup, model and optimizer state, past the end of fit in a reference cycle, until a garbage collection)
        evaluate_state = weakref.WeakMethod(self._evaluate_state)
        self.guard = HeadGuard(run, lambda state: evaluate_state()(state), self.say)
        # the cached head's mirror test (--hflip auto): when it dropped the mirror, finetuning trains unflipped
        self.mirror: dict | None = None
        self.solver_path: list[dict] = []    # the head's L-BFGS solve (summary.json), kept across a resume
        self._curves_at = time.perf_counter()    # the first drawing waits CURVES_EVERY_S, or a phase's end

    # ------------------------------------------------------------------------------------ state
    def _weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights the run validates: the EMA's while one is kept, else the model's."""
        ema = self.loader_steps.ema
        if ema is None:
            return self.snapshot()
        if self._ema_snapshot is None or self._ema_snapshot.module is not ema.module:
            self._ema_snapshot = CpuStateCache(ema.module)
        return self._ema_snapshot()

    def _restore(self) -> None:
        ckpt = self.folder.load_resume(self.s.classes, self.s.config)
        try:
            self.s.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:     # another architecture (an edited model name): one line, not 60
            first, run = str(err).strip().splitlines()[-1].strip().rstrip("."), self.folder.path
            over = start_over_command(run, model=False)     # (model.json's model is what is in doubt)
            raise CheckpointError(f"{run / 'checkpoints' / 'last.pt'} holds the weights of another model than the "
                                  f"one built to continue it ({first}): was the model named in {run / 'model.json'} "
                                  "changed since? Put the one the run trained back to continue it, or start the run "
                                  f"over with `{over}`") from None
        if hasattr(self.s.head_module, "FIXED"):    # the run's own rule: begun before MLPHead.FIXED, it trained
            self.s.head_module.FIXED = tuple(ckpt.get("head_fixed", ()))    # fc1.bias (its optimizer holds it)
        self.epoch, self.pi, self.phase_start = int(ckpt["epoch"]), int(ckpt["phase_index"]), ckpt["phase_start"]
        self.stopped_early = bool(ckpt["stopped_early"])
        self.stopper.load_state_dict(ckpt["early_stop"])
        self.head_stop.load_state_dict(ckpt["head_stop"])
        self.history = list(ckpt["history"])
        self.guard.epoch = ckpt.get("head_epoch")
        self.mirror = ckpt.get("mirror")
        self.solver_path = list(ckpt.get("head_solver") or [])
        self.seconds_before = float(ckpt.get("seconds", 0.0))    # the earlier processes' time, to their last save
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if (self.folder.path / BEST).is_file():
            self.best_state = load_weights(self.folder.path / BEST)
        self.ckpt = ckpt
        self.say(f"resuming {self.folder.path} after epoch {self.epoch}")

    def _seconds(self) -> float:
        """The run's training time: this process's so far plus, after a resume, the earlier ones' to their
        last checkpoint (an epoch cut off by an interruption is not counted: it is run again)."""
        return self.seconds_before + time.perf_counter() - self.t_run

    def _checkpoint(self, next_pi: int, start: int | None) -> None:
        """last.pt after an epoch (or before the first): ``next_pi``/``start`` say where to go on."""
        if not self.folder.writes:
            return
        running = next_pi < len(self.phases) and start is not None and self.optimizer is not None
        d = self.s.decision
        self.folder.checkpoint({
            "epoch": self.epoch, "phase_index": next_pi, "phase_start": start, "phases": list(self.phases),
            "finished": next_pi >= len(self.phases), "stopped_early": self.stopped_early,
            "model": self.snapshot(),
            # copies that the next steps cannot change: the file is written in the background
            "optimizer": cpu_copy(self.optimizer.state_dict()) if running else None,
            "scheduler": cpu_copy(self.scheduler.state_dict()) if running else None,
            "scaler": cpu_copy(self.scaler.state_dict()) if self.scaler is not None else None,
            "early_stop": self.stopper.state_dict(), "head_stop": self.head_stop.state_dict(),
            "head_epoch": self.guard.epoch, "mirror": cpu_copy(self.mirror), "head_solver": cpu_copy(self.solver_path),
            "ema": ({"updates": self.loader_steps.ema.updates, "model": self._weights()}
                    if running and self.loader_steps.ema is not None else None),
            "rng": rng_state(), "history": cpu_copy(self.history), "config": self.s.config.to_dict(),
            "seconds": self._seconds(),
            "classes": self.s.classes, "head_fixed": list(getattr(self.s.head_module, "FIXED", ())),
            "decision": d.to_dict() if hasattr(d, "to_dict") else dict(vars(d)),
        })

    def _record(self, row: dict, metric: float, improved: bool, final: bool, steps: EpochSteps) -> None:
        """After an epoch's evaluation: best weights, metrics.csv, curves, TensorBoard, the printout."""
        s = self.s
        self.folder.flush()       # the last epoch's files are on disk before this one's are handed over
        self.history.append(row)
        if not s.has_val or improved:
            self.best_state = self._weights()
            self.folder.best(self.best_state, {"epoch": str(row["epoch"]), "monitor": s.config.monitor,
                                               "value": repr(metric)})
        self.folder.metrics(self.history)
        if final or time.perf_counter() - self._curves_at >= CURVES_EVERY_S:
            best = row["epoch"] if (not s.has_val or improved) else self.stopper.best_epoch
            self.folder.curves(self.history, best if best > 0 else None)
            self._curves_at = time.perf_counter()
        self.epoch_say(f"epoch {row['epoch']}/{s.config.epochs} {row['phase']}{steps.label}: train loss "
                       f"{row['train_loss']:.4f} acc {accuracy_text(row['train_acc'])} | val loss "
                       f"{row['val_loss']:.4f} acc {accuracy_text(row['val_acc'])} | {_lr_text(row)} | "
                       f"{row['images_per_s']:.0f} img/s{waited(row)}")
        # the lecture's reading of the curves, as soon as a rule fires; the loader's speed
        for line in advise(self.history) + data_advice(row, s.device.type, s.config.decode):
            rule = " ".join(line.split()[:3])
            if rule not in self.advised:
                self.advised.add(rule)
                self.say(f"advice (after epoch {row['epoch']}): {line}")

    # ------------------------------------------------------------------------------------ loop
    def _begin_phase(self, phase: str) -> tuple[EpochSteps, bool]:
        s, config = self.s, self.s.config
        warmup = phase == "head" and not s.head_only
        self._enter_phase(phase)
        phase_config = config
        if warmup:   # the head warm-up trains at the plain head LR; the schedule belongs to finetuning
            phase_config = config.replace(schedule="none", warmup_epochs=0.0)
        continuing = self.phase_start is not None
        if not continuing:
            self.phase_start = self.epoch
        if phase == "finetune":
            # the remaining epochs form the finetune schedule (cosine ends at the last one)
            phase_config = config.replace(epochs=max(1, int(config.epochs) - self.phase_start))
            if not continuing:      # unfreezing gets the full patience; a head it cannot be compared with, no best
                self.stopper.restart(forget_best=not head_competes(config))
        self.optimizer = s.optimizer(phase_config)
        self.scheduler = s.scheduler(self.optimizer, phase_config)
        resumed = self.ckpt if continuing else None
        if resumed is not None and resumed.get("optimizer") is not None:
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
        self.ckpt = None      # only the first phase after a resume continues from it
        steps = self._steps_for(phase)
        steps.begin_phase(phase)
        if resumed is not None and resumed.get("ema") is not None and self.loader_steps.ema is not None:
            self.loader_steps.ema.load_state_dict(resumed["ema"])
        return steps, warmup

    def _enter_phase(self, phase: str) -> None:
        """The model and data as ``phase`` trains them: its trainable layers; for finetuning, the training views
        the head phase's mirror test left (``--hflip`` auto)."""
        s = self.s
        apply_freeze(s.model, s.stages, s.head, 0 if phase == "head" else s.decision.trainable_stages)
        if phase == "finetune" and (self.mirror or {}).get("dropped"):
            s.train_without_flip()

    def start_finetuning(self) -> None:
        """The model as the finetune phase starts from, untrained by it: the head phase first when the plan has one
        (the head solved or warmed up, the mirror test's verdict), then the finetune phase's trainable layers and
        views. Where ``diagnostics.lr_find`` probes from: the range test trains what finetuning trains."""
        self._run_phases(self.phases.index("finetune"))
        self._enter_phase("finetune")

    def _run_phases(self, until: int) -> None:
        """The phases from ``self.pi`` up to ``until`` (excluded), each to its end."""
        while self.pi < until:
            phase = self.phases[self.pi]
            steps, warmup = self._begin_phase(phase)
            while not self._run_epoch(phase, steps, warmup):
                pass
            self.pi += 1
            self.phase_start = None

    def _steps_for(self, phase: str) -> EpochSteps:
        """What computes ``phase``'s epochs: the head steps given (cached features) for the head phase."""
        return self.head_steps if (phase == "head" and self.head_steps is not None) else self.loader_steps

    def _run_epoch(self, phase: str, steps: EpochSteps, warmup: bool) -> bool:
        """One epoch; returns whether the phase is done."""
        s, config = self.s, self.s.config
        self.epoch += 1
        seed_everything(epoch_seed(config.seed, self.epoch, s.info.rank))   # dropout, workers=0 draws
        lr = self.scheduler.current_lr()       # the LR this epoch trains with (logged as such)
        t0 = time.perf_counter()
        tr = steps.train_epoch(self.epoch, phase, self.optimizer, self.scheduler, self.scaler)
        lr_to = self.scheduler.current_lr()      # (the epoch line's, not metrics.csv's: HISTORY_KEYS)
        va = steps.evaluate()
        lost = self.loader_steps.nothing_loaded(tr, va, steps.failures())    # the data changed since the scan
        if lost:
            raise DataError(f"{lost} in epoch {self.epoch}: has the data folder moved or changed since the scan?"
                            + (f" Put it back and continue with `{self.folder.resume_command()}`"
                               if self.folder.writes else ""))
        if s.has_val and not math.isfinite(va["loss"]):       # no best epoch could follow (NaN never improves)
            raise diverged(self.epoch, None, lr, va["loss"])
        metric = va["acc"] if config.monitor == "val_acc" else va["loss"]
        self.scheduler.step_epoch(metric if s.has_val else None)
        row = {"epoch": self.epoch, "phase": phase, "train_loss": tr["loss"], "train_acc": tr["acc"],
               "val_loss": va["loss"], "val_acc": va["acc"], "lr": lr, "seconds": time.perf_counter() - t0,
               **({"lr_to": lr_to} if lr_to > 1.5 * lr else {}),
               "images_per_s": tr["images_per_s"],       # the loader's wait; cached features load no file:
               "data_wait": tr.get("data_wait", math.nan) if steps is self.loader_steps else math.nan}
        if tr.get("solver"):      # a solved head (L-BFGS): no learning rate was used, whatever --lr says
            row["solver"], row["lr"] = tr["solver"], math.nan     # ("nan" in metrics.csv; the curves skip it)
        improved = s.has_val and self.stopper.improved(metric)
        if improved:
            self.best_eval = Evaluation.of(steps, va)
        stop = self.stopper.step(metric, self.epoch) if s.has_val else False
        if warmup:
            head_improving = not self.head_stop.step(va["loss"], self.epoch) if s.has_val else True
            done = (self.epoch - self.phase_start >= self.warm_cap
                    or (config.head_epochs < 0 and not head_improving))
        else:
            self.stopped_early = stop and self.epoch < int(config.epochs)
            done = stop or self.epoch >= int(config.epochs)
        done = done or bool(tr.get("phase_done"))     # e.g. a head solved to convergence in one step
        if phase == "head" and getattr(steps, "mirror", None) is not None:
            self.mirror = steps.mirror
        if phase == "head" and getattr(steps, "solver_path", None):
            self.solver_path = list(steps.solver_path)
        self._record(row, metric, improved, done, steps)
        if warmup and done:
            self._end_head_phase()
        if not warmup and self.stopped_early:
            self.epoch_say(f"early stop after epoch {self.epoch} (best epoch {self.stopper.best_epoch})")
        self._checkpoint(self.pi + 1, None) if done else self._checkpoint(self.pi, self.phase_start)
        if self.callbacks:
            self.folder.flush()      # callbacks run after their epoch has been checkpointed (fit's promise)
        for cb in self.callbacks:
            cb(row)
        return done

    # ------------------------------------------------------------------------------------ head guard
    def _end_head_phase(self) -> None:
        """The head phase's best weights and evaluation, held for the guard (``config.head_guard``)."""
        s = self.s
        if s.config.head_guard and s.has_val and self.best_state is not None:
            self.guard.hold(self.stopper.best_epoch, self.best_state, self.best_eval)

    def _evaluate_state(self, state: dict[str, torch.Tensor]) -> Evaluation:
        """``state``'s evaluation through the network."""
        self.s.model.load_state_dict(state)
        return Evaluation.of(self.loader_steps, self.loader_steps.evaluate(full=True))

    def _guard_head(self) -> None:
        """After a head phase and finetuning: the guard decides which weights stay the run's best."""
        s = self.s
        if self.best_state is None or not s.config.head_guard:
            return
        kept = self.guard.settle(self.stopper.best_epoch, self.best_state, self.best_eval,
                                 seconds=sum(r["seconds"] for r in self.history if r["phase"] == "finetune"),
                                 monitor=s.config.monitor, n_val=len(s.val_set), n_classes=len(s.classes),
                                 device=s.device, info=s.info)
        if kept is not None:
            self.best_state, self.best_eval = kept
            self.folder.curves(self.history, self.guard.epoch)

    def run(self) -> FitResult:
        s = self.s
        if self.resume:
            self._restore()
            if self.pi >= len(self.phases):     # finished: nothing trains, its summary keeps the epochs it ran with
                trained = int(self.ckpt["config"].get("epochs", s.config.epochs))
                if note := self.folder.finished_note(self.epoch, self.stopped_early, int(s.config.epochs), trained):
                    self.say(note)
                s.config = s.config.replace(epochs=trained)
        else:
            self.folder.refuse_existing_run()
        if self.pi < len(self.phases) and self._steps_for(self.phases[self.pi]) is self.loader_steps:
            self.loader_steps.start_ahead(self.epoch + 1)     # decoding while the run gets ready
        for line in (f"freeze: {s.decision.label} ({s.decision.reason})", *s.chosen.values(), *s.notes):  # that order
            self.say(line)
        self._say_unused_epochs()
        self.folder.start(s.config, s.train_set, s.val_set, s.device, s.info, self.resume, self.epoch, s.in_effect)
        t_run = self.t_run = time.perf_counter()
        try:
            with sigterm_as_interrupt():
                if self.ckpt is None:
                    self._checkpoint(0, None)      # an interruption during epoch 1 can resume too
                else:
                    set_rng_state(self.ckpt["rng"])
                self._run_phases(len(self.phases))
                self.folder.flush()     # the last epoch's files, while SIGTERM still stops the run cleanly
        except BaseException as e:   # a divergence, a data or device error: what was handed over reaches the disk
            if stops_run(e):     # Ctrl-C, SIGTERM, out of memory: what is saved, how to go on
                raise self.folder.stopped(self.epoch, e, self.loader_steps) from None
            self.folder.close()
            self.folder.flush()      # (the last good epoch's checkpoint, when a divergence message says so)
            raise
        self.folder.close()
        failed = self.loader_steps.failures()
        if self.head_steps is not None:
            for path, reason in self.head_steps.failures().items():
                failed.setdefault(path, reason)
        try:
            self.folder.decode_failures(failed, self.say)
            return self._finish(t_run)
        except BaseException as e:    # Ctrl-C or out of memory in the head guard, summary.json: a resume writes them
            if not stops_run(e):
                raise
            raise self.folder.stopped(self.epoch, e, self.loader_steps) from None
        finally:
            self.folder.flush()

    def _say_unused_epochs(self) -> None:
        """Notes for options that the phase plan leaves unused: --ema in a head-only run, and --head-epochs
        beyond what --epochs leaves room for (QA: --head-epochs 3 --epochs 1 ran no head phase, unsaid)."""
        config = self.s.config
        if config.ema > 0 and "finetune" not in self.phases:
            self.say("note: --ema averages the weights of the finetune phase; this run trains the head only, "
                     "so the average is not used (pass --freeze to finetune layers)")
        asked, room = int(config.head_epochs), (self.warm_cap if "head" in self.phases else 0)
        if "finetune" in self.phases and room < asked:
            self.say(f"note: --epochs {config.epochs} leaves room for {room} of the {asked} head epoch(s) asked "
                     "(--head-epochs): a run keeps at least one epoch to finetune; raise --epochs for them")

    def _finish(self, t_run: float) -> FitResult:
        """The best weights (after the head guard), their full metrics, the summary."""
        s = self.s
        self._guard_head()
        if self.best_state is not None:
            s.model.load_state_dict(self.best_state)
        s.model.eval()      # returned ready to predict, whichever path (cached features, no val set) ran last
        reverted = self.guard.reverted     # the head guard kept the head
        best_epoch = self.stopper.best_epoch if s.has_val else (self.history[-1]["epoch"] if self.history else 0)
        if reverted:
            best_epoch = self.guard.epoch
        # a run that ended in a cached-feature head phase evaluates on its features (what the head sees)
        final = (self.head_steps if (self.head_steps is not None and self.phases[-1] == "head"
                                     and getattr(self.head_steps, "ready", False)) else self.loader_steps)
        metrics, probs = {}, None
        if s.has_val:
            kept = self.best_eval
            # The best epoch's own evaluation holds the same numbers as a new pass over the restored best
            # weights (same module, eval mode, same loader), unless it went through torch.compile or
            # another path; after a resume it is not in memory.
            if (kept is not None and kept.steps is final and not s.config.compile
                    and "per_class" in kept.metrics and "confusion" in kept.metrics):
                metrics, probs = dict(kept.metrics), kept.probs
            else:
                metrics, probs = final.evaluate(full=True), getattr(final, "val_probs", None)
            probs = final.all_val_probs(probs) if final is self.loader_steps else probs   # (the cached head's: all)
        metrics = {("val_" + k if k in ("loss", "acc") else k): v for k, v in metrics.items()}
        d = s.decision
        self.folder.flush()       # the head guard's best.safetensors is on disk before the summary names it
        now = time.perf_counter()
        self.folder.summary({
            "best_epoch": best_epoch, "monitor": s.config.monitor,
            "best_phase": next((r["phase"] for r in self.history if r["epoch"] == best_epoch), None),
            "best_value": (self.guard.decision["value"] if reverted else self.stopper.best if s.has_val else None),
            "metrics": metrics, "epochs_run": self.epoch, "max_epochs": int(s.config.epochs),
            "stopped_early": self.stopped_early, "phases": self.phases,
            "freeze": d.to_dict() if hasattr(d, "to_dict") else dict(vars(d)),
            "advice": advise(self.history), "device": str(s.device), "world_size": s.info.world_size,
            "head_guard": self.guard.decision, "in_effect": s.in_effect,
            "head_solver": self.solver_path or None, "mirror": self.mirror,
            "seconds": round(self.seconds_before + now - t_run, 3), "classes": s.classes,
            **({"seconds_this_process": round(now - t_run, 3)} if self.resume else {}),
        })
        ddp.barrier(s.info)
        return FitResult(model=s.model, history=self.history, best_epoch=best_epoch,
                         stopped_early=self.stopped_early, run_dir=self.folder.path, decision=d, metrics=metrics,
                         val_probs=probs)


def _lr_text(row: dict) -> str:
    """The epoch line's learning rate: the solver instead where the head was solved (no LR in play)."""
    warm = f" -> {row['lr_to']:.3g} (warm-up)" if row.get("lr_to") else ""     # (where a warm-up epoch's LR went)
    return f"solved by {row['solver']}, no lr" if row.get("solver") else f"lr {row['lr']:.3g}{warm}"

