"""MkDocs hook: fills the generated parts of the docs at build time.

`<!-- cli-reference -->` becomes the `--help` of `momos-hf` and of each of its subcommands, from the argparse
parser itself; `<!-- results: NAME -->` becomes a markdown table built from the JSON files under
`benchmarks/results/` (`TABLES` lists the names). Nothing here is typed by hand, so the pages cannot drift
from the parser or the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HELP_WIDTH = "100"
PLACEHOLDER = re.compile(r"<!--\s*(cli-reference|results:\s*([\w-]+))\s*-->")

Column = tuple[str, Any]  # (header, key of a row or a function of the row)


# -- generic table code ---------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A cell: blank for None, thousands separators from 1000, else 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,d}"
    return str(value).replace("|", "\\|")


def table(rows: Iterable[dict], columns: list[Column]) -> str:
    """A markdown table, one line per row; a column is a key of the row or a function of it."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [get(row) if callable(get) else row.get(get) for _, get in columns]
        lines.append("| " + " | ".join(fmt(cell) for cell in cells) + " |")
    return "\n".join(lines)


def pivot(rows: list[dict], index: list[Column], column: Callable[[dict], str], value: Callable[[dict], Any]) -> str:
    """A markdown table with one line per distinct `index` and one column per distinct `column(row)`,
    holding `value(row)` (both in the order first seen)."""
    keys = [get for _, get in index]
    labels = list(dict.fromkeys(column(r) for r in rows))
    lines: dict[tuple, dict] = {}
    for r in rows:
        cells = tuple(g(r) if callable(g) else r.get(g) for g in keys)
        lines.setdefault(cells, dict(zip(range(len(cells)), cells)))[column(r)] = value(r)
    header = [(h, i) for i, (h, _) in enumerate(index)] + [(label, label) for label in labels]
    return table(lines.values(), header)


def load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


# -- the tables -----------------------------------------------------------------------------------------


def fidelity() -> str:
    rows = load("fidelity.json")
    return pivot(
        rows,
        [("bits/weight (mosaic)", "bits_per_weight")],
        lambda r: f"{r['model']}: {r['method']}",
        lambda r: r["score"],
    )


def fidelity_detail() -> str:
    return table(
        load("fidelity.json"),
        [
            ("model", "model"),
            ("fit", "method"),
            ("bits/weight (mosaic)", "bits_per_weight"),
            ("bits/weight (all stored)", "total_bits_per_weight"),
            ("rel. weight error", "rel_error"),
            ("error / Gaussian bound", "error_over_bound"),
            ("score", "score"),
            ("seconds", "seconds"),
        ],
    )


def llm_quality() -> str:
    data = load("llm_quality.json")
    dense = data["dense"]["perplexity"]
    return table(
        [data["dense"], *data["rows"]],
        [
            ("method", "method"),
            ("target bits", "rate"),
            ("bits/weight", "bits_per_weight"),
            ("perplexity", "perplexity"),
            ("vs dense", lambda r: f"{fmt(r['perplexity'] / dense)}x"),
            ("conversion s", lambda r: None if r.get("shared_cores") or r["method"] == "dense" else r["conversion_s"]),
            ("peak GB", lambda r: r["peak_bytes"] / 1e9),
        ],
    )


def lora() -> str:
    return table(
        load("lora.json"),
        [
            ("variant", "variant"),
            ("steps", "steps"),
            ("trainable parameters", "trainable_parameters"),
            ("s/step", "seconds_per_step"),
            ("perplexity before", "ppl_before"),
            ("after", "ppl_after"),
            ("after vs untrained dense", "vs_dense"),
        ],
    )


def conversion() -> str:
    return table(
        load("conversion.json"),
        [
            ("fit", "init"),
            ("blocks", "layers"),
            ("converted weights", "weights"),
            ("seconds", "seconds"),
            (
                "Mweights/s",
                lambda r: r["weights"] / r["seconds"] / 1e6 if r.get("weights") and r.get("seconds") else None,
            ),
            ("peak above model MiB", "peak_above_model_mib"),
            ("model MiB", "model_mib"),
            ("extrapolated s", "extrapolated_seconds"),
        ],
    )


def size() -> str:
    return table(
        load("size.json"),
        [
            ("model", "model"),
            ("fit", "method"),
            ("bits/weight", "bits_per_weight"),
            ("MoMos bytes on disk", "momos_bytes"),
            ("disk / DL", lambda r: r["momos_bytes"] / r["description_length_bytes"]),
            ("smaller than fp16", lambda r: r["converted_fp16_bytes"] / r["momos_bytes"]),
            ("zstd saving", "zstd_saving"),
            ("order-0 entropy saving", "entropy_saving"),
        ],
    )


def inference_layers() -> str:
    """Speed of each variant against dense float32 (`vs_dense` in the file is the time ratio)."""
    rows = [r for r in load("inference.json")["layers"] if r["variant"] != "dense float32"]
    return pivot(
        rows,
        [("out x in", lambda r: f"{r['out']}x{r['in']}"), ("s", "s"), ("rows", "rows")],
        lambda r: r["variant"],
        lambda r: 1 / r["vs_dense"],
    )


def inference_memory() -> str:
    rows = [r for r in load("inference.json")["layers"] if r["variant"] == "momos auto" and r["rows"] == 1]
    return table(
        rows,
        [
            ("out x in", lambda r: f"{r['out']}x{r['in']}"),
            ("s", "s"),
            ("weight MiB", "weight_mib"),
            ("less than dense fp32", "memory_saving"),
        ],
    )


def inference_models() -> str:
    return table(
        load("inference.json")["model"],
        [
            ("model", "model_name"),
            ("batch", "batch"),
            ("variant", "model"),
            ("tokens/s", "tokens_per_second"),
            ("vs dense", "speed_vs_dense"),
            ("weight MiB", "weight_mib"),
        ],
    )


def reproduce() -> str:
    """The runs of `recipes/reproduce_paper.py`, grouped over seeds: mean ± std and median score."""
    runs = load("reproduce/report.json")
    keys = ("task", "procedure", "projection", "capacity", "q")
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run.get(k) for k in keys), []).append(run)
    rows = []
    for group, members in groups.items():
        scores = [m["score"] for m in members]
        rows.append(
            {
                **dict(zip(keys, group)),
                "seeds": len(members),
                "score": f"{fmt(statistics.mean(scores))} ± {fmt(statistics.pstdev(scores))}",
                "median": statistics.median(scores),
                "bits_per_param": members[0]["bits_per_param"],
            }
        )
    return table(
        rows,
        [(k, k) for k in keys]
        + [
            ("seeds", "seeds"),
            ("score (mean ± std)", "score"),
            ("median", "median"),
            ("bits/param", "bits_per_param"),
        ],
    )


TABLES: dict[str, Callable[[], str]] = {
    "fidelity": fidelity,
    "fidelity-detail": fidelity_detail,
    "llm-quality": llm_quality,
    "lora": lora,
    "conversion": conversion,
    "size": size,
    "inference-layers": inference_layers,
    "inference-memory": inference_memory,
    "inference-models": inference_models,
    "reproduce": reproduce,
}


# -- the CLI reference ----------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """`momos-hf --help` and `momos-hf COMMAND --help` for every subcommand, as markdown."""
    from momos_hf.app.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal: fix the width
    try:
        parser = build_parser()
        parts = [("momos-hf", parser)] + [(f"momos-hf {name}", sub) for name, sub in subcommands(parser).items()]
        return "\n\n".join(f"## `{title}`\n\n```text\n{p.format_help().rstrip()}\n```" for title, p in parts)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


# -- the hook -------------------------------------------------------------------------------------------


def render(markdown: str) -> str:
    """`markdown` with every placeholder replaced; an unknown table name is an error."""

    def replace(match: re.Match) -> str:
        if match.group(1) == "cli-reference":
            return cli_reference()
        name = match.group(2)
        if name not in TABLES:
            raise ValueError(f"unknown results table {name!r}; known: {sorted(TABLES)}")
        return TABLES[name]()

    return PLACEHOLDER.sub(replace, markdown)


def on_page_markdown(
    markdown: str, page: Optional[Any] = None, config: Optional[Any] = None, files: Optional[Any] = None, **kwargs: Any
) -> str:
    return render(markdown)
