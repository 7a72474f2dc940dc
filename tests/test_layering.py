"""Architecture rules from DESIGN.md that a test can hold."""
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_finetune_never_imports_zoo():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "finetune"
    offenders = [p.name for p in root.glob("*.py")
                 if any(l.strip().startswith(("import zoo", "from zoo")) for l in p.read_text().splitlines())]
    assert offenders == []
    mods = _modules_after("import finetune, finetune.config, finetune.errors")
    assert not any(m == "zoo" or m.startswith("zoo.") for m in mods)


def test_cli_help_does_not_import_torch():
    mods = _modules_after("from click.testing import CliRunner\nfrom zoo.cli import cli\n"
                          "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output")
    assert "torch" not in mods
