"""Every command shown in README.md and in the user guide (docs/guide/) is checked here, so the docs cannot rot.

Two suites, each run in its own sandbox: "README" (README.md) and "guide" (docs/guide/README.md, then
every page in the order the guide's index links them; a page the index does not link fails the test).

What is extracted: each ``zoo ...`` invocation in the pages' ```bash blocks (also ``VAR=1 zoo ...``,
``"$(zoo ...)"``, ``python -m zoo ...`` and ``torchrun ... -m zoo ...``), and every ```python block.

Three checks (and a fourth, ``test_help_examples_parse``: check 1 for each Examples line of every ``zoo ... --help``;
``test_the_guide_names_every_file_a_command_writes`` keeps the guide's lists of output files in step with the code):
1. ``test_command_parses``: each command line goes through the real click command tree (group options,
   subcommand resolution, ``make_context`` with resilient_parsing=False, no invocation), so an option
   that does not exist, a bad choice or a missing argument fails. Paths that click requires to exist are
   created as empty placeholders first. No torch is imported.
2. ``test_python_blocks_compile``.
3. ``test_docs_run_end_to_end[suite]``: the commands and the Python blocks run IN PAGE ORDER (pages in
   the suite's order), in a sandbox working directory, against a tiny setup. Everything except
   PARSE_ONLY runs and must exit 0.

Substitution table (the docs' text is never edited; only these mappings apply):

============================  =========================================================================
in the docs                    in the end-to-end test
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
============================  =========================================================================
A substitution the docs no longer need fails the test (it must be kept in step with the docs).
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
GUIDE = ROOT / "docs" / "guide"
_LINK = re.compile(r"\]\(([\w-]+\.md)\)")


def guide_pages() -> list[Path]:
    """The guide's index, then the pages in the order its links name them (each once)."""
    index = GUIDE / "README.md"
    order = list(dict.fromkeys(_LINK.findall(index.read_text(encoding="utf-8"))))
    return [index] + [GUIDE / name for name in order if name != "README.md"]


SUITES = {"README": [README], "guide": guide_pages()}
# what each suite's walkthrough leaves behind (the docs promise these files)
SUITE_OUTPUTS = {
    "README": ("runs/photos-r50/config.yaml", "runs/photos-r50/export/model.safetensors",
               "my-classifier/model.safetensors", "reports/holdout/metrics.json"),
    "guide": ("runs/photos-r50/config.yaml", "runs/photos-r50/scan.json", "runs/photos-r50/split.json",
              "runs/photos-r50/bad_files.txt", "runs/photos-r50/model.json", "runs/photos-r50/manifest.json",
              "runs/photos-r50/metrics.csv", "runs/photos-r50/curves.png", "runs/photos-r50/checkpoints/last.pt",
              "runs/photos-r50/checkpoints/best.safetensors", "runs/photos-r50/summary.json",
              "runs/photos-r50/report.html", "runs/photos-r50/export/model.safetensors",
              "runs/photos-r50/export/config.json", "runs/photos-r50/export/README.md",
              "my-classifier/model.onnx", "sw1/best_config.yaml", "reports/holdout/metrics.json",
              "photos-doctor/findings.csv"),
}

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
    "lr-find": {**{k: v for k, v in _TRAIN.items() if k != "--epochs"}, "--steps": "10"},
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
    page: str                         # the page, relative to the repository root
    line: int                         # line number of the command / block in that page
    kind: str                         # "zoo" | "python"
    text: str                         # the README source (logical line or block)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    launcher: str = "zoo"             # "zoo" | "python" | "torchrun"
    stdout_to: str | None = None      # `> file`

    @property
    def id(self) -> str:
        shown = " ".join(self.argv) if self.kind == "zoo" else "python block"
        return f"{self.where}:{shown}"[:80]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


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


def zoo_invocations(line: str, lineno: int, page: str = "README.md") -> list[Step]:
    """The zoo commands in one shell line: pipelines, &&, ;, redirections, $(...) and env prefixes."""
    steps: list[Step] = []
    for inner in _SUBST.findall(line):
        steps += zoo_invocations(inner, lineno, page)
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
            steps.append(Step(page, lineno, "zoo", line.strip(), words[1:], env, "zoo", stdout_to))
        elif words[0] in ("torchrun", "python", "python3") and "-m" in words:
            k = words.index("-m")
            if k + 1 < len(words) and words[k + 1] == "zoo":
                steps.append(Step(page, lineno, "zoo", line.strip(), words[k + 2:], env, words[0], stdout_to))
    return steps


def page_steps(path: Path) -> list[Step]:
    """The page's zoo commands and python blocks, in page order."""
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(ROOT).as_posix()
    steps: list[Step] = []
    for first, body in fenced_blocks(text, "bash"):
        for lineno, line in _logical_lines(body, first):
            steps += zoo_invocations(line, lineno, page)
    for first, body in fenced_blocks(text, "python"):
        steps.append(Step(page, first, "python", body))
    return sorted(steps, key=lambda s: s.line)


SUITE_STEPS = {name: [s for page in pages for s in page_steps(page)] for name, pages in SUITES.items()}
STEPS = [s for steps in SUITE_STEPS.values() for s in steps]
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
        if not isinstance(raw, (str, list, tuple)):      # an optional argument not given (click's UNSET)
            continue
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
    docs = "\n".join(page.read_text(encoding="utf-8") for pages in SUITES.values() for page in pages)
    sections = re.split(r"^## ", text, flags=re.M)
    assert sections[1].startswith("Quick start"), "the first section must be the quick start"
    quick = [line.split("#")[0].strip() for _, body in fenced_blocks("## " + sections[1], "bash")
             for line in body.splitlines() if line.split("#")[0].strip()]
    assert quick == ["scripts/demo", "scripts/test"]
    for script in quick:
        assert os.access(ROOT / script, os.X_OK), script
    shown = {s.argv[0] for s in ZOO_STEPS if s.argv and not s.argv[0].startswith("-")}
    assert set(cli.commands) <= shown, f"commands without an example in the docs: {set(cli.commands) - shown}"
    readme = SUITE_STEPS["README"]
    assert any(s.argv == ["--version"] for s in readme)
    assert any("_ZOO_COMPLETE" in s.env for s in readme), "shell completion line missing"
    # the substitution table stays in step with the docs: every entry is still needed
    for old in PY_SUBST:
        assert old in docs, f"PY_SUBST key {old!r} no longer in the docs: update the substitution table"
    argvs = [s.argv for s in ZOO_STEPS]
    for name in TINY_MODELS:
        assert any(name in argv for argv in argvs), f"TINY_MODELS: no command uses {name!r} any more"
    for name in PARSE_ONLY:
        assert any(s.launcher == name or s.argv[:1] == [name] for s in ZOO_STEPS), f"PARSE_ONLY: {name!r} unused"
    for key in SPEED_FLAGS:
        assert any(_flag_key(argv) == key for argv in argvs if argv), f"SPEED_FLAGS: no {key!r} command any more"
    assert any(a.startswith(HUB_REF) for argv in argvs for a in argv), "HUB_REF: no hf-hub: name any more"


def test_every_guide_page_is_in_the_index():
    """A page the index does not link would escape the end-to-end run."""
    on_disk = sorted(GUIDE.glob("*.md"))
    assert sorted(SUITES["guide"]) == on_disk, "link every docs/guide page from docs/guide/README.md"
    for page in on_disk:
        assert page.read_text(encoding="utf-8").startswith("# "), f"{page.name}: starts with its title"


def test_the_share_page_names_every_option_of_zoo_push():
    """helper-149: `zoo push --dry-run` (read the card, upload nothing) was in --help only, not in share.md."""
    from zoo.cli import cli

    text = (GUIDE / "share.md").read_text(encoding="utf-8")
    options = [name for p in cli.commands["push"].params for name in p.opts if name.startswith("--")]
    assert "--dry-run" in options and [o for o in options if f"`{o}" not in text and f"{o} " not in text] == []


# Where the guide lists what each command writes into its --out: (page, the text that opens the list, the text
# that closes it). zoo.outdir.KINDS holds what each command writes (what --overwrite replaces); a file a command
# gains must be named on its page too (the run folder's table had lost report.html and exclude.txt).
OUTPUT_LISTS = {
    "finetune": ("finetune.md", "A run folder holds:", "Accuracies are printed"),
    "eval": ("export-predict.md", "`zoo eval` writes", "(the\nmost confidently wrong images"),
    "lr-find": ("tuning.md", "Output:", "`next:`"),
    "sweep": ("tuning.md", "`OUT/results.csv`", "under `OUT/trials`"),
    "doctor": ("data.md", "It only reads the", "into `--out`"),
}


def test_the_guide_names_every_file_a_command_writes():
    from zoo.outdir import KINDS

    for kind, (page, start, end) in OUTPUT_LISTS.items():
        text = (GUIDE / page).read_text(encoding="utf-8")
        begin = text.index(start)
        listed = text[begin:text.index(end, begin) + len(end)]
        named = {part for name in re.findall(r"`([^`\s]+)`", listed) for part in name.split("/") if part}
        missing = sorted(set(KINDS[kind].files) - named)
        assert not missing, f"docs/guide/{page} does not name {missing}, which zoo {kind} writes into its --out"


@pytest.mark.parametrize("step", ZOO_STEPS, ids=lambda s: s.id)
def test_command_parses(step, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not step.argv:  # `eval "$(_ZOO_COMPLETE=bash_source zoo)"`: run in the end-to-end test
        assert step.env.get("_ZOO_COMPLETE") in ("bash_source", "zsh_source", "fish_source")
        return
    cmd, ctx = parse_command(step.argv, create_placeholders=True)
    if ctx is not None:
        assert not isinstance(cmd, click.Group), f"{step.text}: names a group, not a command"


def _help_examples() -> list[Step]:
    """The zoo commands of every ``zoo [COMMAND...] --help`` Examples block (the first docs a user meets)."""
    def walk(group: click.Group, path: tuple[str, ...]):
        yield path
        for name, cmd in group.commands.items():
            yield from walk(cmd, path + (name,)) if isinstance(cmd, click.Group) else [path + (name,)]

    steps = []
    for path in walk(cli, ()):
        text = CliRunner().invoke(cli, [*path, "--help"], terminal_width=200).output
        block = text.split("Examples:", 1)[1].split("\nOptions:", 1)[0] if "Examples:" in text else ""
        where = " ".join(("zoo", *path, "--help"))
        steps += [s for line in block.splitlines() for s in zoo_invocations(line.strip(), 0, where)]
    return steps


@pytest.mark.parametrize("step", [s for s in _help_examples() if s.argv], ids=lambda s: f"{s.page}: {' '.join(s.argv)}")
def test_help_examples_parse(step, tmp_path, monkeypatch):
    """Each example line of a command's --help goes through the real command tree, as the docs' commands do."""
    monkeypatch.chdir(tmp_path)
    parse_command(step.argv, create_placeholders=True)


@pytest.mark.parametrize("step", [s for s in STEPS if s.kind == "python"], ids=lambda s: s.id)
def test_python_blocks_compile(step):
    compile(step.text, step.where, "exec")


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


def _flag_key(argv: list[str]) -> str:
    """The SPEED_FLAGS entry that applies to ``zoo ARGV``."""
    key = argv[0]
    if key == "finetune" and "--resume" in argv:
        key = "resume"
    elif key == "finetune" and "--overfit-batches" in argv:
        key = "overfit"
    return key


def _with_speed_flags(argv: list[str]) -> list[str]:
    out = list(argv)
    for opt, value in SPEED_FLAGS.get(_flag_key(argv), {}).items():
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
            assert matches, f"glob {a!r} in the docs matches nothing at this point"
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
        assert not heavy, f"{step.where} uses {heavy}: add it to TINY_MODELS"
    argv = _expand_globs(_with_speed_flags(step.argv)) if step.argv else []
    result = CliRunner().invoke(cli, argv, env=env, prog_name="zoo", catch_exceptions=False)
    where = f"{step.where}: {step.text}\n  ran: zoo {' '.join(argv)}"
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
    exec(compile(code, step.where, "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("suite", list(SUITES))
def test_docs_run_end_to_end(suite, sandbox, monkeypatch, capsys):
    ran = set()
    for step in SUITE_STEPS[suite]:
        if step.kind == "python":
            _run_python(step, sandbox["registry"], monkeypatch)
        else:
            _run_zoo(step, sandbox["registry"])
            ran.add(step.argv[0] if step.argv else "completion")
    assert {"finetune", "export", "predict", "eval"} <= ran
    for name in SUITE_OUTPUTS[suite]:     # what the docs promise about the walkthrough's outputs
        assert Path(name).is_file(), name
