"""The FinetuneConfig flags shared by ``zoo finetune``, ``zoo lr-find`` and ``zoo sweep``, generated from
``finetune.core.config.OPTIONS`` (help line, choices, range): one definition, so the commands cannot drift apart.

Ranges are shown in ``--help`` but checked in one place, ``FinetuneConfig.validate`` (exit 2, before any run
folder is written), so YAML values and flags get the same one-line message. The other commands' bounded
options use :class:`IntRange` and :class:`FiniteFloatRange`; every range reads one way, ``[default: D; RANGE]``
(``finetune.core.config.range_text``; :class:`RangedOption` for a range or default click cannot show). No torch
at import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Iterator

import click
from click.core import ParameterSource

from finetune.core.config import (OPTIONS, FinetuneConfig, range_text, read_config_file, short_repr,
                                  unknown_options)
from finetune.core.errors import ConfigError, FreezeTooDeepError
from finetune.core.io import archive_kind, broken_link, unexpanded_home
from finetune.core.policy import default_bn
from finetune.core.yamlschema import as_bool, as_int
from zoo.errors import FcDropoutError, UnknownModelError, UsageError

__all__ = ["config_options", "config_file_option", "file_keys", "given_options", "fc_dropout_option", "bn_default",
           "read_config", "idle_options", "resolve_config", "FiniteFloatRange", "Folder", "IntRange", "RangedOption",
           "NOT_IN_A_FILE", "read_of_the_file", "file_notes"]

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


class Folder(click.Path):
    """``click.Path(file_okay=False, ...)`` for a folder to read (``--data``, ``zoo doctor DIR``, a run or bundle
    folder) that names a symbolic link which loops or leads nowhere for what it is, with the way on (click said
    "Directory 'loop' does not exist", and the scan "does not exist or is not a folder"). ``what``: the folder
    the link should lead to, as the message names it."""

    def __init__(self, what: str = "image folder", **kwargs: Any) -> None:
        super().__init__(file_okay=False, **kwargs)
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        link = broken_link(os.fspath(value)) if isinstance(value, (str, os.PathLike)) and value else None
        if link is not None:
            self.fail(f"{link}: point the link at the {self.what}, or give the folder itself", param, ctx)
        if isinstance(value, (str, os.PathLike)) and value and os.path.isfile(value):
            # (audit: `--data photos.zip` was click's "Directory 'photos.zip' is a file.", no way on)
            kind = archive_kind(value)
            self.fail(f"{value} is a {kind} archive, not a folder: extract it, then give the {self.what} it holds"
                      if kind else f"{value} is a file, not a folder: give the {self.what}", param, ctx)
        home = unexpanded_home(value) if isinstance(value, (str, os.PathLike)) and value else None
        if home is not None:        # (audit: `--data "~/photos"` said ".../~/photos does not exist")
            self.fail(f"{value} begins with ~, which the shell expands only when it is not quoted: give {home} (or "
                      "leave the ~ unquoted)", param, ctx)
        return super().convert(value, param, ctx)


class _RangeText:
    """Click's number ranges described in zoo's one form (``finetune.core.config.range_text``: "x >= 1", not
    click's "x>=1"), in ``--help`` and in click's own out-of-range message."""

    def _describe_range(self) -> str:
        return range_text(self.min, self.max, self.min_open, self.max_open)


class IntRange(_RangeText, click.IntRange):
    """``click.IntRange`` whose range reads as every other option's (:class:`_RangeText`), as is its metavar
    (INTEGER, as a config option's: the range is in the help's brackets)."""

    name = "integer"


class RangedOption(click.Option):
    """A click option whose help ends as every option's: ``[default: D; RANGE]``. ``allowed``: the range of a
    number option whose type is no click range (a config option, checked by FinetuneConfig.validate);
    ``default_text``: a default told in words ("the config's, else 5") where the value is decided later."""

    def __init__(self, *args: Any, allowed: str = "", default_text: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed, self.default_text = allowed, default_text

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.default_text:
            extra["default"] = self.default_text
        if self.allowed:
            extra["range"] = self.allowed
        return extra


def _allowed(name: str) -> str:
    """A config option's range for its ``--help`` (closed sets are listed by click.Choice itself)."""
    option = OPTIONS[name]
    return "" if option.choices is not None else option.range_text()


class FiniteFloatRange(_RangeText, click.FloatRange):
    """``click.FloatRange`` that refuses nan and inf too (click's lets nan through, every comparison with it
    being false, and inf wherever there is no upper bound), with the one line of a zoo usage error (exit 2).
    Its metavar is FLOAT, as a config option's."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)      # not a number at all: click's own message
        finite = math.isfinite(number)
        if finite:
            try:
                return super().convert(number, param, ctx)
            except click.BadParameter:
                pass
        name, flag = (param.name, param.opts[0]) if param is not None else ("value", "")
        raise UsageError(f"invalid {name}={number} ({flag}): allowed: {self._describe_range()}"
                         + ("" if finite else ", a finite number"))


def config_options(skip: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per FinetuneConfig field not in ``skip`` (booleans as
    --x/--no-x pairs; ``lr`` also takes "auto"; closed sets as click.Choice)."""
    skip = set(skip)

    def decorate(func: Callable) -> Callable:
        defaults = FinetuneConfig()
        for f in reversed(dataclasses.fields(FinetuneConfig)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = getattr(defaults, f.name)
            option = OPTIONS[f.name]
            if isinstance(default, bool):
                opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, show_default=True,
                                   help=option.help)
            elif f.name == "lr":
                opt = click.option(flag, f.name, default=str(default), show_default=True, metavar="LR|auto",
                                   help=option.help, cls=RangedOption, allowed=_allowed(f.name))
            elif option.choices is not None:
                opt = click.option(flag, f.name, type=click.Choice(option.choices), default=default,
                                   show_default=True, help=option.help)
            else:
                opt = click.option(flag, f.name, type=_CLICK_TYPES[type(default)], default=default,
                                   show_default=True, help=option.help, cls=RangedOption, allowed=_allowed(f.name))
            func = opt(func)
        return func
    return decorate


def given_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the config options the user actually set on the command line (or through the environment)."""
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return {name: value for name, value in values.items()
            if name in names and ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                                     ParameterSource.ENVIRONMENT)}


def fc_dropout_option(func: Callable) -> Callable:
    """``--fc-dropout``: VGG's FC-4096 dropout (checked in ``zoo.build.builder_kwargs``, the one place)."""
    return click.option(
        "--fc-dropout", "fc_dropout", type=click.FLOAT, default=None, metavar="P", cls=RangedOption,
        allowed=range_text(0, 1, high_open=True), default_text="0.5 for VGG",
        help="VGG only: dropout in the FC-4096 layers while they train, as in the original (timm's VGG has "
             "none); 0 turns it off.")(func)


# Options a --config file cannot hold, each with what to type instead: they act on a folder that holds a run or
# delete one (typed, never carried in a recipe), or name another file (no nesting).
NOT_IN_A_FILE = {
    "resume": "continuing acts on the folder that holds the run: type --resume (zoo finetune's takes no --config: "
              "the run's own config.yaml is used)",
    "overwrite": "starting over deletes an earlier run's files: type --overwrite",
    "config": "a config file cannot name another: give that file as --config",
}
# The commands with a --config file, in the order a message names them
CONFIG_COMMANDS = ("finetune", "lr-find", "sweep", "doctor")
_META = f"{__name__}.config_file"   # (ctx.meta is shared by every context)
_SKIPPED = f"{__name__}.skipped"


class ConfigFileOption(click.Option):
    """``--config FILE``, read before the other options (eager): its keys that are the command's own options
    (:func:`file_keys`) become their defaults (``ctx.default_map``: a flag or argument typed wins, each value is
    checked as its flag's, naming the file), the rest is the FinetuneConfig of :func:`read_config`.
    ``finetune``: whether the command takes FinetuneConfig's options (zoo doctor does not)."""

    def __init__(self, *args: Any, finetune: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, is_eager=True, callback=_read_file, **kwargs)
        self.finetune = finetune


def config_file_option(help: str, finetune: bool = True) -> Callable[[Callable], Callable]:
    """The ``--config`` option of zoo finetune, lr-find, sweep and doctor (:class:`ConfigFileOption`)."""
    return click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
                        metavar="FILE", cls=ConfigFileOption, finetune=finetune, help=help)


def file_keys(command: click.Command) -> dict[str, click.Parameter]:
    """The keys a --config file may give ``command`` beside FinetuneConfig's: each of its options, named as the
    flag with underscores (sweep's --lr: lr), and its MODEL argument (doctor's DIR is its --data)."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option):
            keys[max(param.opts, key=len).lstrip("-").replace("-", "_")] = param
        elif param.name == "model":
            keys["model"] = param
    return keys


def _takes_config(command: click.Command) -> bool:
    return any(isinstance(p, ConfigFileOption) and p.finetune for p in command.params)


def _is_grid(value: Any) -> bool:
    """A value in zoo sweep's grid syntax (``1e-4:1e-2:3``, ``head,1,2`` or a YAML list), which no option takes."""
    return isinstance(value, list) or isinstance(value, str) and (":" in value or "," in value)


def _read_file(ctx: click.Context, param: ConfigFileOption, path: str | None) -> str | None:
    """The callback of :class:`ConfigFileOption`."""
    if path is None or ctx.resilient_parsing:
        return path
    own, fields = file_keys(ctx.command), set(OPTIONS) if param.finetune else set()

    def config_s(key: Any, value: Any) -> bool:
        """A FinetuneConfig key, unless it is also an option of the command under another name (zoo sweep's grid
        flags --lr, --weight-decay, --freeze, --optimizer) and holds a grid: then it is that option's."""
        return key in fields and not (key in own and own[key].name != key and _is_grid(value))

    base, raw = read_config_file(path, config_s)
    taken = {k: v for k, v in raw.items() if not config_s(k, v)}
    for key in taken:
        if key in NOT_IN_A_FILE:        # (even where the command has no such option: no recipe holds it)
            raise UsageError(f"{path}: {key}: {NOT_IN_A_FILE[key]}")
    ctx.meta[_SKIPPED] = _skipped(ctx, path, [k for k in taken if k not in own], {*own, *fields})
    defaults = {}
    for key, value in ((k, v) for k, v in taken.items() if k in own):
        option = own[key]
        if value is None and option.default is None and not option.required:
            continue        # null (`out: null`, `~`, nothing): not set, as the key left out, where the flag may be
        value = _as_typed(option, key, value, path)
        try:
            defaults[option.name] = option.type_cast_value(ctx, value)
        except (click.BadParameter, UsageError) as err:   # the flag's own message (data: an archive), of the file
            raise UsageError(f"{path}: {key}: {getattr(err, 'message', err)}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_META] = (path, base, {k: v for k, v in raw.items() if config_s(k, v)})
    return path


def _as_typed(param: click.Parameter, key: str, value: Any, path: str) -> Any:
    """A file's ``value`` (its text as written: ``load_yaml(..., as_text=True)``) of the command's own ``param`` as
    that flag typed would give it, for click to convert as it converts a typed one: the text (`steps: 20.5` was
    cut to 20 without a word, `out: 5` crashed, `out: 1.50` was the folder 1.5), the words of zoo's boolean flags
    for an on/off flag (``yamlschema.as_bool``: `export: yes`), a list for zoo sweep's grid only (`data: [a, b]`
    was the folder "a,b"); a mapping, a list elsewhere, null where the flag needs a value: UsageError naming the
    file, as _coerce does the config's keys. A path with a leading ~, which no file expands, gets the path to
    write (the shell's advice was no way on for a file). ``key``: the file's key (sweep's ``lr`` is its ``lr_spec``)."""
    flag = isinstance(param, click.Option) and param.is_bool_flag
    grid = key in OPTIONS and param.name != key         # (config_s: a single value there is the config's)
    if grid and isinstance(value, list) and value and all(_scalar(v) for v in value):
        return ",".join(str(v) for v in value)
    try:
        if flag:
            return as_bool(value)
        if not _scalar(value):
            raise ValueError
    except ValueError:
        raise UsageError(f"{path}: {key}={short_repr(value)} should be {_type_words(param)}") from None
    if isinstance(param.type, click.types.IntParamType):
        with contextlib.suppress(ValueError):       # (`steps: 20.0`, as the config's whole numbers)
            value = as_int(value)
    text = str(value)
    if isinstance(param.type, click.Path) and not text.strip():     # (`out: ""` crashed; no path is "")
        raise UsageError(f"{path}: {key}={short_repr(value)} should be {_type_words(param)}")
    home = unexpanded_home(text) if isinstance(param.type, click.Path) else None
    if home is not None:
        raise UsageError(f"{path}: {key}: {text} begins with ~, which a --config file does not expand: write {home}")
    return text


def _scalar(value: Any) -> bool:
    """A YAML value that is one option value: text or a number (not true/false, null, a list or a mapping)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _type_words(param: click.Parameter) -> str:
    """What ``param`` takes, in the words of the config's messages (``finetune.core.config._wanted``)."""
    kind = param.type
    if isinstance(param, click.Option) and param.is_bool_flag:
        return "true or false"
    if isinstance(kind, click.Choice):
        return ", ".join(map(str, kind.choices[:-1])) + " or " + str(kind.choices[-1])
    if isinstance(kind, click.Path):
        return f"a {'folder' if kind.name == 'directory' else kind.name}"
    return {"integer": "a whole number", "float": "a number"}.get(kind.name, "text")


def _skipped(ctx: click.Context, path: str, keys: list[Any], known: set[str]) -> list[str]:
    """The note for the keys of a --config file that are no option of this command but another zoo command's
    (one recipe for doctor, lr-find, sweep and finetune: each skips the others' keys, saying which and whose);
    ``[]`` when there are none. A key no command takes (a typo) is the ConfigError of ``unknown_options``, the
    key meant named where one is close, of any command's keys."""
    root = ctx.find_root().command
    commands = {name: root.commands[name] for name in CONFIG_COMMANDS if name in getattr(root, "commands", {})}
    takers = {k: tuple(name for name, c in commands.items() if k in file_keys(c) or _takes_config(c) and k in OPTIONS)
              for k in keys}
    unknown = [k for k, names in takers.items() if not names]
    if unknown:
        raise unknown_options(unknown, {*known, *_every_key(commands)}, path, ctx.command.name)
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, names in takers.items():
        groups.setdefault(names, []).append(str(key))
    if not groups:
        return []
    whose = "; ".join(f"{', '.join(ks)} (for zoo {', '.join(names)})" for names, ks in groups.items())
    return [f"note: {path}: zoo {ctx.command.name} skips {whose}"]


def _every_key(commands: dict[str, click.Command]) -> set[str]:
    """The keys a --config file may hold for any of ``commands``."""
    return {k for c in commands.values() for k in (*file_keys(c), *(OPTIONS if _takes_config(c) else ()))}


def file_notes(ctx: click.Context | None) -> list[str]:
    """The note of the keys the ``--config`` file gave that this command skips, for the command to print
    (:func:`_skipped`; ``[]`` without a file, such keys or a context that read it)."""
    return list(ctx.meta.get(_SKIPPED, [])) if ctx is not None else []


def read_config(path: str | None, ctx: click.Context | None = None) -> tuple[FinetuneConfig, dict[str, Any]]:
    """``--config FILE``: the config it gives over the defaults (validated, with the file name in any error)
    and the file's own mapping of those options, which says what it set; ``(FinetuneConfig(), {})`` without a
    file. ``ctx``: the command's, whose --config option read the file already (:class:`ConfigFileOption`)."""
    read = ctx.meta.get(_META) if ctx is not None else None
    if read is not None and read[0] == path:
        return read[1], read[2]
    return read_config_file(path) if path else (FinetuneConfig(), {})


def bn_default(given: dict[str, Any], file_values: dict[str, Any], pretrained: bool) -> dict[str, Any]:
    """``given`` with ``bn`` following the weights when the user chose none (neither ``--bn`` nor a
    ``--config`` file's ``bn``, ``file_values``: even one that equals the default, QA): "eval" for
    pretrained weights, "train" for a random init."""
    if "bn" in given or "bn" in file_values:
        return given
    return {**given, "bn": default_bn(pretrained)}


def idle_options(config: FinetuneConfig, chosen: Iterable[str]) -> list[str]:
    """Notes for options the user chose (``chosen``: flags and ``--config`` keys) that ``config`` leaves
    without effect, each saying what would use them (QA: each was accepted without a word)."""
    chosen = set(chosen)
    notes = []
    mlp = sorted(f"--{k.replace('_', '-')}" for k in chosen if k.startswith("mlp_"))
    if mlp and config.head != "mlp":
        notes.append(f"note: {', '.join(mlp)} {'shape' if len(mlp) > 1 else 'shapes'} the MLP head; this run's head "
                     f"is {config.head} (add --head mlp)")
    if config.head == "mlp" and "head_solver" in chosen and config.head_solver == "lbfgs":
        notes.append("note: --head-solver lbfgs solves a linear head; the MLP head trains by gradient at --lr")
    if config.augment == "none" and int(config.aug_views) > 0 and "aug_views" in chosen:
        notes.append(f"note: --aug-views {config.aug_views} with --augment none caches {config.aug_views} identical "
                     "views of each image; drop one of the two")
    return notes


def resolve_config(ctx: click.Context, config_path: str | None, values: dict[str, Any], pretrained: bool,
                   given: dict[str, Any] | None = None) -> tuple[FinetuneConfig, dict[str, Any], list[str]]:
    """The one merge of zoo finetune, lr-find and sweep: defaults < ``--config`` YAML < flags the user typed
    (``given``: those flags, when the command already read them, e.g. finetune's ``--lr auto``).

    Returns:
        The config, the YAML's own mapping, and the notes to print (:func:`file_notes`, :func:`idle_options`).
    """
    given = given_options(ctx, values) if given is None else given
    base, raw = read_config(config_path, ctx)
    given = bn_default(given, raw, pretrained)   # --no-pretrained: BatchNorm trains unless --bn (or the file) says
    config = FinetuneConfig.from_dict({**base.to_dict(), **given}, source="command line")
    # A file key at its default chose nothing: lr-find's config.yaml and sweep's best_config.yaml, which their
    # next: lines pass as --config, hold every option (QA: each such run was told its --mlp-* did nothing).
    # Compared as the config reads them (``base``): YAML gives `2e-1` and `'512'` as text.
    defaults = FinetuneConfig()
    chosen_in_file = [k for k in raw if getattr(base, k) != getattr(defaults, k)]
    return config, raw, [*file_notes(ctx), *idle_options(config, [*given, *chosen_in_file])]


@contextlib.contextmanager
def read_of_the_file(ctx: click.Context, config_path: str | None, param: str, key: str) -> Iterator[None]:
    """A value the command checks itself (zoo sweep's grid, its --folds, finetune's exclude file) refused in its
    flag's words (``--lr: ...``) is said of the ``--config`` file when the file gave it, in :func:`_read_file`'s
    words (``FILE: lr: ...``); other errors pass as they are."""
    try:
        yield
    except (ConfigError, UsageError) as err:
        flag = "--" + key.replace("_", "-")
        if not config_path or ctx.get_parameter_source(param) != ParameterSource.DEFAULT_MAP \
                or not str(err).startswith(flag):
            raise
        raise UsageError(f"{config_path}: {key}: {str(err).removeprefix(flag).lstrip(': ')}") from None


@contextlib.contextmanager
def naming_the_file(ctx: click.Context, config_path: str | None, file_values: dict[str, Any]) -> Iterator[None]:
    """A freeze depth past the model's stages (known once the model is), an fc_dropout for a model without VGG's
    FC-4096 layers, or a model the zoo does not know, said of the ``--config`` file when the file gave it, not as
    ``--freeze``/``--fc-dropout``/the MODEL typed (QA: ``freeze: 99`` in the file was named ``--freeze 99``, the
    file not at all); a flag or MODEL typed (zoo sweep's grid too) keeps its wording. zoo sweep's grid given in
    the file (``freeze: 1,99``) is its ``--freeze``'s default (:func:`_read_file`), not a config key: named too."""
    try:
        yield
    except FreezeTooDeepError as err:
        sources = {ctx.get_parameter_source(p) for p in ("freeze", "freeze_spec") if p in ctx.params}
        typed = bool(sources & {ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT})
        if typed or not config_path or "freeze" not in file_values and ParameterSource.DEFAULT_MAP not in sources:
            raise
        raise FreezeTooDeepError(err.depth, err.n_stages, f"freeze {err.depth} in {config_path}") from None
    except FcDropoutError as err:       # (fc_dropout is a run-level key: the file gave it as --fc-dropout's default)
        if not config_path or ctx.get_parameter_source("fc_dropout") != ParameterSource.DEFAULT_MAP:
            raise
        raise FcDropoutError(err.model, f"fc_dropout {ctx.params['fc_dropout']} in {config_path}") from None
    except UnknownModelError as err:    # (`model: .inf` in the file was "unknown model 'inf'", the file not named)
        if not config_path or ctx.get_parameter_source("model") != ParameterSource.DEFAULT_MAP:
            raise
        raise UnknownModelError(f"{config_path}: model: {err}") from None
