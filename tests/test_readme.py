"""Every command shown in README.md is checked here, so the README cannot rot.

What is extracted: each ``zoo ...`` invocation in the README's ```bash blocks (also ``VAR=1 zoo ...``,
``"$(zoo ...)"``, ``python -m zoo ...`` and ``torchrun ... -m zoo ...``), and every ```python block.

Three checks:
1. ``test_command_parses``: each command line goes through the real click command tree (group options,
   subcommand resolution, ``make_context`` with resilient_parsing=False, no invocation), so an option
   that does not exist, a bad choice or a missing argument fails. Paths that click requires to exist are
   created as empty placeholders first. No torch is imported.
2. ``test_python_blocks_compile``.
3. ``test_readme_runs_end_to_end``: the commands and the Python blocks run IN README ORDER, in a
   sandbox working directory, against a tiny setup. Everything except PARSE_ONLY runs and must exit 0.

Substitution table (the README text is never edited; only these mappings apply):

============================  =========================================================================
README                         in the end-to-end test
============================  =========================================================================
model names in TINY_MODELS     a ZOO_REGISTRY entry of the same name (``override: true``) building
(resnet50, efficientnet_b0)    ``timm:test_resnet`` at 32 px, its "pretrained" weights a local file
                               source, so pull/import/finetune/predict work offline. ``zoo list`` and
                               ``zoo info`` run against the real registry (ZOO_REGISTRY unset).
``./photos``                   a generated flat folder: 3 classes (cat, dog, fox) x 10 PNGs, 32 px
``./holdout``                  the same classes, 3 PNGs each
``cat.jpg``, ``dog.jpg``       generated JPEGs of those classes
``./resnet50.safetensors``     the tiny model's weights file (what ``zoo import`` checks shapes against)
ZOO_HOME, HF caches            temp dirs (tests/conftest.py)
training options               SPEED_FLAGS: the value is replaced when the README gives the option,
                               appended otherwise (``--epochs 2``, ``--workers 0``, ``--device cpu``...;
                               the overfit check also ``--lr 0.05``: the stand-in is not pretrained)
``finetune.FinetuneConfig(``   PY_SUBST: the same speed options prepended to its keyword arguments
``zoo demo``, ``torchrun``,    PARSE_ONLY: parsed, not run (zoo demo: tests/zoo/test_demo.py; torchrun:
``zoo push``, ``zoo serve``,   tests/finetune/test_distributed.py; push and hf-hub: names:
``hf-hub:`` names              tests/zoo/test_push.py; serve: tests/zoo/test_serve.py)
                               tests/finetune/test_distributed.py)
============================  =========================================================================
A substitution the README no longer needs fails the test (it must be kept in step with the README).
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import make_image, make_image_folder
from zoo.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TINY_MODELS = ("resnet50", "efficientnet_b0")
CATALOGUE = ("list", "info")          # run against the real registry
PARSE_ONLY = {
    "demo": "covered by tests/zoo/test_demo.py (real EfficientNet-Lite0 at 224 px is too slow here)",
    "torchrun": "covered by tests/finetune/test_distributed.py (2 gloo processes)",
    "push": "covered by tests/zoo/test_push.py (a loopback Hub answering huggingface_hub's upload calls)",
    "serve": "covered by tests/zoo/test_serve.py (uvicorn on 127.0.0.1; it runs until Ctrl-C)",
}
# commands naming a published model (hf-hub:OWNER/NAME) need that Hub repo: tests/zoo/test_push.py pulls
# and predicts with one it pushed to the loopback Hub
HUB_REF = "hf-hub:"
# option -> value (None: a flag) per subcommand; "resume" applies to `zoo finetune --resume`.
_TRAIN = {"--epochs": "2", "--workers": "0", "--device": "cpu", "--batch-size": "8", "--quiet": None}
SPEED_FLAGS = {
    "finetune": _TRAIN,
    "resume": {"--epochs": "2", "--workers": "0", "--device": "cpu", "--quiet": None},
    # the stand-in's backbone is random, not pretrained: its features need a bolder head LR to be memorised
    "overfit": {**_TRAIN, "--lr": "0.05"},
    "lr-find": {**_TRAIN, "--steps": "10"},
    "sweep": {**_TRAIN, "--epochs": "1"},
    "predict": {"--device": "cpu"},
    # the sandbox's drawn images look alike to the random stand-in backbone: only true copies count
    "doctor": {"--workers": "0", "--device": "cpu", "--quiet": None, "--near": "1", "--near-pixels": "1"},
    "eval": {"--device": "cpu"},
}
PY_SUBST = {
    "finetune.FinetuneConfig(": 'finetune.FinetuneConfig(workers=0, device="cpu", quiet=True, batch_size=8, ',
}


# ----------------------------------------------------------------------------------------- extraction
@dataclass
class Step:
    line: int                         # README line number of the command / block
    kind: str                         # "zoo" | "python"
    text: str                         # the README source (logical line or block)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    launcher: str = "zoo"             # "zoo" | "python" | "torchrun"
    stdout_to: str | None = None      # `> file`

    @property
    def id(self) -> str:
        shown = " ".join(self.argv) if self.kind == "zoo" else "python block"
        return f"L{self.line}:{shown}"[:70]


_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SUBST = re.compile(r"\$\(([^()]*)\)")


def fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, body) for each ```lang block."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang]


def _logical_lines(body: str, first: int):
    buf, start = "", None
    for i, raw in enumerate(body.splitlines()):
        if start is None:
            start = first + i
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        yield start, buf + raw
        buf, start = "", None


def zoo_invocations(line: str, lineno: int) -> list[Step]:
    """The zoo commands in one shell line: pipelines, &&, ;, redirections, $(...) and env prefixes."""
    steps: list[Step] = []
    for inner in _SUBST.findall(line):
        steps += zoo_invocations(inner, lineno)
    line = _SUBST.sub("SUBST", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    segments: list[tuple[list[str], str | None]] = [([], None)]
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok and all(c in "();<>|&" for c in tok):
            if ">" in tok or "<" in tok:
                target = tokens[i + 1] if i + 1 < len(tokens) else None
                if ">" in tok:
                    segments[-1] = (segments[-1][0], target)
                i += 2
                continue
            segments.append(([], None))
        else:
            segments[-1][0].append(tok)
        i += 1
    for words, stdout_to in segments:
        env = {}
        while words and _ASSIGN.match(words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if not words:
            continue
        if words[0] == "zoo":
            steps.append(Step(lineno, "zoo", line.strip(), words[1:], env, "zoo", stdout_to))
        elif words[0] in ("torchrun", "python", "python3") and "-m" in words:
            k = words.index("-m")
            if k + 1 < len(words) and words[k + 1] == "zoo":
                steps.append(Step(lineno, "zoo", line.strip(), words[k + 2:], env, words[0], stdout_to))
    return steps


def readme_steps() -> list[Step]:
    text = README.read_text(encoding="utf-8")
    steps: list[Step] = []
    for first, body in fenced_blocks(text, "bash"):
        for lineno, line in _logical_lines(body, first):
            steps += zoo_invocations(line, lineno)
    for first, body in fenced_blocks(text, "python"):
        steps.append(Step(first, "python", body))
    return sorted(steps, key=lambda s: s.line)


STEPS = readme_steps()
ZOO_STEPS = [s for s in STEPS if s.kind == "zoo"]


# ------------------------------------------------------------------------------------------- parsing
def _remaining(ctx: click.Context) -> list[str]:
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:  # click < 8.2
        protected = ctx.protected_args
    return list(protected) + list(ctx.args)


def parse_command(argv: list[str], create_placeholders: bool = False) -> tuple[click.Command, click.Context | None]:
    """Resolve ``zoo ARGV`` through the real command tree and parse every level strictly, without running.

    ``--version``/``--help`` end parsing (click.exceptions.Exit 0): returns (cli, None).
    With ``create_placeholders``, paths that an option or argument requires to exist are created first
    (an empty folder or file, as the parameter's type says).
    """
    cmd: click.Command = cli
    ctx: click.Context | None = None
    args, name = list(argv), "zoo"
    try:
        while True:
            if create_placeholders:
                _make_placeholders(cmd, args, ctx)
            ctx = cmd.make_context(name, args, parent=ctx, resilient_parsing=False)
            if not isinstance(cmd, click.Group):
                return cmd, ctx
            rest = _remaining(ctx)
            if not rest:
                return cmd, ctx
            name, sub, args = cmd.resolve_command(ctx, rest)
            cmd = sub
    except click.exceptions.Exit as e:
        if e.exit_code == 0:
            return cmd, None
        raise


def _make_placeholders(cmd: click.Command, args: list[str], parent: click.Context | None) -> None:
    ctx = click.Context(cmd, info_name=cmd.name, parent=parent, resilient_parsing=True)
    try:
        values, _, _ = cmd.make_parser(ctx).parse_args(list(args))
    except click.UsageError:
        return  # the strict parse reports it
    for param in cmd.params:
        kind = param.type
        if not (isinstance(kind, click.Path) and kind.exists) or values.get(param.name) is None:
            continue
        raw = values[param.name]
        for value in (raw if isinstance(raw, (list, tuple)) else [raw]):
            p = Path(value)
            if p.exists():
                continue
            if not kind.file_okay:
                p.mkdir(parents=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()


# -------------------------------------------------------------------------------------- the checks
def test_readme_shows_every_command_and_the_quick_start():
    text = README.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    assert sections[1].startswith("Quick start"), "the first section must be the quick start"
    quick = [line.split("#")[0].strip() for _, body in fenced_blocks("## " + sections[1], "bash")
             for line in body.splitlines() if line.split("#")[0].strip()]
    assert quick == ["scripts/demo", "scripts/test"]
    for script in quick:
        assert os.access(ROOT / script, os.X_OK), script
    shown = {s.argv[0] for s in ZOO_STEPS if s.argv and not s.argv[0].startswith("-")}
    assert set(cli.commands) <= shown, f"commands without a README example: {set(cli.commands) - shown}"
    assert any(s.argv == ["--version"] for s in ZOO_STEPS)
    assert any("_ZOO_COMPLETE" in s.env for s in ZOO_STEPS), "shell completion line missing"
    for old in PY_SUBST:
        assert old in text, f"PY_SUBST key {old!r} no longer in the README: update the substitution table"


@pytest.mark.parametrize("step", ZOO_STEPS, ids=lambda s: s.id)
def test_command_parses(step, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not step.argv:  # `eval "$(_ZOO_COMPLETE=bash_source zoo)"`: run in the end-to-end test
        assert step.env.get("_ZOO_COMPLETE") in ("bash_source", "zsh_source", "fish_source")
        return
    cmd, ctx = parse_command(step.argv, create_placeholders=True)
    if ctx is not None:
        assert not isinstance(cmd, click.Group), f"{step.text}: names a group, not a command"


@pytest.mark.parametrize("step", [s for s in STEPS if s.kind == "python"], ids=lambda s: s.id)
def test_python_blocks_compile(step):
    compile(step.text, f"README.md:{step.line}", "exec")


# ------------------------------------------------------------------------------- end to end, in order
@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """The README's placeholders as real files in a fresh working directory, and the tiny registry."""
    from tests.conftest import tiny_entry, tiny_weights, write_registry

    work = tmp_path / "work"
    work.mkdir()
    weights = work / "resnet50.safetensors"
    weights.write_bytes(tiny_weights())
    source = {"kind": "file", "path": str(weights), "sha256": None, "sha256_note": "README test weights"}
    registry = write_registry(tmp_path / "tiny-registry.yaml",
                              [tiny_entry(name, source, override=True) for name in TINY_MODELS])
    make_image_folder(work / "photos", per_class=10)
    make_image_folder(work / "holdout", per_class=3, seed=1)
    make_image(work / "cat.jpg", 0, fmt="JPEG")
    make_image(work / "dog.jpg", 1, fmt="JPEG")
    monkeypatch.chdir(work)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return {"work": work, "registry": str(registry)}


def _with_speed_flags(argv: list[str]) -> list[str]:
    key = argv[0]
    if key == "finetune" and "--resume" in argv:
        key = "resume"
    elif key == "finetune" and "--overfit-batches" in argv:
        key = "overfit"
    out = list(argv)
    for opt, value in SPEED_FLAGS.get(key, {}).items():
        if opt in out:
            if value is not None:
                out[out.index(opt) + 1] = value
        else:
            out += [opt] if value is None else [opt, value]
    return out


def _expand_globs(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if any(c in a for c in "*?[") and not a.startswith("-"):
            matches = sorted(str(p) for p in Path().glob(a))
            assert matches, f"README glob {a!r} matches nothing at this point"
            out += matches
        else:
            out.append(a)
    return out


def _run_zoo(step: Step, registry: str) -> None:
    from zoo.registry import list_models

    if step.launcher in PARSE_ONLY or (step.argv and step.argv[0] in PARSE_ONLY) \
            or any(a.startswith(HUB_REF) for a in step.argv):
        parse_command(step.argv)
        return
    env = dict(step.env)
    catalogue = bool(step.argv) and step.argv[0] in CATALOGUE
    env["ZOO_REGISTRY"] = None if catalogue else registry  # None: unset for this command
    if not catalogue:
        curated = {e.name for e in list_models()}
        heavy = [a for a in step.argv if a in curated and a not in TINY_MODELS]
        assert not heavy, f"README line {step.line} uses {heavy}: add it to TINY_MODELS"
    argv = _expand_globs(_with_speed_flags(step.argv)) if step.argv else []
    result = CliRunner().invoke(cli, argv, env=env, prog_name="zoo", catch_exceptions=False)
    where = f"README line {step.line}: {step.text}\n  ran: zoo {' '.join(argv)}"
    assert result.exit_code == 0, f"{where}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    if not argv:  # shell completion script
        assert "_zoo_completion" in result.stdout or "complete" in result.stdout, where
    elif argv[0] == "--version":
        assert result.stdout.startswith("zoo, version"), where
    if step.stdout_to:
        Path(step.stdout_to).write_text(result.stdout)
        if "--json" in argv:
            json.loads(result.stdout)


def _run_python(step: Step, registry: str, monkeypatch) -> None:
    code = step.text
    for old, new in PY_SUBST.items():
        code = code.replace(old, new)
    monkeypatch.setenv("ZOO_REGISTRY", registry)
    exec(compile(code, f"README.md:{step.line}", "exec"), {"__name__": "__readme__"})


def test_readme_runs_end_to_end(sandbox, monkeypatch, capsys):
    ran = set()
    for step in STEPS:
        if step.kind == "python":
            _run_python(step, sandbox["registry"], monkeypatch)
        else:
            _run_zoo(step, sandbox["registry"])
            ran.add(step.argv[0] if step.argv else "completion")
    assert {"finetune", "export", "predict", "eval"} <= ran
    # what the README promises about the walkthrough's outputs
    run = Path("runs/photos-r50")
    for name in ("config.yaml", "scan.json", "split.json", "bad_files.txt", "model.json", "manifest.json",
                 "metrics.csv", "curves.png", "checkpoints/last.pt", "checkpoints/best.safetensors",
                 "summary.json", "export/model.safetensors", "export/config.json", "export/README.md"):
        assert (run / name).is_file(), name
    assert Path("my-classifier/model.onnx").is_file()
    assert Path("sw1/best_config.yaml").is_file()
    assert Path("reports/holdout/metrics.json").is_file()
