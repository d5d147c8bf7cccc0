"""Peak memory and time of nearest-motif assignment on a large layer, chunked vs whole.

A 16384 x 8192 layer at s=16 has 8.4M blocks; with k=256 the whole distance matrix would take 8 GiB.
Each budget runs in a fresh process and reports its peak resident memory above the inputs.
Usage: python benchmarks/assign_memory.py [--rows 16384] [--cols 8192]
"""

from __future__ import annotations

import argparse

from common import run_child, write_json

CHILD = """
import json, resource, sys, time, torch
from momos_hf.fit.weight_space import assign
rows, cols, s, k, budget = map(int, sys.argv[1:6])
g = torch.Generator().manual_seed(0)
blocks = torch.randn(rows * cols // s, s, generator=g)
motifs = torch.randn(k, s, generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
index, distance = assign(blocks, motifs, max_bytes=budget)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_peak_mib": (peak - before) / 1024, "checksum": int(index[:1000].sum())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--s", type=int, default=16)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    n_blocks = args.rows * args.cols // args.s
    whole = n_blocks * args.k * 4
    outputs = n_blocks * (8 + 4)  # int64 index + float32 distance
    print(
        f"layer {args.rows}x{args.cols}, s={args.s}, k={args.k}: {n_blocks:,d} blocks; "
        f"whole distance matrix {whole / 2**30:.2f} GiB; outputs {outputs / 2**20:.0f} MiB"
    )
    print(f"{'budget':>10} {'extra peak MiB':>15} {'seconds':>8}")
    results = []
    for budget in (2**20, 16 * 2**20, 256 * 2**20):
        row = run_child(CHILD, args.rows, args.cols, args.s, args.k, budget)
        row["budget_mib"] = budget / 2**20
        results.append(row)
        print(f"{budget / 2**20:>7.0f} MiB {row['extra_peak_mib']:>15.0f} {row['seconds']:>8.2f}")
    print(
        f"peak above inputs stays near the outputs ({outputs / 2**20:.0f} MiB) + one chunk; "
        f"{whole / 2**20 / max(r['extra_peak_mib'] for r in results):.0f}x below the whole matrix"
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
