"""Checkpoint size vs description length vs dense fp16, and what an entropy coder would save on the mosaic.

all-MiniLM-L6-v2 (or, with --quick, a small Llama built from a config) is converted at 0.5, 1, 2 and 3
index bits per weight with k-means and data-aware motifs and saved with `save_pretrained`. Printed per
setting: the bytes of the MoMos tensors on disk next to their description length, the converted layers
next to fp16, and the mosaic under two entropy coders: zstd (level 19) of the packed mosaic bytes, and
the order-0 entropy of motif use per dictionary (what an ideal arithmetic coder spends).
Usage: python benchmarks/size.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import zstandard
from common import encode, load_minilm, shakespeare_lines, write_json
from fidelity import RATES, convert
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from momos_hf.checkpoint.info import checkpoint_info
from momos_hf.mosaic import index_bits
from momos_hf.packing import pack_indices
from momos_hf.report.complexity import usage_entropy


def mosaic_coding(model) -> dict[str, float]:
    """Bytes of the packed mosaics, of their zstd compression, and of their order-0 entropy."""
    packed = zstd = entropy_bits = 0.0
    for layer in model.momos_layers().values():
        data = pack_indices(layer.mosaic, index_bits(layer.k)).numpy().tobytes()
        packed += len(data)
        zstd += len(zstandard.ZstdCompressor(level=19).compress(data))
        entropy_bits += usage_entropy(layer.mosaic, layer.k) * layer.mosaic.numel()
    return {"packed_mosaic_bytes": packed, "zstd_mosaic_bytes": zstd, "entropy_mosaic_bytes": entropy_bits / 8}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a small Llama from a config, 2 rates")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    torch.manual_seed(0)
    if args.quick:
        config = LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
        )
        dense, name, rates = LlamaForCausalLM(config).eval(), "llama-from-config", [1.0, 2.0]
        calibration = [
            {"input_ids": torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(i))} for i in range(2)
        ]
    else:
        dense, tokenizer, _ = load_minilm()
        name, rates = "all-MiniLM-L6-v2", list(RATES)
        lines = shakespeare_lines("train", 512)
        calibration = [encode(tokenizer, lines[i : i + 32]) for i in range(0, len(lines), 32)]
    rows = []
    print(f"{name}: MoMos tensors on disk vs description length (DL), converted layers vs fp16, mosaic entropy coding")
    print(
        f"{'method':<10} {'bits/w':>6} {'MoMos KiB':>9} {'DL KiB':>8} {'disk/DL':>7} {'fp16 KiB':>9} {'fp16/disk':>9} "
        f"{'zstd saves':>10} {'entropy saves':>13}"
    )
    for rate in rates:
        for method in ("kmeans", "data-aware"):
            model, _ = convert(copy.deepcopy(dense), method, rate, calibration)
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                info = checkpoint_info(folder)
            coding = mosaic_coding(model)
            row = dict(
                model=name,
                method=method,
                bits_per_weight=rate,
                momos_bytes=info["momos_bytes_on_disk"],
                description_length_bytes=info["description_length_bytes"],
                checkpoint_bytes=info["checkpoint_bytes"],
                converted_fp16_bytes=2 * info["converted_params"],
                **coding,
                zstd_saving=1 - coding["zstd_mosaic_bytes"] / coding["packed_mosaic_bytes"],
                entropy_saving=1 - coding["entropy_mosaic_bytes"] / coding["packed_mosaic_bytes"],
            )
            rows.append(row)
            print(
                f"{method:<10} {rate:>6.1f} {row['momos_bytes'] / 1024:>9.1f} "
                f"{row['description_length_bytes'] / 1024:>8.1f} "
                f"{row['momos_bytes'] / row['description_length_bytes']:>7.4f} "
                f"{row['converted_fp16_bytes'] / 1024:>9.1f} "
                f"{row['converted_fp16_bytes'] / row['momos_bytes']:>9.1f} {row['zstd_saving']:>10.1%} "
                f"{row['entropy_saving']:>13.1%}",
                flush=True,
            )
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
