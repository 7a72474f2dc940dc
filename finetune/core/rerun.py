"""The run a run folder records, as a command to paste: the start-over of the folder (``--overwrite``) and the
new runs named after it, filled from its own files (model.json's model, starting weights and FC dropout,
scan.json's data folder, config.yaml's options), placeholders (MODEL, DIR) only where a record is missing or
damaged. The one reader of those records for every line that names such a command (finetune, its resume, export)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.config import read_config_file
from finetune.core.errors import ConfigError
from finetune.core.io import new_run_command, read_json_object
from finetune.core.policy import AUTO_EPOCHS_FINETUNE

__all__ = ["Recorded", "recorded_run", "model_flags", "kept_run_epochs", "best_trial_command", "start_over_command"]


@dataclass(frozen=True)
class Recorded:
    """What a run folder records of the command that started it: ``model`` and ``data`` (MODEL, DIR where not
    recorded), ``config`` (RUN/config.yaml when it reads as a ``--config`` file, else None) and ``flags``, the
    options outside config.yaml that it records (``--no-pretrained``, ``--fc-dropout``, ``--no-export``,
    ``--exclude``)."""
    model: str
    data: str
    config: Path | None
    flags: tuple[str | Path, ...]


def recorded_run(run_dir: str | Path) -> Recorded:
    """The records of the run in ``run_dir`` (read, never trusted: each field checked for its type)."""
    run = Path(run_dir)
    info, scan = read_json_object(run / "model.json"), read_json_object(run / "scan.json")
    model, root = info.get("model"), scan.get("root")
    kwargs = info.get("builder_kwargs")      # (drop_rate: recorded only for a model with VGG's FC dropout)
    flags = [*model_flags(info.get("pretrained"), kwargs.get("drop_rate") if isinstance(kwargs, dict) else None),
             *(("--no-export",) if info.get("export") is False else ()),
             *(("--exclude", run / "exclude.txt") if (run / "exclude.txt").is_file() else ())]
    return Recorded(model=model if isinstance(model, str) and model.strip() else "MODEL",
                    data=root if isinstance(root, str) and root else "DIR",
                    config=_config(run / "config.yaml"), flags=tuple(flags))


def model_flags(pretrained: Any, fc_dropout: Any) -> tuple[str, ...]:
    """The flags of the network a command built, for every line that names a new run of it (the start-over, a
    sweep's best trial, lr-find's and sweep's ``next:``): ``--no-pretrained`` where ``pretrained`` is False, and
    ``--fc-dropout P`` for an FC dropout (model.json's ``builder_kwargs.drop_rate``: the value the run used, given
    or the default; sweep.json's ``identity.fc_dropout`` and lr-find's, sweep's flag: the one given, None for
    none), exact (``repr``: ``:g`` rounded 0.1234567 to 0.123457); nothing for a value the flag does not take."""
    ok = isinstance(fc_dropout, (int, float)) and not isinstance(fc_dropout, bool) and 0 <= fc_dropout < 1
    return (*(("--no-pretrained",) if pretrained is False else ()),
            *(("--fc-dropout", repr(float(fc_dropout))) if ok else ()))


def kept_run_epochs(trial_epochs: int) -> int:
    """``--epochs`` of the run to keep after a sweep whose trials ran ``trial_epochs``: the trials are short on
    purpose (5 by default), so the auto epochs (0: the measured policy, 8 when layers train, 30 head only;
    docs/peers.md), or the trials' own where they ran longer (it was max(30, trials'), from before the policy)."""
    return int(trial_epochs) if int(trial_epochs) > AUTO_EPOCHS_FINETUNE else 0


def best_trial_command(sweep: str | Path) -> str:
    """The new run with the options of the best trial of the ``zoo sweep`` in ``sweep`` (``--config
    SWEEP/best_config.yaml``) and :func:`kept_run_epochs`, of the model, starting weights, FC dropout and data
    folder its sweep.json records (DIR for a sweep recorded before the data folder was)."""
    spec = read_json_object(Path(sweep) / "sweep.json")
    fixed, data = spec.get("fixed"), spec.get("data_dir")
    fixed = fixed if isinstance(fixed, dict) else {}
    who = fixed.get("identity") if isinstance(fixed.get("identity"), dict) else {}
    epochs = fixed.get("config", {}).get("epochs") if isinstance(fixed.get("config"), dict) else None
    model = who.get("model")
    return new_run_command("--config", Path(sweep) / "best_config.yaml",
                           *(("--epochs", kept_run_epochs(epochs)) if isinstance(epochs, int) else ()),
                           *model_flags(who.get("pretrained"), who.get("fc_dropout")),
                           model=model if isinstance(model, str) and model.strip() else "MODEL",
                           data=data if isinstance(data, str) and data else "DIR")


def _config(path: Path) -> Path | None:
    """``path`` when ``--config path`` would take it (the full check a new run makes), else None."""
    if not path.is_file():
        return None
    try:
        read_config_file(path)
    except ConfigError:
        return None
    return path


def start_over_command(run_dir: str | Path, *more: str | Path, config: bool = True, model: bool = True) -> str:
    """The new run into the run folder ``run_dir``, which already holds one (``--overwrite``), as its records
    (:func:`recorded_run`) say it was started: model, data, ``--config RUN/config.yaml`` (read before
    ``--overwrite`` empties the folder), the flags outside it, then ``more``: options that change the run
    (``--micro-batch 4``, ``--bn eval``), which a typed flag makes win over the file. ``config=False``: a line
    said because config.yaml is in doubt leaves it out; ``model=False``: one said because model.json's model is
    in doubt leaves MODEL. Launched as this process was (:func:`io.new_run_command`, torchrun-aware)."""
    rec = recorded_run(run_dir)
    cfg = ("--config", rec.config) if config and rec.config is not None else ()
    return new_run_command("--out", Path(run_dir), "--overwrite", *cfg, *rec.flags, *more,
                           model=rec.model if model else "MODEL", data=rec.data)
