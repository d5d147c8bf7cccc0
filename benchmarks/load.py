"""Load time and peak memory of `from_pretrained` on a MoMos checkpoint vs the dense one, side by side.

A Llama of about 170M parameters is built from a config (seeded), saved dense in fp32, converted with the paper's
sampled motifs (k=256, s=16; the fit method does not change loading) and saved compact. Each load runs in a fresh
process, which reports the wall time of `AutoModelForCausalLM.from_pretrained` and the peak resident memory above
the process after imports, once every weight has been read and one forward pass run. Usage: python
benchmarks/load.py [--layers 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import CACHE, run_child, write_json

CHILD = """
import json, resource, sys, time
import torch, momos_hf
from transformers import AutoModelForCausalLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
with torch.no_grad():
    for tensor in model.state_dict().values():  # touch every page: memory-mapped weights count once read
        tensor.view(-1)[::1024].sum()
    logits = model(input_ids=torch.arange(16)[None]).logits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = bool(torch.isfinite(logits).all())
print(json.dumps({"seconds": seconds, "peak_mib": (peak - before) / 1024, "finite": finite}))
"""


def build_checkpoints(layers: int) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from momos_hf import MoMosConfig, get_momos_model

    folder = CACHE / f"bench-load-{layers}"
    paths = {"dense fp32": folder / "dense", "MoMos k=256 s=16": folder / "momos"}
    if not (paths["MoMos k=256 s=16"] / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=16,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(paths["dense fp32"])
        get_momos_model(model, MoMosConfig(k=256, s=16, fit="sample")).save_pretrained(paths["MoMos k=256 s=16"])
    return {name: str(path) for name, path in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per checkpoint; the fastest is kept")
    parser.add_argument("--json")
    args = parser.parse_args()
    paths = build_checkpoints(args.layers)
    results = {}
    for name, path in paths.items():
        runs = []
        for _ in range(args.repeats):
            runs.append(run_child(CHILD, path))
        results[name] = min(runs, key=lambda r: r["seconds"])
        results[name]["checkpoint_mib"] = sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20
    dense, momos = results["dense fp32"], results["MoMos k=256 s=16"]
    print(f"{'checkpoint':<18} {'size MiB':>9} {'load s':>7} {'peak MiB':>9}")
    for name, row in results.items():
        print(f"{name:<18} {row['checkpoint_mib']:>9.1f} {row['seconds']:>7.2f} {row['peak_mib']:>9.1f}")
    print(
        f"MoMos / dense: size {momos['checkpoint_mib'] / dense['checkpoint_mib']:.3f}, load time "
        f"{momos['seconds'] / dense['seconds']:.2f}, peak memory {momos['peak_mib'] / dense['peak_mib']:.3f}"
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
