"""The package's public boundary: recipes use public names only, and every public name resolves."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def momos_imports(path: Path) -> list[tuple[str, str]]:
    """Every `(module, name)` a file imports from momos_hf."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "momos_hf":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "momos_hf"]
    return found


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_recipes_import_only_public_names(recipe):
    imports = momos_imports(recipe)
    assert imports
    for module, name in imports:
        public = getattr(importlib.import_module(module), "__all__", None)
        assert public is not None and name in public, f"{recipe.name} imports {name or module} from {module}"


def test_every_public_name_resolves():
    for module in (
        "momos_hf",
        "momos_hf.app",
        "momos_hf.checkpoint",
        "momos_hf.convert",
        "momos_hf.fit",
        "momos_hf.metrics",
        "momos_hf.report",
        "momos_hf.train",
    ):
        loaded = importlib.import_module(module)
        for name in loaded.__all__:
            assert getattr(loaded, name) is not None, f"{module}.{name}"


@pytest.mark.slow
def test_loading_a_checkpoint_imports_no_hub_card_or_training_code():
    """`import momos_hf` (what a load needs) stays off the Hub client, the card renderer and the training code."""
    code = "import sys, momos_hf; print(sorted(m for m in sys.modules if m.startswith('momos_hf.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("momos_hf.integrations.hub", "momos_hf.report.card", "momos_hf.train", "momos_hf.app"):
        assert module not in loaded


@pytest.mark.slow
def test_cuda_check_help_runs_without_cuda():
    script = ROOT / "benchmarks" / "cuda_check.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: cuda_check.py")
    refused = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "cuda_check.py: error: no CUDA device here (it checks the GPU paths; run it on a GPU machine)"
    ]
