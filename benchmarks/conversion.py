"""Conversion throughput and peak memory of k-means and data-aware fitting vs model size, and at 7B shapes.

`scaling`: Llamas of 2, 4 and 8 layers (hidden 1024, about 26M, 51M and 102M converted weights) are built
from a config and converted with k=256, s=16, each in a fresh process that reports the wall time of
`get_momos_model` and the peak resident memory above the built model. Data-aware conversion includes
its calibration: 16 random sequences of 128 tokens. A least-squares line `seconds = a + b * weights`
over the sizes shows whether time grows linearly with parameters.

`llama7b`: stacks of 1 and 2 blocks shaped as Llama-2-7B's (hidden 4096, MLP 11008, 32 heads; random
bfloat16 weights, vocabulary 1024) get the pipeline's sequential data-aware conversion (k=256, s=4, row
scales: 2.06 bits/weight) on 4 windows of 512 tokens. Time per block is the difference of the two runs;
a 7B model's time is extrapolated to its 32 blocks. Peak memory above the model must not grow with the
number of blocks (sequential conversion holds one block's input moments at a time); it is printed beside
the input moments a joint conversion would hold for all 32 blocks.
Usage: python benchmarks/conversion.py [--part scaling llama7b] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse

from common import run_child, write_json

CHILD = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging
from momos_hf import MoMosConfig, get_momos_model
logging.disable_progress_bar()
layers, hidden, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
model = LlamaForCausalLM(config).eval()
calibration = [
    {"input_ids": torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(i))} for i in range(4)
]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
mm = get_momos_model(model, MoMosConfig(k=256, s=16, fit=init), calibration if init == "data-aware" else None)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(l.in_features * l.out_features for l in mm.momos_layers().values())
print(json.dumps({"weights": weights, "seconds": seconds, "peak_above_model_mib": (peak - before) / 1024}))
"""

STACK_CHILD = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging
from momos_hf import MoMosConfig, get_momos_model
logging.disable_progress_bar()
layers, hidden, intermediate, heads, windows, tokens = map(int, sys.argv[1:])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads)
torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 from the start, so the peak reading starts at the model
model = LlamaForCausalLM(config).eval()
torch.set_default_dtype(torch.float32)
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
calibration = [
    {"input_ids": torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(i))}
    for i in range(windows)
]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
mm = get_momos_model(model, MoMosConfig(k=256, s=4, scale=True, fit="data-aware"), calibration, sequential=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(l.in_features * l.out_features for l in mm.momos_layers().values())
print(json.dumps({"weights": weights, "seconds": seconds, "model_mib": model_bytes / 2**20,
                  "peak_above_model_mib": (peak - before) / 1024}))
"""
LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "blocks": 32}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Intercept, slope and R^2 of the least-squares line through `(xs, ys)`."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return intercept, slope, 1 - ss_res / ss_tot if ss_tot > 0 else 1.0


def moment_mib(hidden: int, intermediate: int) -> float:
    """float32 input moments one Llama block's fit needs: q/k/v share one, o_proj, gate/up share one, down_proj."""
    return 4 * (3 * hidden**2 + intermediate**2) / 2**20


def scaling(quick: bool) -> list[dict]:
    hidden, layer_counts = (128, [1, 2, 3]) if quick else (1024, [2, 4, 8])
    rows = []
    print(f"{'init':<11} {'layers':>6} {'Mweights':>9} {'seconds':>8} {'Mweights/s':>10} {'peak above model MiB':>21}")
    for init in ("kmeans", "data-aware"):
        for layers in layer_counts:
            row = dict(init=init, layers=layers, **run_child(CHILD, layers, hidden, init))
            rows.append(row)
            print(
                f"{init:<11} {layers:>6} {row['weights'] / 1e6:>9.1f} {row['seconds']:>8.1f} "
                f"{row['weights'] / row['seconds'] / 1e6:>10.2f} {row['peak_above_model_mib']:>21.0f}",
                flush=True,
            )
        points = [r for r in rows if r["init"] == init]
        a, b, r2 = linear_fit([r["weights"] for r in points], [r["seconds"] for r in points])
        print(f"{init}: seconds = {a:.2f} + {b * 1e6:.2f} per Mweight (R^2 = {r2:.4f})")
    return rows


def llama7b(quick: bool) -> list[dict]:
    shape = {"hidden": 256, "intermediate": 688, "heads": 4, "blocks": 32} if quick else LLAMA_7B
    windows, tokens = (2, 64) if quick else (4, 512)
    rows = []
    print(
        f"\nsequential data-aware conversion, Llama-7B-shaped blocks {shape}, {windows} x {tokens} calibration tokens"
    )
    print(f"{'blocks':>6} {'Mweights':>9} {'model MiB':>10} {'seconds':>8} {'peak above model MiB':>21}")
    for blocks in (1, 2):
        row = dict(
            init="data-aware-sequential",
            layers=blocks,
            **shape,
            **run_child(STACK_CHILD, blocks, shape["hidden"], shape["intermediate"], shape["heads"], windows, tokens),
        )
        rows.append(row)
        print(
            f"{blocks:>6} {row['weights'] / 1e6:>9.1f} {row['model_mib']:>10.0f} {row['seconds']:>8.1f} "
            f"{row['peak_above_model_mib']:>21.0f}",
            flush=True,
        )
    per_block = rows[1]["seconds"] - rows[0]["seconds"]
    total = rows[0]["seconds"] + (shape["blocks"] - 1) * per_block
    one_block = moment_mib(shape["hidden"], shape["intermediate"])
    print(
        f"{per_block:.0f} s per block: {shape['blocks']} blocks in about {total / 3600:.2f} h on this machine; peak "
        "above "
        f"the model {rows[0]['peak_above_model_mib']:.0f} MiB with 1 block, {rows[1]['peak_above_model_mib']:.0f} "
        "MiB with 2 "
        f"(one block's input moments: {one_block:.0f} MiB; all {shape['blocks']} blocks' at once: "
        f"{one_block * shape['blocks'] / 1024:.1f} GiB)"
    )
    rows.append(
        {
            "init": "data-aware-sequential",
            "layers": shape["blocks"],
            **shape,
            "extrapolated_seconds": total,
            "seconds_per_block": per_block,
            "block_moments_mib": one_block,
        }
    )
    return rows


PARTS = {"scaling": scaling, "llama7b": llama7b}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", nargs="+", choices=list(PARTS), default=list(PARTS), help="which measurements to run"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: hidden 128, 1-3 layers; 7B shapes / 16")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = [row for part in args.part for row in PARTS[part](args.quick)]
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
