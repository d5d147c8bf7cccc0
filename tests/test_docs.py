"""The documentation runs: every Python example in README.md and docs/*.md executes against the installed
package, the README's set-up commands are the ones CI runs, the README stays short, and the parts of the docs
site that the MkDocs hook generates (CLI reference, results tables) render."""

import importlib.util
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAIN_JOB = 'python -c "import torch" 2>/dev/null || pip install torch==2.13.0; pip install -e . && momos-hf'
TESTS = (
    'python -c "import torch" 2>/dev/null || pip install torch==2.13.0; pip install -e ".[test]" && python -m pytest'
)
README_MAX_LINES = 250


def code_blocks(path: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


EXAMPLES = [(path, code) for path in PAGES for code in code_blocks(path, "python")]


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, code", EXAMPLES, ids=[f"{path.relative_to(ROOT)}:{i}" for i, (path, _) in enumerate(EXAMPLES)]
)
def test_example_runs(path, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write checkpoints to relative paths
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: on a busy machine several threads spin-wait (k-means went 8 s -> 180 s)
    try:
        exec(compile(code, str(path), "exec"), {"__name__": "__docs_example__"})
    finally:
        torch.set_num_threads(threads)


def test_examples_found():
    assert EXAMPLES, "no python examples found"
    assert code_blocks(README, "python"), "the README shows no python example"


def test_readme_commands_match_ci():
    commands = code_blocks(README, "bash")
    assert commands[0].strip() == MAIN_JOB
    assert commands[1].strip() == TESTS
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1].strip() in ci


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_links_exist():
    for target in re.findall(r"\]\((docs/[\w./-]+\.md)(?:#[\w-]+)?\)", README.read_text(encoding="utf-8")):
        assert (ROOT / target).is_file(), target


def test_cli_reference_lists_every_subcommand():
    hooks = load_hooks()
    from momos_hf.app.cli import build_parser

    names = hooks.subcommands(build_parser())
    assert {"demo", "report", "compress", "info", "push"} <= set(names)
    reference = hooks.cli_reference()
    for name, parser in names.items():
        assert f"## `momos-hf {name}`" in reference
        assert f"usage: momos-hf {name}" in reference
    assert hooks.render("x <!-- cli-reference --> y").startswith("x ## `momos-hf`")


@pytest.mark.parametrize("name", sorted(load_hooks().TABLES))
def test_results_table_has_rows(name):
    lines = load_hooks().TABLES[name]().splitlines()
    assert len(lines) >= 3 and lines[1].startswith("|---")  # header, rule, at least one row
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])


def test_every_placeholder_is_known():
    hooks = load_hooks()
    for path in sorted((ROOT / "docs").glob("*.md")):
        for match in hooks.PLACEHOLDER.finditer(path.read_text(encoding="utf-8")):
            assert match.group(1) == "cli-reference" or match.group(2) in hooks.TABLES, (path, match.group(0))
    with pytest.raises(ValueError, match="unknown results table"):
        hooks.render("<!-- results: no-such-table -->")
