"""The code the docs name still exists: every ``finetune.x.y`` / ``zoo.x.y`` and ``tests/....py::name`` in
README.md, docs/ and the docstrings and comments resolves (scripts/check_doc_refs.py, static: no import)."""
from __future__ import annotations

from tests.conftest import load_script


def test_every_code_name_in_the_docs_resolves():
    stale = load_script("check_doc_refs").stale_refs()
    assert not stale, "stale references (rename to the current name, or reword):\n" + "\n".join(stale)


def test_the_check_finds_a_stale_name_and_a_missing_test():
    check = load_script("check_doc_refs")
    assert check.check_dotted("zoo.process.keep_freed_memory") is None
    assert check.check_dotted("finetune.engine.trainer.Trainer.run") is None
    assert check.check_dotted("finetune.loop.train_one_epoch") == "finetune defines no loop"
    assert check.check_dotted("finetune.engine.trainer._guard_head") == "finetune.engine.trainer defines no _guard_head"
    assert check.check_test_id("tests/test_docs_refs.py::test_every_code_name_in_the_docs_resolves") is None
    assert check.check_test_id("tests/test_docs_refs.py::test_gone") == "tests/test_docs_refs.py defines no test_gone"
    assert check.check_test_id("tests/finetune/test_loop.py") == "no such test file"
