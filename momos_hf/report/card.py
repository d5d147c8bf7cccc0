"""Model cards for MoMos checkpoints, rendered from the template `model_card.md` beside this file."""

from __future__ import annotations

import json
import os
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCardData

from ..checkpoint.info import checkpoint_info, read_leading_weights
from .complexity import DEFAULT_MAX_BYTES, bdm_of_signs, compression_ratios

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CARD_MARKER = "model card written by momos-hf; a later save may rewrite it (remove this line to keep your edits)"


def is_generated_card(path: Union[str, os.PathLike]) -> bool:
    """Whether the file at `path` is a model card momos-hf wrote (and may rewrite), not one of the user's."""
    try:
        return CARD_MARKER in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def load_class_for(architecture: str) -> str:
    return "AutoModelForCausalLM" if architecture.endswith("ForCausalLM") else architecture


def render_card(
    directory: Union[str, os.PathLike], repo_id: Optional[str] = None, results: Optional[dict[str, Any]] = None
) -> str:
    """The model card (README.md) of the MoMos checkpoint in `directory`, with valid Hub metadata
    (`library_name`, `base_model` when it is a Hub id, tags), the sizes and complexity figures, and the
    evaluation `results` when given (name -> number). Read from the checkpoint's files: no model is built."""
    info = checkpoint_info(directory)
    weights = read_leading_weights(directory, DEFAULT_MAX_BYTES // 4)
    base = info["base_model"]
    base_is_hub_id = bool(HUB_ID.match(base)) and not Path(base).exists()
    metadata = ModelCardData(
        library_name="transformers",
        base_model=base if base_is_hub_id else None,
        tags=["momos", "mosaic-of-motifs", "compression"],
    )
    ratios = compression_ratios(weights.numpy().tobytes())
    rows = [f"| {name} compression ratio (float32 bytes) | {ratio:.3f} |" for name, ratio in ratios.items()]
    bdm = bdm_of_signs(weights)
    if bdm is not None:
        rows.append(f"| BDM of sign bits | {bdm:,.0f} bits over {weights.numel():,d} signs |")
    errors = list(info["fit_errors"].values())
    if errors:
        rows.append(f"| mean relative weight error at fit time | {sum(errors) / len(errors):.4f} |")
    mib = 2**20
    settings = info["momos_config"]
    template = resources.files("momos_hf.report").joinpath("model_card.md").read_text(encoding="utf-8")
    return string.Template(template).substitute(
        metadata=metadata.to_yaml(),
        title=f"{repo_id.split('/')[-1] if repo_id else info['architecture']} "
        f"(MoMos, {info['bits_per_weight']:.2f} bits/weight)",
        marker=CARD_MARKER,
        base_model_text=f"[{base}](https://huggingface.co/{base})"
        if base_is_hub_id
        else (f"`{base}`" if base else "a model"),
        layers=info["layers"],
        s=settings["s"],
        k=settings["k"] if settings.get("k") is not None else f"capacity {settings['capacity']} of the blocks as",
        bits_per_weight=f"{info['bits_per_weight']:.4f}",
        converted_params=f"{info['converted_params']:,d}",
        dictionaries=info["dictionaries"],
        other_params=f"{info['other_params']:,d}",
        disk_over_dl=f"{info['momos_bytes_on_disk'] / info['description_length_bytes']:.4f}",
        checkpoint_mib=f"{info['checkpoint_bytes'] / mib:.3f}",
        fp16_mib=f"{info['dense_fp16_bytes'] / mib:.3f}",
        fp16_ratio=f"{info['dense_fp16_bytes'] / info['checkpoint_bytes']:.2f}",
        fp32_mib=f"{info['dense_fp32_bytes'] / mib:.3f}",
        fp32_ratio=f"{info['dense_fp32_bytes'] / info['checkpoint_bytes']:.2f}",
        complexity_rows="\n".join(rows) or "| (not measured) | |",
        evaluation=_evaluation_section(results),
        load_class=load_class_for(info["architecture"]),
        repo_id=repo_id or str(directory),
        settings=json.dumps(settings, indent=2, sort_keys=True),
    )


def _evaluation_section(results: Optional[dict[str, Any]]) -> str:
    if not results:
        return ""
    rows = "\n".join(
        f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in results.items()
    )
    return f"## Evaluation\n\n| metric | value |\n|---|---|\n{rows}\n\n"
