"""Hostile-user probe of momos-hf: saving, loading, pushing, converting and resuming, attacked as a careless or
malicious user would, with one count table over every case at the end.

    python tests/trust_probe.py [--quick] [--json FILE] [--only REGEX] [--keep] [--strict]

--quick runs a fixed subset of 21 cases (about 30 s); --strict exits 1 when any case is neither correct nor
a clear error (without it the exit status is 0 whatever the probe finds).

Families (tiny Llama / GPT-2 / BERT / T5 built from configs, converted with small k, s and one Lloyd step):
  config  bad `MoMosConfig` values and `get_momos_model` arguments (types, ranges, strings for bools and numbers,
          huge seeds, k/s combinations, a config mutated after validation); a conversion that succeeds must
          give finite outputs, save and load back identically, and a refused one must leave the model untouched.
  load    corrupted checkpoints, each loaded through `AutoModel*.from_pretrained`, `MoMosModel.from_pretrained`
          and `momos-hf info`: truncation at many offsets, flipped bytes, deleted/renamed/replaced files, edits of
          every quantization_config field, of config.json itself, of the shard index (../, absolute, FIFO,
          directory, missing shard), tensors removed/added/retyped/NaN and hand-made safetensors headers, both
          plainly and re-signed as a deliberate forger would (digest and checksums recomputed).
  save    into `.`, `..`, a link, a dangling link, a file, a folder holding a dense model, next to the user's
          own `model*.safetensors`, saves that fail half way (monkeypatched), kill -9 at random points of a
          saving loop (seeded, bounded), two processes saving at once; afterwards the folder must hold one whole
          checkpoint (old or new, with its own generation config and tokenizer) and every user file unchanged.
  push    to a local Hub stand-in (tests/hub_server.py, clients in subprocesses with HF_ENDPOINT): hidden folders
          with secrets, links out of the folder, .git, corrupted weights, non-checkpoints, default privacy of
          every way to push; what was uploaded, whether any request preceded a refusal, the token anywhere.
  cli     `python -m momos_hf.app.cli` misuse (missing paths, files for folders, bad numbers, --output_dir ., compress
          of a MoMos checkpoint with other or the same settings, calibration options).
  recipe  `python recipes/finetune.py` misuse on a tiny run (--max_steps 0, --block_size 0, empty/binary/missing
          data, resuming from corrupted/incomplete/finished/foreign step_N, --hub_token with tensorboard and a
          push, then every written file grepped for the token, --output_dir holding the user's files).

Outcome of each case (the table's columns; they add up to tries):
  correct       succeeded with the right result (same outputs as the saved model, files intact, ...)
  clear error   refused with a ValueError/TypeError (CLIs: exit status 2 and exactly one stderr line starting
                `momos-hf: error:` / `finetune.py: error:`, progress bars aside) whose message names the problem
                (each case gives a regex for that)
  raw error     any other exception (an OSError too, however clear its text), a ValueError whose message does
                not name the problem, a traceback, or a CLI error of several lines (argparse's usage included)
  hang          did not finish within the timeout (risky cases run in a subprocess; in-process ones under alarm)
  silent wrong  "succeeded" but the result is wrong: other outputs than the saved model, NaN, random weights, a
                mislabelled config, an unloadable checkpoint written without complaint, a wrong step count
  leak          the secret token in a written file, a log or data sent to the Hub; a file outside the allow-list
                uploaded; a repository created public by default or before validation failed
  data lost     a user file (README, notes, tokenizer, other weights, the previous good checkpoint) missing or
                changed afterwards, or the target folder gone or replaced
A case that shows several problems counts under the most severe (hang > leak > lost > wrong > raw > clear).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    TOKENIZERS_PARALLELISM="false",
    TRANSFORMERS_VERBOSITY="error",
)
os.environ.pop("HF_TOKEN", None)
OWN_HF_HOME = "HF_HOME" not in os.environ  # children inherit the parent's; the parent removes it at the end
if OWN_HF_HOME:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="probe-hf-home-")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import momos_hf.checkpoint.save as ckpt  # noqa: E402 (the save module: the probe patches its writes)
from momos_hf import MoMosConfig, MoMosModel, get_momos_model  # noqa: E402
from momos_hf.app.text import byte_tokenizer  # noqa: E402
from momos_hf.checkpoint.verify import weight_file_names  # noqa: E402
from momos_hf.train import ComplexityTracker, HardConcreteGate, kept_for_bits, top_masks  # noqa: E402

T.utils.logging.set_verbosity_error()
T.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

SECRET = "hf_PROBE_SECRET_5eb1"
CATEGORIES = ("correct", "clear", "raw", "hang", "wrong", "leak", "lost")
LABELS = ("correct", "clear error", "raw error", "hang", "silent wrong", "leak", "data lost")
SEVERITY = ("correct", "clear", "raw", "wrong", "lost", "leak", "hang")
TIMEOUT = 120  # seconds for one case (alarm in process, or subprocess timeout)
RECIPE_TIMEOUT = 300
PY = sys.executable
WORK: Path = Path()  # set by main(): scratch root, bases under WORK / "base"
ENV: dict = {}  # environment of every subprocess: this tree first on the path


class Hang(BaseException):
    pass


class Injected(OSError):
    """The fault a monkeypatched save raises (a full disk)."""


class PowerCut(BaseException):
    """Like KeyboardInterrupt: not an Exception, so only `finally` blocks run."""


Verdict = tuple  # (category, message)


# -- judging ----------------------------------------------------------------------------------------------


def after(_: object, value):
    """`value`, once the side effect in the first argument has happened (for one-line case tables)."""
    return value


def line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def judge(err: BaseException, expect: Optional[str], accept: tuple = (ValueError, TypeError)) -> Verdict:
    """An exception's category: clear when it is a ValueError/TypeError (or `accept`) naming the problem."""
    message = f"{type(err).__name__}: {line(err)}"
    if isinstance(err, accept) and (expect is None or re.search(expect, str(err), re.I | re.S)):
        return "clear", message
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    origin = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    if where and Path(where.filename).name == Path(__file__).name:
        origin += " PROBE BUG?"
    return "raw", ("unclear " if isinstance(err, accept) else "") + message + origin


def attempt(call: Callable, expect: Optional[str] = None, accept: tuple = (ValueError, TypeError)):
    """(None, value) when `call()` returns, else (verdict, None)."""
    try:
        return None, call()
    except (Exception, PowerCut) as err:  # noqa: BLE001 - classifying every failure is the point
        return judge(err, expect, accept), None


def worst(*verdicts: Optional[Verdict]) -> Verdict:
    present = [v for v in verdicts if v]
    return max(present, key=lambda v: SEVERITY.index(v[0])) if present else ("correct", "")


PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # progress bars on stderr are not error lines


def cli_verdict(done, prefix: str, expect: Optional[str]) -> Optional[Verdict]:
    """A finished CLI run: None when it exited 0, else clear (exit 2, one line `prefix...` naming the
    problem) or raw; `done` None means it timed out."""
    if done is None:
        return "hang", "no exit within the timeout"
    if done.returncode == 0:
        return None
    lines = [l for l in done.stderr.splitlines() if l.strip() and not PROGRESS.search(l)]
    last = lines[-1] if lines else "(no stderr)"
    if (
        done.returncode == 2
        and len(lines) == 1
        and last.startswith(prefix)
        and (expect is None or re.search(expect, last, re.I))
    ):
        return "clear", line(last)
    return "raw", f"exit {done.returncode}, {len(lines)} stderr lines, last: {line(last)}"


def run(argv: list, cwd: Path, timeout: int = TIMEOUT, env: Optional[dict] = None):
    """A subprocess's CompletedProcess, or None when it ran past `timeout` (then it is killed)."""
    try:
        return subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None


def cli_inprocess(argv: list) -> tuple[int, str, str]:
    """`momos-hf ARGV` in this process: (exit status, stdout, stderr); an escaping exception prints its
    traceback to stderr with status 1, as the real entry point would."""
    from momos_hf.app.cli import main as cli_main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


# -- models, bases and files ------------------------------------------------------------------------------


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        ).eval()
    if arch == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        ).eval()
    if arch == "bert":
        return T.BertModel(
            T.BertConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ).eval()
    return T.T5ForConditionalGeneration(
        T.T5Config(
            vocab_size=96,
            d_model=32,
            d_ff=48,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    ).eval()


AUTO = {
    "llama": T.AutoModelForCausalLM,
    "gpt2": T.AutoModelForCausalLM,
    "bert": T.AutoModel,
    "t5": T.AutoModelForSeq2SeqLM,
}
SETTINGS = {
    "llama": dict(k=12, s=4, scale=True),
    "gpt2": dict(k=16, s=4, motif_scope="global"),
    "bert": dict(k=16, s=4),
    "t5": dict(k=16, s=4, scale=True),
}


def converted(arch: str = "llama", seed: int = 0, **settings) -> MoMosModel:
    config = MoMosConfig(**{"kmeans_iters": 1, "seed": seed, **SETTINGS[arch], **settings})
    return get_momos_model(tiny(arch, seed), config)


def outputs(model, arch: str = "llama") -> torch.Tensor:
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids[:, :6]} if arch == "t5" else {})}
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def base(name: str) -> Path:
    return WORK / "base" / name


BASE_ARCH = {
    "llama": "llama",
    "sharded": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "t5": "t5",
    "A": "llama",
    "B": "llama",
    "qbit": "llama",
}
BASE_SETTINGS = {"qbit": dict(motif_bits=4, motif_scope="global")}  # beyond the architecture's SETTINGS


def tokenizer_for(name: str):
    tok = byte_tokenizer()
    tok.model_max_length = {"A": 111, "B": 222}.get(name, 64)
    return tok


def build_bases() -> None:
    """The checkpoints every case copies: one per architecture, a sharded Llama, two Llamas A and B (other
    seeds, generation configs and tokenizers) for the saving races, a dense Llama with a tokenizer; and for
    each its reference outputs and `momos-hf info` text."""
    done = WORK / "base" / ".done"
    if done.exists():
        return
    (WORK / "base" / "refs").mkdir(parents=True, exist_ok=True)
    for name, arch in BASE_ARCH.items():
        seed = {"A": 1, "B": 2}.get(name, 0)
        mm = converted(arch, seed, **BASE_SETTINGS.get(name, {}))
        if name in ("A", "B"):
            mm.base_model.generation_config.max_length = {"A": 21, "B": 99}[name]
        mm.save_pretrained(
            base(name),
            tokenizer=tokenizer_for(name) if name in ("A", "B") else None,
            max_shard_size=6000 if name == "sharded" else "5GB",
        )
        save_file({"out": outputs(mm, arch).contiguous()}, WORK / "base" / "refs" / f"{name}.safetensors")
        (WORK / "base" / "refs" / f"{name}.info").write_text(cli_inprocess(["info", base(name)])[1])
    dense = base("dense")
    tiny("llama").save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    (WORK / "base" / "calib.txt").write_text("Shall I compare thee to a summer's day?\n" * 200)
    (WORK / "base" / "tiny_llama.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 257,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
            }
        )
    )
    (WORK / "base" / "train.txt").write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    )
    done.write_text("ok")


@functools.lru_cache(maxsize=None)
def reference(name: str) -> torch.Tensor:
    return load_file(WORK / "base" / "refs" / f"{name}.safetensors")["out"]


def base_info(name: str) -> str:
    return (WORK / "base" / "refs" / f"{name}.info").read_text()


def copy_base(name: str, tmp: Path, to: str = "ckpt") -> Path:
    target = tmp / to
    shutil.copytree(base(name), target, symlinks=True)
    return target


MINE = {
    "README.md": b"my own card\n",
    "notes/todo.txt": b"keep me\n",
    "model_backup.safetensors": b"my dense backup",
    "model-00001-of-00002.safetensors": b"my shard",
    "model.safetensors.index.json": b'{"mine": true}',
}


def plant(folder: Path, files: dict = MINE) -> dict:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def damaged(folder: Path, files: dict) -> Optional[Verdict]:
    """'lost' when the folder or one of the user's files is gone or changed."""
    if not folder.is_dir():
        return "lost", f"{folder.name} is gone or no longer a folder"
    bad = [n for n, data in files.items() if not (folder / n).is_file() or (folder / n).read_bytes() != data]
    return ("lost", f"user files missing or changed: {bad}") if bad else None


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def changed(before: dict, folder: Path) -> Optional[Verdict]:
    after = snapshot(folder) if folder.is_dir() else {}
    diff = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    return ("lost", f"files changed by a failed save: {diff}") if diff else None


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".momos"))


def whole_checkpoint(folder: Path, names=("A", "B")) -> Verdict:
    """The folder holds one of the checkpoints `names`, complete: same outputs, and the generation config
    and tokenizer of that same save."""
    v, mm = attempt(lambda: MoMosModel.from_pretrained(folder))
    if v:
        return "lost", f"the folder no longer loads: {v[1]}"
    got = outputs(mm)
    match = [n for n in names if torch.equal(got, reference(n))]
    if not match:
        return "lost", "the folder loads, but as neither checkpoint"
    expected = {"A": (21, 111), "B": (99, 222)}.get(match[0])
    if expected:
        found = (
            read_json(folder / "generation_config.json").get("max_length"),
            read_json(folder / "tokenizer_config.json").get("model_max_length")
            if (folder / "tokenizer_config.json").exists()
            else None,
        )
        if found != expected:
            return "lost", (
                f"mixed checkpoint: weights of {match[0]}, but (generation max_length, tokenizer "
                f"model_max_length) = {found}, expected {expected}"
            )
    return "correct", f"holds checkpoint {match[0]}"


def pad8(header: bytes) -> bytes:
    return header + b" " * (-len(header) % 8)


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def weights_path(folder: Path) -> Path:
    return folder / read_json(folder / "config.json")["quantization_config"]["weights"]


def resign(folder: Path) -> None:
    """Make an edited checkpoint consistent again, as a forger would: the config digest into every weight
    file's metadata, then every checksum (index included) into config.json."""
    config = read_json(folder / "config.json")
    q = config["quantization_config"]
    digest = ckpt.config_digest(config)
    sums = {}
    for name in weight_file_names(folder, q["weights"]):
        path = folder / name
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        save_file(load_file(path), path, metadata={**metadata, "momos_config_sha256": digest})
        sums[name] = ckpt.sha256_of(path)
    if q["weights"].endswith(ckpt.INDEX_SUFFIX):
        sums[q["weights"]] = ckpt.sha256_of(folder / q["weights"])
    q["checksums"] = sums
    write_json(folder / "config.json", config)


def fix_checksum(folder: Path, name: str) -> None:
    config = read_json(folder / "config.json")
    config["quantization_config"]["checksums"][name] = ckpt.sha256_of(folder / name)
    write_json(folder / "config.json", config)


# -- the case table ---------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    family: str
    fn: Callable[[Path], Verdict]
    quick: bool = False
    isolate: bool = False  # run in a fresh subprocess (it may block in a system call)
    timeout: int = TIMEOUT


CASES: list[Case] = []


def add(family: str, name: str, fn: Callable[[Path], Verdict], **options) -> None:
    CASES.append(Case(f"{family}/{name}", family, fn, **options))


# 1. configs ----------------------------------------------------------------------------------------------


def untouched(model) -> bool:
    """No module of momos-hf inside and no quantization config: a refused conversion changed nothing."""
    return (
        not any(type(m).__module__.startswith("momos_hf") for m in model.modules())
        and getattr(model.config, "quantization_config", None) is None
    )


def convert_save_load(
    tmp: Path,
    make_config: Callable,
    expect: Optional[str],
    arch: str = "llama",
    mutate: Optional[Callable] = None,
    **convert_kwargs,
) -> Verdict:
    """Build a config (it may refuse), convert a tiny model with it (it may refuse, leaving the model
    untouched), then the converted model must run finitely and save and load back identically."""
    v, config = attempt(make_config, expect)
    if v:
        return v
    if mutate:
        mutate(config)
    model = tiny(arch)
    v, mm = attempt(lambda: get_momos_model(model, config, **convert_kwargs), expect)
    if v:
        return (
            v if untouched(model) else worst(v, ("wrong", f"refused ({v[1]}) but left the model converted or marked"))
        )
    got = outputs(mm, arch)
    if not torch.isfinite(got).all():
        return "wrong", "converted model gives NaN/inf outputs"
    v, _ = attempt(lambda: mm.save_pretrained(tmp / "out"), expect)
    if v:
        return v
    v, loaded = attempt(lambda: MoMosModel.from_pretrained(tmp / "out"))
    if v:
        return "wrong", f"conversion and save succeeded, the checkpoint does not load: {v[1]}"
    if not torch.equal(outputs(loaded, arch), got):
        return "wrong", "the saved checkpoint loads with other outputs"
    return "correct", "converted, saved and reloaded identically" + (
        " (no refusal expected)" if expect is None else f" although {expect!r} was expected to be refused"
    )


BIG = 2**63
CONFIG_CASES = [  # (name, MoMosConfig kwargs, regex the refusal must match; None: must work)
    ("k-0", dict(k=0), r"\bk\b"),
    ("k-negative", dict(k=-3), r"\bk\b"),
    ("k-float", dict(k=12.0), r"\bk\b"),
    ("k-string", dict(k="12"), r"\bk\b"),
    ("k-bool", dict(k=True), r"\bk\b"),
    ("k-nan", dict(k=float("nan")), r"\bk\b"),
    ("k-huge", dict(k=2**40), r"k=.*do not fit"),
    ("k-default-too-big", dict(k=None, s=4), r"k=256|more than"),
    ("k-1", dict(k=1), None),
    ("k-2-s-1", dict(k=2, s=1), None),
    ("s-0", dict(s=0), r"\bs\b"),
    ("s-negative", dict(s=-4), r"\bs\b"),
    ("s-string", dict(s="4"), r"\bs\b"),
    ("s-float", dict(s=4.0), r"\bs\b"),
    ("s-bool", dict(s=True), r"\bs\b"),
    ("s-3-padding", dict(s=3), None),
    ("s-33-wider-than-rows", dict(k=4, s=33), None),
    ("s-1e6", dict(k=4, s=10**6), r"more than|dense bytes"),
    ("capacity-and-k", dict(k=12, capacity=0.5), r"capacity"),
    ("capacity-0", dict(k=None, capacity=0), r"capacity"),
    ("capacity-1.5", dict(k=None, capacity=1.5), r"capacity"),
    ("capacity-string", dict(k=None, capacity="0.1"), r"capacity"),
    ("capacity-nan", dict(k=None, capacity=float("nan")), r"capacity"),
    ("capacity-bool", dict(k=None, capacity=True), r"capacity"),
    ("capacity-tiny", dict(k=None, capacity=1e-9), None),
    ("scope-capitalised", dict(motif_scope="Global"), r"motif_scope"),
    ("scope-none", dict(motif_scope=None), r"motif_scope"),
    ("fit-unknown", {"fit": "kmeans++"}, "fit"),
    ("fit-data-aware-no-data", {"fit": "data-aware"}, r"calibration"),
    ("kmeans-iters-negative", dict(kmeans_iters=-1), r"kmeans_iters"),
    ("kmeans-iters-string", dict(kmeans_iters="3"), r"kmeans_iters"),
    ("kmeans-iters-0", dict(kmeans_iters=0), None),
    ("zero-motif-string", dict(zero_motif="False"), r"zero_motif"),
    ("zero-motif-int", dict(zero_motif=1), r"zero_motif"),
    ("zero-motif-k1", dict(k=1, zero_motif=True), r"zero_motif"),
    ("zero-motif-k2", dict(k=2, zero_motif=True), None),
    ("scale-string", dict(scale="yes"), r"scale"),
    ("scale-int", dict(scale=0), r"scale"),
    ("motif-dtype-alias", dict(motif_dtype="fp16"), r"motif_dtype"),
    ("motif-dtype-torch", dict(motif_dtype=torch.float16), r"motif_dtype"),
    ("motif-dtype-float64", dict(motif_dtype="float64"), r"motif_dtype"),
    ("motif-dtype-bf16", dict(motif_dtype="bfloat16"), None),
    ("seed-negative", dict(seed=-1), r"seed"),
    ("seed-2^63", dict(seed=BIG), r"seed"),
    ("seed-max", dict(seed=BIG - 1), None),
    ("seed-string", dict(seed="0"), r"seed"),
    ("seed-float", dict(seed=1.0), r"seed"),
    ("seed-bool", dict(seed=True), r"seed"),
    ("modules-to-save-string", dict(modules_to_save="lm_head"), None),
    ("modules-to-save-unknown", dict(modules_to_save="nope"), r"modules_to_save"),
    ("modules-to-save-overlap", dict(modules_to_save=["q_proj"]), r"modules_to_save|both"),
    ("modules-to-save-int", dict(modules_to_save=[1]), r"modules_to_save"),
    ("targets-empty-list", dict(target_modules=[]), r"target_modules"),
    ("targets-empty-string", dict(target_modules=""), r"target_modules|not nn.Linear"),
    ("targets-bad-regex", dict(target_modules="("), r"target_modules|regex"),
    ("targets-int", dict(target_modules=5), r"target_modules"),
    ("targets-embedding", dict(target_modules=["embed_tokens"]), r"not nn.Linear"),
    ("targets-dot-star", dict(target_modules=".*"), r"not nn.Linear|does not replace"),
    ("targets-set", dict(target_modules={"q_proj", "v_proj"}), None),
    ("train-mode-upper", dict(train_mode="STE"), r"train_mode"),
    ("project-every-negative", dict(project_every=-1), r"project_every"),
    ("project-every-float", dict(project_every=1.5), r"project_every"),
    ("max-assign-bytes-0", dict(max_assign_bytes=0), r"max_assign_bytes"),
    ("max-assign-bytes-1", dict(max_assign_bytes=1), None),
    ("unknown-field", dict(colour="red"), r"colour"),
]

TRAINING_ARGUMENT_CASES = [  # (name, call, regex the refusal must match): training helpers given bad arguments
    ("tracker-every-float", lambda: ComplexityTracker(every=2.5), r"every"),
    ("tracker-overhead-nan", lambda: ComplexityTracker(max_overhead=float("nan")), r"max_overhead"),
    ("kept-for-bits-nan", lambda: kept_for_bits(1000, float("nan")), r"bits"),
    ("top-masks-nan-scores", lambda: top_masks([torch.tensor([1.0, float("nan")])], 1), r"NaN"),
    ("top-masks-more-than-all", lambda: top_masks([torch.ones(3)], 4), r"kept"),
    ("hard-concrete-keep-1", lambda: HardConcreteGate(torch.Size([3]), keep=1.0), r"keep"),
]


def add_config_cases() -> None:
    quick = {"k-string", "zero-motif-k1", "s-3-padding", "modules-to-save-string", "seed-2^63"}
    for name, values, expect in CONFIG_CASES:
        kwargs = {
            "kmeans_iters": 1,
            **({"k": 12, "s": 4} if "k" not in values and "capacity" not in values else {"s": 4}),
            **values,
        }
        add(
            "config",
            name,
            functools.partial(
                lambda tmp, kw, e: convert_save_load(tmp, lambda: MoMosConfig(**kw), e), kw=kwargs, e=expect
            ),
            quick=name in quick,
        )
    ok = dict(k=12, s=4, kmeans_iters=1)
    for name, field, value, expect in [  # a validated config changed afterwards (dataclasses are mutable)
        ("mutated-k-0", "k", 0, r"\bk\b"),
        ("mutated-s-0", "s", 0, r"\bs\b"),
        ("mutated-scale-string", "scale", "no", r"scale"),
        ("mutated-k-string", "k", "12", r"\bk\b"),
        ("mutated-fit", "fit", "magic", "fit"),
    ]:
        add(
            "config",
            name,
            functools.partial(
                lambda tmp, f, val, e: convert_save_load(
                    tmp, lambda: MoMosConfig(**ok), e, mutate=lambda c: setattr(c, f, val)
                ),
                f=field,
                val=value,
                e=expect,
            ),
        )
    add(
        "config",
        "from-dict-not-a-dict",
        lambda tmp: convert_save_load(tmp, lambda: MoMosConfig.from_dict("k"), r"mapping|object|dict"),
    )
    add(
        "config",
        "from-json-garbage",
        lambda tmp: convert_save_load(tmp, lambda: MoMosConfig.from_json_string("{k: 1"), r"JSON|Expecting"),
    )
    add(
        "config",
        "from-pretrained-missing",
        lambda tmp: convert_save_load(tmp, lambda: MoMosConfig.from_pretrained(tmp / "nope"), r"momos_config.json"),
    )
    add(
        "config",
        "dtype-as-string",
        lambda tmp: convert_save_load(tmp, lambda: MoMosConfig(**ok), r"dtype", dtype="bfloat16"),
    )
    add(
        "config",
        "calibration-with-kmeans",
        lambda tmp: convert_save_load(
            tmp,
            lambda: MoMosConfig(**ok),
            r"calibration",
            calibration_data=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}],
        ),
    )
    add(
        "config",
        "calibration-empty",
        lambda tmp: convert_save_load(
            tmp, lambda: MoMosConfig(**ok, fit="data-aware"), r"calibration", calibration_data=[]
        ),
    )
    calibration_cases = [  # (name, calibration batches, regex of the refusal)
        ("calibration-float-ids", [{"input_ids": torch.ones(1, 4)}], r"input_ids must be a tensor of integer"),
        ("calibration-ids-beyond-vocabulary", [{"input_ids": torch.full((1, 4), 10**6)}], r"outside the model's voc"),
        ("calibration-negative-ids", [{"input_ids": -torch.ones(1, 4, dtype=torch.long)}], r"input_ids hold ids -1"),
        ("calibration-not-a-dict", [torch.ones(1, 4, dtype=torch.long)], r"not a dict of model inputs"),
    ]
    for name, batches, expect in calibration_cases:
        for sequential in (False, True):
            add(
                "config",
                f"{name}{'-sequential' if sequential else ''}",
                functools.partial(
                    lambda tmp, b, e, seq: convert_save_load(
                        tmp, lambda: MoMosConfig(**ok, fit="data-aware"), e, calibration_data=b, sequential=seq
                    ),
                    b=batches,
                    e=expect,
                    seq=sequential,
                ),
            )
    add("config", "calibration-nan-activations", nan_activations_case)
    add("config", "resume-over-user-block-file", resume_over_user_file_case)
    add("config", "nan-weights", nan_weights_case)
    add(
        "config",
        "gpt2-tied-head",
        lambda tmp: convert_save_load(
            tmp, lambda: MoMosConfig(k=16, s=4, kmeans_iters=1, target_modules=["lm_head"]), r"tied", arch="gpt2"
        ),
    )
    add("config", "overflowing-fp16-motifs", overflow_case)
    add("config", "overflowing-fp16-cast", lambda tmp: overflow_case(tmp, dtype=torch.float16))
    add("config", "overflowing-fp16-cast-kept-embedding", lambda tmp: overflow_case(tmp, "embed", dtype=torch.float16))
    add("config", "overflowing-fp16-cast-motifs-only", lambda tmp: overflow_case(tmp, "up_proj", dtype=torch.float16))
    add(
        "config",
        "model-is-not-a-module",
        lambda tmp: (
            attempt(lambda: get_momos_model(None, MoMosConfig(**ok)), r"model|Module")[0] or ("wrong", "accepted None")
        ),
    )
    add("config", "convert-twice-other-settings", lambda tmp: twice_case(dict(k=8)))
    add("config", "convert-twice-same-settings", lambda tmp: twice_case({}))
    add(
        "config",
        "wrap-a-momos-model",
        lambda tmp: (
            attempt(lambda: get_momos_model(converted(), MoMosConfig(**ok)), r"already")[0] or ("wrong", "accepted")
        ),
    )
    for name, call, expect in TRAINING_ARGUMENT_CASES:
        add("config", name, lambda tmp, c=call, e=expect: attempt(c, e)[0] or ("wrong", "accepted"))
    add("config", "kept-for-bits-near-full-density", kept_near_full_density_case)


def kept_near_full_density_case(tmp: Path) -> Verdict:
    v, kept = attempt(lambda: kept_for_bits(1000, 1000, 1))
    if v:
        return v
    return ("correct", "all 1000 kept in 1000 bits") if kept == 1000 else ("wrong", f"{kept} kept, 1000 fit")


def nan_activations_case(tmp: Path) -> Verdict:
    """A NaN in a norm weight (not a target): the layers after it see NaN inputs in calibration."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    config = MoMosConfig(k=12, s=4, kmeans_iters=1, fit="data-aware")
    calibration = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    v, _ = attempt(lambda: get_momos_model(model, config, calibration), r"calibration inputs of model\.layers\.0\.")
    if v is None:
        return "wrong", "calibrated on NaN activations without complaint"
    return v if untouched(model) else worst(v, ("wrong", "refused but left the model converted"))


def resume_over_user_file_case(tmp: Path) -> Verdict:
    """A user's own file named like a saved block in the resume folder: refused, never overwritten."""
    folder = tmp / "resume"
    folder.mkdir()
    mine = folder / "block-0.safetensors"
    mine.write_bytes(b"the user's own file")
    v = convert_save_load(
        tmp,
        lambda: MoMosConfig(k=12, s=4, kmeans_iters=1, fit="data-aware"),
        r"did not write",
        calibration_data=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}],
        sequential=True,
        resume_folder=str(folder),
    )
    if mine.read_bytes() != b"the user's own file":
        return worst(v, ("lost", "the user's block-0.safetensors was overwritten"))
    return v


def nan_weights_case(tmp: Path) -> Verdict:
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    v, _ = attempt(lambda: get_momos_model(model, MoMosConfig(k=12, s=4, kmeans_iters=1)), r"NaN")
    return (
        (v if untouched(model) else worst(v, ("wrong", "left the model converted")))
        if v
        else ("wrong", "NaN weights converted")
    )


def overflow_case(tmp: Path, scaled: str = "", dtype: Optional[torch.dtype] = None) -> Verdict:
    """Parameters (those whose names contain `scaled`) finite in float32 but not in float16, converted with
    float16 motifs, or cast to `dtype` after the conversion."""
    model = tiny("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if scaled in name:
                p.mul_(1e8)
    config = MoMosConfig(k=12, s=4, kmeans_iters=1, motif_dtype=None if dtype else "float16")
    v, mm = attempt(lambda: get_momos_model(model, config, dtype=dtype), r"overflow")
    if v:
        return v if untouched(model) else worst(v, ("wrong", "left the model converted"))
    return ("correct", "fitted") if torch.isfinite(outputs(mm)).all() else ("wrong", "inf motifs accepted")


def twice_case(change: dict) -> Verdict:
    mm = converted()
    before = outputs(mm)
    settings = {"kmeans_iters": 1, "seed": 0, **SETTINGS["llama"], **change}
    v, again = attempt(lambda: get_momos_model(mm.base_model, MoMosConfig(**settings)), r"other settings")
    if v:
        return v
    if change:
        return "wrong", "converting again with other settings was accepted (mislabelled layers)"
    return ("correct", "wrapped as it is") if torch.equal(outputs(again), before) else ("wrong", "outputs changed")


# 2. loads ------------------------------------------------------------------------------------------------


def load_case(tmp: Path, base_name: str, mutate: Callable[[Path], None], expect: Optional[str], kind: str) -> Verdict:
    """Mutate a copy of a base checkpoint, load it one way; a load must refuse naming the problem or give
    exactly the saved model's outputs and settings (`momos-hf info`: exactly the base's text)."""
    arch = BASE_ARCH[base_name]
    folder = copy_base(base_name, tmp)
    mutate(folder)
    if kind == "info":
        code, out, err = cli_inprocess(["info", folder])
        v = cli_verdict(subprocess.CompletedProcess([], code, out, err), "momos-hf: error:", expect)
        if v:
            return v
        diff = [l for l in info_claims(out) if l not in info_claims(base_info(base_name))]
        if not diff:
            return "correct", "info printed the saved checkpoint's settings and layers"
        return "wrong", f"info reported settings that are not the saved checkpoint's: {line(diff, 200)}"
    load = (
        (lambda: AUTO[arch].from_pretrained(folder))
        if kind == "auto"
        else (lambda: MoMosModel.from_pretrained(folder))
    )
    v, model = attempt(load, expect)
    if v:
        return v
    got = outputs(model, arch)
    if not torch.isfinite(got).all():
        return "wrong", "loaded without complaint; outputs hold NaN/inf"
    if not torch.equal(got, reference(base_name)):
        return (
            "wrong",
            "loaded without complaint; outputs differ from the saved model's by "
            f"{float((got - reference(base_name)).abs().max()):.3g}",
        )
    recorded = read_json(base(base_name) / "config.json")["quantization_config"]["momos_config"]
    loaded = model.config.quantization_config.momos_config
    if loaded != recorded:
        diff = {
            k: (recorded.get(k), loaded.get(k))
            for k in recorded.keys() | loaded.keys()
            if recorded.get(k) != loaded.get(k)
        }
        return "wrong", f"loaded with a mislabelled momos_config (fitted, claimed): {diff}"
    return "correct", "loaded with the saved model's outputs"


def info_claims(text: str) -> list:
    """What `momos-hf info` claims about the checkpoint's settings and layers (architecture, settings, layer
    and dictionary counts, dtype of the other weights, bits per weight); byte counts, which follow the files
    as they are, are left out."""
    text = re.sub(r"[\d,]+ other parameters", "N other parameters", text)
    return [l for l in text.splitlines() if not l.startswith(("checkpoint", "MoMos layers on disk"))]


def escape_index(folder: Path, absolute: bool) -> None:
    """A folder next to an intact copy of the checkpoint (`good`): its index sends the first shard into
    `good` (by ../ or an absolute path) and another shard of its own holds doubled weights; config.json is
    the good one's. Verification must not be steered to `good` while `folder`'s shards are loaded."""
    good = folder.parent / "good"
    shutil.copytree(base("sharded"), good)
    first, other = shard(folder, 0), shard(folder, 1)
    path = folder / other
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file({k: v * 2 if v.is_floating_point() else v for k, v in load_file(path).items()}, path, metadata=metadata)
    iedit(lambda i, d: remap(i, d, str(good / first) if absolute else f"../good/{first}"))(folder)


def trunc(at: Callable[[int, int], int]) -> Callable:
    def mutate(folder: Path) -> None:
        path = weights_path(folder)
        data = path.read_bytes()
        path.write_bytes(data[: at(len(data), 8 + struct.unpack("<Q", data[:8])[0])])

    return mutate


def flip(at: Callable[[int, int], int], mask: int = 0xFF) -> Callable:
    def mutate(folder: Path) -> None:
        path = weights_path(folder)
        data = bytearray(path.read_bytes())
        data[at(len(data), 8 + struct.unpack("<Q", data[:8])[0])] ^= mask
        path.write_bytes(bytes(data))

    return mutate


def qedit(edit: Callable[[dict], object], forge: bool = False) -> Callable:
    """Edit quantization_config (and re-sign the checkpoint when `forge`)."""

    def mutate(folder: Path) -> None:
        config = read_json(folder / "config.json")
        edit(config["quantization_config"])
        write_json(folder / "config.json", config)
        if forge:
            resign(folder)

    return mutate


def cedit(edit: Callable[[dict], object]) -> Callable:
    def mutate(folder: Path) -> None:
        config = read_json(folder / "config.json")
        edit(config)
        write_json(folder / "config.json", config)

    return mutate


def replace(name: str, content=None, kind: str = "bytes") -> Callable:
    """Replace file `name` (or the weight file, `name=None`): bytes, a folder, a FIFO, a link, or nothing."""

    def mutate(folder: Path) -> None:
        path = folder / name if name else weights_path(folder)
        original = path.read_bytes() if path.is_file() else b""
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        if kind == "bytes":
            path.write_bytes(content)
        elif kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "link-out":
            outside = folder.parent / f"outside-{path.name}"
            outside.write_bytes(original)
            path.symlink_to(outside)
        elif kind == "rename":
            (folder / content).write_bytes(original)

    return mutate


def tedit(edit: Callable[[dict], object]) -> Callable:
    """Rewrite the tensors of the (single) weight file, then re-sign."""

    def mutate(folder: Path) -> None:
        path = weights_path(folder)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata=metadata)
        resign(folder)

    return mutate


def hedit(edit: Callable[[dict], object], checksum: bool) -> Callable:
    """Hand-edit the safetensors header JSON (data kept); `checksum`: record the new sha256 in config.json."""

    def mutate(folder: Path) -> None:
        path = weights_path(folder)
        header, data = split_file(path.read_bytes())
        edit(header)
        raw = pad8(json.dumps(header).encode())
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        if checksum:
            fix_checksum(folder, path.name)

    return mutate


def iedit(edit: Callable[[dict, Path], object], forge: bool = False) -> Callable:
    """Edit the shard index of the sharded base (its weight_map), optionally re-signing."""

    def mutate(folder: Path) -> None:
        index_path = weights_path(folder)
        index = read_json(index_path)
        edit(index, folder)
        write_json(index_path, index)
        if forge:
            resign(folder)

    return mutate


def forged_index_entry(folder: Path, kind: str) -> None:
    """The index points a shard at a folder or FIFO, with checksums that cover it and the index."""
    (os.mkfifo if kind == "fifo" else os.mkdir)(folder / f"{kind}.safetensors")
    iedit(lambda i, d: remap(i, d, f"{kind}.safetensors"))(folder)
    qedit(lambda q: q["checksums"].update({f"{kind}.safetensors": "0" * 64}))(folder)
    fix_checksum(folder, weights_path(folder).name)


def shard(folder: Path, i: int) -> str:
    return sorted(set(read_json(weights_path(folder))["weight_map"].values()))[i]


def remap(index: dict, folder: Path, new: str, i: int = 0) -> None:
    first = shard(folder, i)
    index["weight_map"] = {k: (new if v == first else v) for k, v in index["weight_map"].items()}


def nan_at(name: str, value=float("nan")) -> Callable:
    return lambda t: t[name].view(-1).__setitem__(0, value)


L0 = "model.layers.0.self_attn.q_proj"
L1 = "model.layers.1.mlp.down_proj"
WF = r"model\.safetensors"
EDITED = r"not the one .* was saved with|sha256|checksum|layer spec|lacks|does not list|contradicts momos_config"

LOAD_CASES = [  # (name, base, mutation, regex a refusal must match)
    *[
        (f"truncate-{n}", "llama", trunc(at), WF + r".*(truncated|corrupt)")
        for n, at in [
            ("0", lambda s, h: 0),
            ("4", lambda s, h: 4),
            ("8", lambda s, h: 8),
            ("header-mid", lambda s, h: h // 2),
            ("header-end", lambda s, h: h),
            ("data-mid", lambda s, h: (s + h) // 2),
            ("last-byte", lambda s, h: s - 1),
        ]
    ],
    *[
        (f"flip-{n}", "llama", flip(at, m), WF + r".*(truncated|corrupt)")
        for n, at, m in [
            ("header-length-low", lambda s, h: 0, 0x01),
            ("header-length-high", lambda s, h: 7, 0x80),
            ("header-json", lambda s, h: h // 2, 0x01),
            ("header-padding", lambda s, h: h - 1, 0x01),
            ("data-first", lambda s, h: h, 0xFF),
            ("data-mid", lambda s, h: (s + h) // 2, 0x01),
            ("data-last", lambda s, h: s - 1, 0x80),
        ]
    ],
    *[
        (f"{arch}-{n}", arch, mutation, WF + r".*(truncated|corrupt)")
        for arch in ("gpt2", "bert", "t5")
        for n, mutation in [
            ("truncate-mid", trunc(lambda s, h: (s + h) // 2)),
            ("flip-last", flip(lambda s, h: s - 1)),
        ]
    ],
    ("weights-deleted", "llama", replace(None, kind="none"), r"missing weight file model\.safetensors"),
    ("weights-renamed", "llama", replace(None, "model.bak", kind="rename"), r"missing weight file model\.safetensors"),
    ("weights-empty", "llama", replace(None, b""), WF + r".*truncated"),
    ("weights-directory", "llama", replace(None, kind="dir"), WF + r".*not a regular file"),
    ("weights-link-out-same-bytes", "llama", replace(None, kind="link-out"), None),
    (
        "weights-from-dense-model",
        "llama",
        lambda d: shutil.copy(base("dense") / "model.safetensors", weights_path(d)),
        EDITED,
    ),
    ("generation-config-deleted", "llama", replace("generation_config.json", kind="none"), None),
    ("config-deleted", "llama", replace("config.json", kind="none"), r"config\.json"),
    ("config-empty", "llama", replace("config.json", b""), r"config\.json.*(JSON|empty)|JSON"),
    ("config-not-json", "llama", replace("config.json", b"{not json"), r"config\.json.*JSON|JSON"),
    ("config-null", "llama", replace("config.json", b"null"), r"config\.json|not a MoMos"),
    ("config-list", "llama", replace("config.json", b"[1, 2]"), r"config\.json|not a MoMos"),
    ("config-binary", "llama", replace("config.json", b"\xff\xfe\x00garbage"), r"config\.json|JSON|UTF"),
    ("config-directory", "llama", replace("config.json", kind="dir"), r"config\.json"),
    ("config-dtype-edited", "llama", cedit(lambda c: c.update(dtype="float16")), r"dtype|edited|digest"),
    ("config-hidden-act-edited", "llama", cedit(lambda c: c.update(hidden_act="relu")), r"edited|digest|hidden_act"),
    (
        "config-architectures-edited",
        "llama",
        cedit(lambda c: c.update(architectures=["AutoTokenizer"])),
        r"architectures|AutoTokenizer",
    ),
    (
        "config-load-marker-edited",
        "llama",
        cedit(lambda c: c.update(transformers_weights="../../etc/passwd")),
        r"transformers_weights",
    ),
    ("qc-removed", "llama", cedit(lambda c: c.pop("quantization_config")), r"quantization_config"),
    ("qc-string", "llama", cedit(lambda c: c.update(quantization_config="momos")), r"quantization_config"),
    ("qc-list", "llama", cedit(lambda c: c.update(quantization_config=[1, 2])), r"quantization_config"),
    ("qc-unknown-field", "llama", qedit(lambda q: q.update(colour="red")), r"colour"),
    ("qc-quant-method-gptq", "llama", qedit(lambda q: q.update(quant_method="gptq")), r"quant_method|momos|gptq"),
    ("qc-quant-method-removed", "llama", qedit(lambda q: q.pop("quant_method")), r"quant_method"),
    ("qc-format-version-1", "llama", qedit(lambda q: q.update(format_version=1)), r"format_version 1"),
    ("qc-format-version-4", "llama", qedit(lambda q: q.update(format_version=4)), r"format_version 4.*upgrade"),
    ("qc-format-version-string", "llama", qedit(lambda q: q.update(format_version="2")), r"format_version"),
    ("qc-format-version-float", "llama", qedit(lambda q: q.update(format_version=2.0)), r"format_version"),
    ("qc-format-version-bool", "llama", qedit(lambda q: q.update(format_version=True)), r"format_version"),
    ("qc-format-version-removed", "llama", qedit(lambda q: q.pop("format_version")), r"format_version"),
    ("qc-base-model-int", "llama", qedit(lambda q: q.update(base_model=5)), r"base_model"),
    ("qc-momos-config-removed", "llama", qedit(lambda q: q.pop("momos_config")), r"momos_config"),
    ("qc-momos-config-k", "llama", qedit(lambda q: q["momos_config"].update(k=64)), EDITED),
    ("qc-momos-config-scale", "llama", qedit(lambda q: q["momos_config"].update(scale=False)), EDITED),
    (
        "qc-momos-config-zero-motif-string",
        "llama",
        qedit(lambda q: q["momos_config"].update(zero_motif="no")),
        r"zero_motif",
    ),
    ("qc-momos-config-unknown", "llama", qedit(lambda q: q["momos_config"].update(colour=1)), r"colour"),
    ("qc-layers-empty", "llama", qedit(lambda q: q.update(layers={})), r"layers"),
    ("qc-layer-dropped", "llama", qedit(lambda q: q["layers"].pop(L1)), EDITED + "|" + L1),
    ("qc-layer-owner", "llama", qedit(lambda q: q["layers"][L1].update(motifs=L0)), EDITED + r"|motifs|dictionary"),
    (
        "qc-layer-owner-unknown",
        "llama",
        qedit(lambda q: q["layers"][L1].update(motifs="model.nowhere")),
        r"motifs|dictionary",
    ),
    ("qc-layer-k-edited", "llama", qedit(lambda q: q["layers"][L1].update(k=13)), EDITED + r"|\bk\b"),
    ("qc-layer-k-string", "llama", qedit(lambda q: q["layers"][L1].update(k="12")), r"\.k must"),
    ("qc-layer-s-0", "llama", qedit(lambda q: q["layers"][L1].update(s=0)), r"\.s must"),
    ("qc-layer-scale-string", "llama", qedit(lambda q: q["layers"][L1].update(scale="yes")), r"\.scale must"),
    (
        "qc-layer-in-features",
        "llama",
        qedit(lambda q: q["layers"][L1].update(in_features=64)),
        EDITED + r"|in_features",
    ),
    ("qc-layer-unknown-field", "llama", qedit(lambda q: q["layers"][L1].update(colour=1)), r"colour"),
    (
        "qc-layer-name-traversal",
        "llama",
        qedit(lambda q: q["layers"].update({"../../x": q["layers"][L1]})),
        r"module name",
    ),
    ("qc-layer-fit-error-nan", "llama", qedit(lambda q: q["layers"][L1].update(fit_error=float("nan"))), r"fit_error"),
    ("qc-weights-traversal", "llama", qedit(lambda q: q.update(weights="../model.safetensors")), r"weights"),
    (
        "qc-weights-absolute",
        "llama",
        lambda d: qedit(lambda q: q.update(weights=str(d / "model.safetensors")))(d),
        r"weights",
    ),
    ("qc-weights-hidden", "llama", qedit(lambda q: q.update(weights=".model.safetensors")), r"weights"),
    ("qc-weights-tokenizer", "llama", qedit(lambda q: q.update(weights="tokenizer.json")), r"weights"),
    (
        "qc-weights-removed",
        "llama",
        qedit(lambda q: q.pop("weights")),
        r"names no weight|quantization_config\.weights",
    ),
    (
        "qc-weights-null",
        "llama",
        qedit(lambda q: q.update(weights=None)),
        r"names no weight|quantization_config\.weights",
    ),
    (
        "qc-weights-other-file",
        "llama",
        lambda d: (
            shutil.copy(base("dense") / "model.safetensors", d / "model_dense.safetensors"),
            qedit(lambda q: q.update(weights="model_dense.safetensors"))(d),
        ),
        EDITED + "|model_dense",
    ),
    ("qc-checksums-removed", "llama", qedit(lambda q: q.pop("checksums")), r"checksum"),
    ("qc-checksums-empty", "llama", qedit(lambda q: q.update(checksums={})), r"checksum"),
    (
        "qc-checksum-edited",
        "llama",
        qedit(lambda q: q["checksums"].update({"model.safetensors": "0" * 64})),
        r"sha256",
    ),
    (
        "qc-checksum-uppercase",
        "llama",
        qedit(lambda q: q["checksums"].update({"model.safetensors": q["checksums"]["model.safetensors"].upper()})),
        r"checksum",
    ),
    ("qc-checksum-int", "llama", qedit(lambda q: q["checksums"].update({"model.safetensors": 5})), r"checksum"),
    ("qc-checksum-traversal", "llama", qedit(lambda q: q["checksums"].update({"../x": "0" * 64})), r"checksum"),
    # a forger re-signs: digest and checksums recomputed, so only the structural checks remain
    ("forged-layer-k", "llama", qedit(lambda q: q["layers"][L1].update(k=13), forge=True), r"\[13, 4\]|\bk\b"),
    (
        "forged-layer-in-features",
        "llama",
        qedit(lambda q: q["layers"][L1].update(in_features=64), forge=True),
        r"mosaic_packed|in_features|64",
    ),
    ("forged-layer-scale-off", "llama", qedit(lambda q: q["layers"][L1].update(scale=False), forge=True), r"scale"),
    (
        "forged-layer-conv1d",
        "llama",
        qedit(lambda q: q["layers"][L0].update(conv1d=True), forge=True),
        r"conv1d|Conv1D",
    ),
    ("forged-layer-dropped", "llama", qedit(lambda q: q["layers"].pop(L1), forge=True), L1),
    ("forged-momos-config-k", "llama", qedit(lambda q: q["momos_config"].update(k=64), forge=True), r"\bk\b"),
    ("forged-momos-config-s", "llama", qedit(lambda q: q["momos_config"].update(s=8), forge=True), r"\bs\b"),
    (
        "forged-momos-config-scale",
        "llama",
        qedit(lambda q: q["momos_config"].update(scale=False), forge=True),
        r"scale",
    ),
    (
        "forged-momos-config-zero-motif",
        "llama",
        qedit(lambda q: q["momos_config"].update(zero_motif=True), forge=True),
        r"zero_motif",
    ),
    (
        "forged-momos-config-targets",
        "llama",
        qedit(lambda q: q["momos_config"].update(target_modules=["nowhere"]), forge=True),
        r"target_modules",
    ),
    (  # version 1 files carry no digest: a later checkpoint relabelled 1 must not escape the digest check
        "forged-format-version-1",
        "llama",
        qedit(
            lambda q: (q.update(format_version=1), [spec.pop("dictionary") for spec in q["layers"].values()]),
            forge=True,
        ),
        r"format_version 1 but .* later momos-hf",
    ),
    ("forged-qbit-step-huge", "qbit", tedit(lambda t: t[f"{L0}.motif_step"].fill_(1e37)), r"overflow"),
    ("forged-qbit-step-negative", "qbit", tedit(lambda t: t[f"{L0}.motif_step"].fill_(-0.5)), r"step"),
    ("forged-qbit-step-nan", "qbit", tedit(lambda t: t[f"{L0}.motif_step"].fill_(float("nan"))), r"step"),
    (
        "forged-qbit-bits-contradict",
        "qbit",
        qedit(lambda q: [spec["dictionary"].update(q_bits=8) for spec in q["layers"].values()], forge=True),
        r"bits per motif value|motif_bits",
    ),
    ("forged-drop-motifs", "llama", tedit(lambda t: t.pop(f"{L0}.motifs")), rf"{L0}\.motifs"),
    ("forged-drop-mosaic", "llama", tedit(lambda t: t.pop(f"{L0}.mosaic_packed")), rf"{L0}\.mosaic_packed"),
    ("forged-drop-scale", "llama", tedit(lambda t: t.pop(f"{L0}.scale")), rf"{L0}\.scale"),
    (
        "forged-motifs-int64",
        "llama",
        tedit(lambda t: t.update({f"{L0}.motifs": t[f"{L0}.motifs"].long()})),
        r"motifs is I64",
    ),
    (
        "forged-motifs-shape",
        "llama",
        tedit(lambda t: t.update({f"{L0}.motifs": torch.zeros(13, 4)})),
        r"motifs is F32 \[13, 4\]",
    ),
    ("forged-motifs-nan", "llama", tedit(nan_at(f"{L0}.motifs")), r"NaN"),
    ("forged-scale-inf", "llama", tedit(nan_at(f"{L0}.scale", float("inf"))), r"NaN or infinite"),
    (
        "forged-scale-float64",
        "llama",
        tedit(lambda t: t.update({f"{L0}.scale": t[f"{L0}.scale"].double()})),
        r"scale is F64",
    ),
    (
        "forged-mosaic-index-beyond-k",
        "llama",
        tedit(lambda t: t[f"{L0}.mosaic_packed"].__setitem__(0, 255)),
        r"index 15 .*k=12",
    ),
    (
        "forged-mosaic-int8",
        "llama",
        tedit(lambda t: t.update({f"{L0}.mosaic_packed": t[f"{L0}.mosaic_packed"].to(torch.int8)})),
        r"mosaic_packed is I8",
    ),
    (
        "forged-extra-mosaic",
        "llama",
        tedit(lambda t: t.update({"lm_head.mosaic_packed": torch.zeros(4, dtype=torch.uint8)})),
        r"lm_head",
    ),
    ("forged-embedding-nan", "llama", tedit(nan_at("model.embed_tokens.weight")), r"NaN|embed_tokens"),
    ("forged-embedding-dropped", "llama", tedit(lambda t: t.pop("model.embed_tokens.weight")), r"embed_tokens"),
    ("forged-norm-shape", "llama", tedit(lambda t: t.update({"model.norm.weight": torch.ones(31)})), r"norm"),
    (
        "forged-no-digest",
        "llama",
        lambda d: (save_file(load_file(weights_path(d)), weights_path(d)), fix_checksum(d, "model.safetensors")),
        EDITED,
    ),
    (
        "header-offsets-strings",
        "llama",
        hedit(
            lambda h: [
                v.update(data_offsets=[str(x) for x in v["data_offsets"]]) for k, v in h.items() if k != "__metadata__"
            ],
            False,
        ),
        WF + r".*(header|corrupt)",
    ),
    (
        "header-metadata-string",
        "llama",
        hedit(lambda h: h.update(__metadata__="x"), True),
        WF + r".*(header|metadata|corrupt)",
    ),
    ("header-metadata-removed", "llama", hedit(lambda h: h.pop("__metadata__"), True), EDITED),
    (
        "header-shape-lies",
        "llama",
        hedit(lambda h: h[f"{L0}.motifs"].update(shape=[12, 8]), True),
        r"motifs|shape|corrupt",
    ),
    (
        "header-offsets-overlap",
        "llama",
        hedit(
            lambda h: h[f"{L0}.motifs"].update(
                data_offsets=[0, h[f"{L0}.motifs"]["data_offsets"][1] - h[f"{L0}.motifs"]["data_offsets"][0]]
            ),
            True,
        ),
        WF + r".*(corrupt|overlap|offset)",
    ),
    ("shard-deleted", "sharded", lambda d: (d / shard(d, 1)).unlink(), r"missing weight file model-0000"),
    (
        "shard-truncated",
        "sharded",
        lambda d: (d / shard(d, 1)).write_bytes((d / shard(d, 1)).read_bytes()[:-7]),
        r"model-0000.*(truncated|corrupt)",
    ),
    (
        "shard-flipped",
        "sharded",
        lambda d: (d / shard(d, 0)).write_bytes((d / shard(d, 0)).read_bytes()[:-1] + b"\x01"),
        r"model-0000.*(corrupt|sha256)",
    ),
    ("index-deleted", "sharded", lambda d: weights_path(d).unlink(), r"index\.json"),
    ("index-not-json", "sharded", lambda d: weights_path(d).write_text("{nope"), r"index\.json"),
    ("index-list", "sharded", lambda d: weights_path(d).write_text("[]"), r"index\.json"),
    (
        "index-no-weight-map",
        "sharded",
        iedit(lambda i, d: i.pop("weight_map")),
        r"index\.json.*weight_map|index\.json",
    ),
    (
        "index-traversal",
        "sharded",
        iedit(
            lambda i, d: (
                shutil.copy(d / shard(d, 0), d.parent / "outside.safetensors"),
                remap(i, d, "../outside.safetensors"),
            )
        ),
        r"not a safetensors file inside|not all in its folder|points outside",
    ),
    (
        "index-absolute",
        "sharded",
        iedit(lambda i, d: remap(i, d, str(d / shard(d, 0)))),
        r"not a safetensors file inside|not all in its folder|points outside",
    ),
    (
        "index-directory",
        "sharded",
        iedit(lambda i, d: ((d / "dir.safetensors").mkdir(), remap(i, d, "dir.safetensors"))),
        r"checksum|not a regular file",
    ),
    (
        "index-entry-dropped",
        "sharded",
        iedit(lambda i, d: i["weight_map"].pop(next(iter(i["weight_map"])))),
        r"sha256|index",
    ),
    ("forged-index-directory", "sharded", lambda d: forged_index_entry(d, "dir"), r"not a regular file"),
    (
        "index-escape-to-sibling-relative",
        "sharded",
        lambda d: escape_index(d, absolute=False),
        r"not a safetensors file inside|not all in its folder|points outside|sha256",
    ),
    (
        "index-escape-to-sibling-absolute",
        "sharded",
        lambda d: escape_index(d, absolute=True),
        r"not a safetensors file inside|not all in its folder|points outside|sha256",
    ),
    (
        "forged-index-wrong-shard",
        "sharded",
        iedit(
            lambda i, d: i["weight_map"].update(
                {k: shard(d, 1) for k in list(i["weight_map"])[:1] if i["weight_map"][k] != shard(d, 1)}
            ),
            forge=True,
        ),
        r"shard|missing|lacks|not found",
    ),
]
ISOLATED_LOAD_CASES = [  # may block in open(): run in a subprocess
    (
        "index-fifo",
        "sharded",
        iedit(lambda i, d: (os.mkfifo(d / "fifo.safetensors"), remap(i, d, "fifo.safetensors"))),
        r"checksum|not a regular file",
    ),
    ("forged-index-fifo", "sharded", lambda d: forged_index_entry(d, "fifo"), r"not a regular file"),
    ("weights-fifo", "llama", replace(None, kind="fifo"), r"not a regular file"),
    ("config-fifo", "llama", replace("config.json", kind="fifo"), r"config\.json"),
]
QUICK_LOADS = {
    "truncate-header-mid/auto",
    "flip-data-mid/momos",
    "qc-checksums-removed/info",
    "forged-motifs-nan/auto",
    "index-traversal/momos",
    "qc-string/momos",
    "forged-momos-config-k/info",
    "qc-momos-config-k/info",
}


def add_load_cases() -> None:
    for table, isolate in ((LOAD_CASES, False), (ISOLATED_LOAD_CASES, True)):
        for name, base_name, mutation, expect in table:
            for kind in ("auto", "momos", "info"):
                if name == "config-fifo" and kind != "info":
                    continue  # Transformers' own config reader would block on it: not momos-hf's to guard
                add(
                    "load",
                    f"{name}/{kind}",
                    functools.partial(load_case, base_name=base_name, mutate=mutation, expect=expect, kind=kind),
                    isolate=isolate,
                    quick=f"{name}/{kind}" in QUICK_LOADS,
                )


# 3. saves ------------------------------------------------------------------------------------------------


def saved_as(folder: Path, model, files: dict) -> Verdict:
    """After a save that returned: the user's files intact, no leftovers, and the folder loads as `model`."""
    v = damaged(folder, files)
    if v:
        return v
    v, loaded = attempt(lambda: MoMosModel.from_pretrained(folder))
    if v:
        return "wrong", f"the save returned but the folder does not load: {v[1]}"
    if not torch.equal(outputs(loaded), outputs(model)):
        return "wrong", "the folder loads with other outputs than the saved model"
    return (
        ("wrong", f"save left {leftovers(folder)}") if leftovers(folder) else ("correct", "saved, user files intact")
    )


def refused_intact(
    folder: Path, call: Callable, expect: str, before: Optional[dict] = None, accept: tuple = (ValueError, TypeError)
) -> Verdict:
    """A save that must refuse (or fail on an injected fault) and leave the folder exactly as it was."""
    before = snapshot(folder) if before is None and folder.is_dir() else (before or {})
    v, _ = attempt(call, expect, accept)
    return worst(v or ("wrong", "the save was not refused"), changed(before, folder) if before else None)


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def save_dot(tmp: Path, sub: bool) -> Verdict:
    work = tmp / "work"
    (work / "sub").mkdir(parents=True)
    mine = plant(work)
    first, second = converted(seed=1), converted(seed=2)
    with chdir(work / "sub" if sub else work):
        v = attempt(
            lambda: (first.save_pretrained(".." if sub else "."), second.save_pretrained(".." if sub else "."))
        )[0]
    return v or saved_as(work, second, mine)


def save_link(tmp: Path, dangling: bool) -> Verdict:
    real, link = tmp / "real", tmp / "link"
    if not dangling:
        real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    mine = {} if dangling else plant(real)
    mm = converted(seed=1)
    v = attempt(lambda: (mm.save_pretrained(link), mm.save_pretrained(link)), r"link|" + re.escape(str(link)))[0]
    if v:
        return v
    if not link.is_symlink():
        return "lost", "the link was replaced by a folder"
    return saved_as(real, mm, mine)


def save_into_file(tmp: Path, below: bool) -> Verdict:
    (tmp / "file.txt").write_text("mine")
    target = tmp / "file.txt" / "sub" if below else tmp / "file.txt"
    v, _ = attempt(lambda: converted().save_pretrained(target), r"file|folder|director")
    return worst(v or ("wrong", "saved"), damaged(tmp, {"file.txt": b"mine"}))


def save_over_dense(tmp: Path) -> Verdict:
    folder = tmp / "dense"
    shutil.copytree(base("dense"), folder)
    plant(folder, {"README.md": b"mine"})
    return refused_intact(folder, lambda: converted().save_pretrained(folder), r"not a MoMos checkpoint")


def save_next_to_user_weights(tmp: Path) -> Verdict:
    folder = tmp / "ckpt"
    folder.mkdir()
    mine = plant(folder, {**MINE, "model.safetensors": b"my dense model"})
    a, b = converted(seed=1), converted(seed=2)
    v = attempt(
        lambda: (a.save_pretrained(folder), b.save_pretrained(folder, max_shard_size=6000), a.save_pretrained(folder))
    )[0]
    if v:
        return v
    owned = {p.name for p in folder.iterdir() if "safetensors" in p.name} - set(mine)
    q = read_json(folder / "config.json")["quantization_config"]
    expected = {q["weights"], *weight_file_names(folder, q["weights"])}
    return worst(
        saved_as(folder, a, mine),
        None if owned == expected else ("wrong", f"stale weight files {sorted(owned - expected)}"),
    )


def save_fault(
    tmp: Path,
    target: str,
    when: Callable[[tuple], bool],
    exc=Injected("injected fault: disk full"),
    expect: str = "injected|power cut",
    accept: tuple = (Injected, PowerCut, ckpt.SaveError),  # a system error comes back naming the file
) -> Verdict:
    """A save over a good checkpoint (with tokenizer and user files) that fails in `checkpoint.<target>`
    when `when(args)`: the folder must be exactly as before (a system error must name the file and its cause)."""
    folder = copy_base("A", tmp)
    plant(folder)
    before = snapshot(folder)
    other = MoMosModel.from_pretrained(base("B"))
    owner = ckpt.os if target == "replace" else ckpt
    real = getattr(owner, target)

    def faulty(*args, **kwargs):
        if when(args):
            raise exc
        return real(*args, **kwargs)

    with patched(owner, target, faulty):
        return refused_intact(
            folder,
            lambda: other.save_pretrained(folder, tokenizer=tokenizer_for("B"), max_shard_size=6000),
            expect,
            before,
            accept=accept,
        )


def save_bad_tokenizer(tmp: Path) -> Verdict:
    folder = copy_base("A", tmp)
    return refused_intact(
        folder, lambda: MoMosModel.from_pretrained(base("B")).save_pretrained(folder, tokenizer="byte"), r"tokenizer"
    )


def save_over_forged_checksums(tmp: Path) -> Verdict:
    """A checkpoint whose config.json also lists the user's README and notes among its checksums (the
    digest does not cover checksums): a save over it must not delete them."""
    folder = copy_base("llama", tmp)
    mine = plant(folder, {"README.md": b"my card", "notes.txt": b"mine"})
    qedit(lambda q: q["checksums"].update({n: ckpt.sha256_of(folder / n) for n in mine}))(folder)
    v, _ = attempt(lambda: MoMosModel.from_pretrained(folder))
    mm = converted(seed=3)
    v2 = attempt(lambda: mm.save_pretrained(folder), r"checksum")[0]
    return worst(v and ("wrong", f"the listed checkpoint no longer loads: {v[1]}"), v2, damaged(folder, mine))


def save_with_bad_journal(tmp: Path, journal: bytes, expect: str) -> Verdict:
    """A stale journal in the folder: the save may refuse or go ahead, but no user file may go."""
    folder = copy_base("llama", tmp)
    mine = plant(folder)
    (folder / ckpt.JOURNAL_NAME).write_bytes(journal)
    mm = converted(seed=3)
    v, _ = attempt(lambda: mm.save_pretrained(folder), expect)
    return worst(v, damaged(folder, mine)) if v else saved_as(folder, mm, mine)


def save_state_dict(tmp: Path, edit: Callable[[dict], None]) -> Verdict:
    """`save_pretrained(state_dict=...)` with a doctored state dict over a good checkpoint: refuse, or
    write a checkpoint that loads; writing an unloadable one replaces the good one."""
    folder = copy_base("llama", tmp)
    mm = converted(seed=3)
    state = dict(mm.state_dict())
    edit(state)
    v, _ = attempt(lambda: mm.save_pretrained(folder, state_dict=state), r"state_dict|motifs|NaN|missing")
    if v:
        return worst(v, changed(snapshot(copy_base("llama", tmp, "again")), folder))
    v, loaded = attempt(lambda: MoMosModel.from_pretrained(folder))
    if v:
        return "lost", f"accepted; the good checkpoint was replaced by one that does not load: {v[1]}"
    if not torch.equal(outputs(loaded), outputs(mm)):
        return "wrong", "accepted; the checkpoint written loads as another model (a weight missing from it is random)"
    return "correct", "saved a checkpoint that loads as the model"


def save_back_into_source(tmp: Path) -> Verdict:
    folder = copy_base("A", tmp)
    mine = plant(folder)
    mm = MoMosModel.from_pretrained(folder)
    v = attempt(lambda: mm.save_pretrained(folder, tokenizer=tokenizer_for("A")))[0]
    return v or worst(saved_as(folder, mm, mine), whole_checkpoint(folder))


SAVER = "--saver"


def saver_main(sources: list, target: str, seed: int, saves: int, delay: float) -> None:
    """A child that saves checkpoints `sources` (in turn) into `target` `saves` times, each rename slowed by
    a random delay so that kills land between them."""
    rng = random.Random(seed)
    real = ckpt.os.replace

    def slow_replace(src, dst):
        time.sleep(rng.uniform(0, delay))
        real(src, dst)

    ckpt.os.replace = slow_replace
    models = [(MoMosModel.from_pretrained(base(s)), tokenizer_for(s)) for s in sources]
    print("ready", flush=True)
    for i in range(saves):
        model, tok = models[i % len(models)]
        model.save_pretrained(target, tokenizer=tok, max_shard_size=6000 if i % 3 == 1 else "5GB")


def start_saver(sources: str, target: Path, seed: int, saves: int, delay: float = 0.03) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, __file__, SAVER, sources, str(target), str(seed), str(saves), str(delay), "--work", str(WORK)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def kill_trial(tmp: Path, trial: int) -> Verdict:
    """Kill -9 a process that saves A and B in turn into a folder holding A and the user's files, at a
    seeded random moment; the folder must hold A or B whole, and every user file."""
    target = copy_base("A", tmp, "target")
    mine = plant(target)
    rng = random.Random(1000 + trial)
    saver = start_saver("B,A", target, seed=trial, saves=200)
    try:
        if saver.stdout.readline().strip() != "ready":
            return "raw", f"saver did not start: {line(saver.stderr.read()[-500:])}"
        time.sleep(rng.uniform(0.05, 1.5))
    finally:
        saver.kill()
        saver.wait()
    interrupted = bool(leftovers(target))
    v = worst(damaged(target, mine), whole_checkpoint(target))
    if v[0] != "correct":
        return v
    v2 = attempt(lambda: MoMosModel.from_pretrained(base("A")).save_pretrained(target, tokenizer=tokenizer_for("A")))[
        0
    ]
    return worst(
        ("correct", f"{'interrupted mid-save; ' if interrupted else ''}whole afterwards"),
        v2,
        damaged(target, mine),
        whole_checkpoint(target, ("A",)),
        ("wrong", f"the next save left {leftovers(target)}") if leftovers(target) else None,
    )


def concurrent_savers(tmp: Path) -> Verdict:
    target = tmp / "target"
    target.mkdir()
    mine = plant(target)
    savers = [start_saver(s, target, seed=i, saves=5, delay=0.01) for i, s in enumerate(("A", "B"))]
    errors = []
    for saver in savers:
        try:
            _, err = saver.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            saver.kill()
            return "hang", "a concurrent saver did not finish"
        if saver.returncode:
            errors.append(line(err.strip().splitlines()[-1] if err.strip() else err))
    if errors:
        return "raw", f"a concurrent saver failed: {errors}"
    q = read_json(target / "config.json")["quantization_config"]
    weights = {p.name for p in target.iterdir() if "safetensors" in p.name} - set(mine)
    extra = weights - {q["weights"], *weight_file_names(target, q["weights"])}
    return worst(
        damaged(target, mine),
        whole_checkpoint(target),
        ("wrong", f"left {leftovers(target)} {sorted(extra)}") if leftovers(target) or extra else None,
    )


def add_save_cases() -> None:
    add("save", "into-dot", lambda tmp: save_dot(tmp, sub=False), quick=True)
    add("save", "into-dotdot", lambda tmp: save_dot(tmp, sub=True))
    add("save", "into-link", lambda tmp: save_link(tmp, dangling=False), quick=True)
    add("save", "into-dangling-link", lambda tmp: save_link(tmp, dangling=True))
    add("save", "into-file", lambda tmp: save_into_file(tmp, below=False))
    add("save", "below-a-file", lambda tmp: save_into_file(tmp, below=True))
    add("save", "over-dense-model", save_over_dense, quick=True)
    add("save", "next-to-user-model-files", save_next_to_user_weights)
    add("save", "back-into-its-source", save_back_into_source)
    for name, target, when in [
        ("fault-writing-weights", "save_file", lambda a: True),
        ("fault-writing-second-shard", "save_file", lambda a: "00002" in str(a[1])),
        ("fault-writing-config", "write_text_synced", lambda a: Path(a[0]).name == "config.json"),
        ("fault-moving-tokenizer", "replace", lambda a: Path(a[1]).name == "tokenizer.json"),
        ("fault-at-commit-rename", "replace", lambda a: Path(a[1]).name == "config.json"),
        ("fault-fsync", "sha256_of", lambda a: True),
    ]:
        add(
            "save",
            name,
            functools.partial(lambda tmp, t, w: save_fault(tmp, t, w), t=target, w=when),
            quick=name == "fault-at-commit-rename",
        )
    add(
        "save",
        "power-cut-after-first-shard",
        lambda tmp: save_fault(tmp, "save_file", lambda a: "00001" not in str(a[1]), PowerCut("power cut")),
    )
    for name, target, when, code in [
        ("disk-full-writing-weights", "save_file", lambda a: True, errno.ENOSPC),
        ("read-only-writing-config", "write_text_synced", lambda a: Path(a[0]).name == "config.json", errno.EROFS),
        ("too-large-journal", "write_text_synced", lambda a: Path(a[0]).name == ckpt.JOURNAL_NAME, errno.EFBIG),
    ]:  # as the system reports them: safetensors as text, Python as an OSError with the staging path
        add(
            "save",
            name,
            functools.partial(
                lambda tmp, t, w, c: save_fault(
                    tmp,
                    t,
                    w,
                    SafetensorError(f"Error while serializing: I/O error: {os.strerror(c)} (os error {c})")
                    if t == "save_file"
                    else OSError(c, os.strerror(c)),
                    rf"^cannot write {re.escape(str(tmp))}/\S+: {os.strerror(c)}$",
                    (ValueError,),
                ),
                t=target,
                w=when,
                c=code,
            ),
        )
    add("save", "tokenizer-not-a-tokenizer", save_bad_tokenizer)
    add("save", "over-forged-checksum-list", save_over_forged_checksums)
    add("save", "garbage-journal", lambda tmp: save_with_bad_journal(tmp, b"{garbage", r"journal|interrupted save"))
    add(
        "save",
        "journal-claims-user-files",
        lambda tmp: save_with_bad_journal(
            tmp,
            json.dumps(
                {
                    "staging": ".momos-save-000000000000",
                    "create": ["README.md", "notes"],
                    "remove": ["model-00001-of-00002.safetensors"],
                }
            ).encode(),
            r"journal",
        ),
    )
    add(
        "save",
        "config-json-is-a-folder",
        lambda tmp: (lambda f: refused_intact(f, lambda: converted().save_pretrained(f), r"config\.json"))(
            (tmp / "f" / "config.json").mkdir(parents=True) or tmp / "f"
        ),
    )
    add(
        "save",
        "config-json-garbage",
        lambda tmp: (lambda f: refused_intact(f, lambda: converted().save_pretrained(f), r"config\.json|not a MoMos"))(
            ((tmp / "f").mkdir(), (tmp / "f" / "config.json").write_text("{half a conf"), plant(tmp / "f"))
            and tmp / "f"
        ),
    )
    add(
        "save",
        "unsafe-serialization",
        lambda tmp: refused_intact(
            tmp, lambda: converted().save_pretrained(tmp / "o", safe_serialization=False), r"safetensors"
        ),
    )
    add(
        "save",
        "variant",
        lambda tmp: refused_intact(tmp, lambda: converted().save_pretrained(tmp / "o", variant="fp16"), r"variant"),
    )
    add(
        "save",
        "unknown-keyword",
        lambda tmp: refused_intact(tmp, lambda: converted().save_pretrained(tmp / "o", colour=1), r"colour"),
    )
    add(
        "save",
        "max-shard-size-garbage",
        lambda tmp: refused_intact(
            tmp, lambda: converted().save_pretrained(tmp / "o", max_shard_size="lots"), r"size|lots"
        ),
    )
    add(
        "save",
        "max-shard-size-0",
        lambda tmp: (
            lambda mm: (
                attempt(lambda: mm.save_pretrained(tmp / "o", max_shard_size=0), r"shard")[0]
                or saved_as(tmp / "o", mm, {})
            )
        )(converted()),
    )
    add(
        "save",
        "state-dict-without-motifs",
        lambda tmp: save_state_dict(tmp, lambda s: s.pop(f"base_model.{L0}.motifs")),
    )
    add(
        "save",
        "state-dict-without-embedding",
        lambda tmp: save_state_dict(tmp, lambda s: s.pop("base_model.model.embed_tokens.weight")),
    )
    add(
        "save",
        "state-dict-nan-motifs",
        lambda tmp: save_state_dict(
            tmp,
            lambda s: s.update(
                {f"base_model.{L0}.motifs": torch.full_like(s[f"base_model.{L0}.motifs"], float("nan"))}
            ),
        ),
    )
    add(
        "save",
        "no-momos-layers",
        lambda tmp: (
            attempt(lambda: ckpt.save_checkpoint(tiny("llama"), tmp / "o", {}), r"no MoMos layers")[0]
            or ("wrong", "saved")
        ),
    )
    for trial in range(8):
        add("save", f"kill-9-trial-{trial}", functools.partial(kill_trial, trial=trial), quick=trial == 0, timeout=180)
    add("save", "two-concurrent-savers", concurrent_savers, timeout=300)


# 4. pushes -----------------------------------------------------------------------------------------------

ALLOWED = {
    "config.json",
    "generation_config.json",
    "README.md",
    "eval_results.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
}


def plant_secrets(folder: Path) -> None:
    for name, text in {
        ".secrets/api_key.txt": SECRET,
        ".env": f"HF_TOKEN={SECRET}",
        ".git/config": f"token={SECRET}",
        "notes.txt": f"private {SECRET}",
        "step_4/optimizer.bin": "pickle",
        "runs/events.out": SECRET,
        "hparams.yml": f"hub_token: {SECRET}",
        "model_backup.safetensors": SECRET,
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def hub_leaks(hub, done) -> list:
    """Everything on the Hub stand-in that should not be there: files outside the allow-list or not named
    by the uploaded config.json, the secret in any uploaded byte or in the client's output."""
    problems = []
    for repo, files in hub.state.repos.items():
        try:
            q = json.loads(files["config.json"])["quantization_config"]
            weights = {q["weights"], *q.get("checksums", {})}
        except (KeyError, ValueError):
            weights = set()
        extra = sorted(set(files) - ALLOWED - weights)
        if extra:
            problems.append(f"{repo}: uploaded {extra}")
        holding = sorted(name for name, data in files.items() if SECRET.encode() in data)
        if holding:
            problems.append(f"{repo}: the secret is in uploaded {holding}")
    if done is not None and SECRET in done.stdout + done.stderr:
        problems.append("the secret is in the client's output")
    return problems


def push_case(
    tmp: Path, prepare: Callable[[Path], Path], code: str, expect: Optional[str], public: bool = False
) -> Verdict:
    """Run `code` (a client; `{folder}`, `{secret}`, `{base}` filled in) against a fresh Hub stand-in; a
    refusal must come before any request, a success must upload only the allow-list, privately unless
    `public`, and the secret must appear nowhere."""
    from hub_server import HubServer

    folder = prepare(tmp)
    with HubServer() as hub:
        env = {**ENV, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home")}
        done = run(
            [PY, "-c", textwrap.dedent(code).format(folder=folder, secret=SECRET, base=base("llama"))], tmp, env=env
        )
        leaks = hub_leaks(hub, done)
        v = cli_verdict(done, "momos-hf: error:", expect) if done is None or done.returncode else None
        if v:
            early = ("leak", f"requests before the refusal: {hub.state.requests[:3]}") if hub.state.requests else None
            return worst(v, early, ("leak", "; ".join(leaks)) if leaks else None)
        if leaks:
            return "leak", "; ".join(leaks)
        if not hub.state.repos:
            return "wrong", "exited 0 without uploading anything"
        wrong = [f"{r} created {'private' if p else 'public'}" for r, p in hub.state.private.items() if p == public]
        if wrong:
            return (
                "leak",
                f"{'; '.join(wrong)} ({'--public' if public else 'no public'} was asked), uploaded "
                f"{sorted(f for fs in hub.state.repos.values() for f in fs)}",
            )
        if expect is not None:
            return "wrong", f"pushed although a refusal matching {expect!r} was expected"
        return (
            "correct",
            f"uploaded {sorted(f for files in hub.state.repos.values() for f in files)}, "
            f"{'public' if public else 'private'}",
        )


CLI_PUSH = """
import pathlib
pathlib.Path(r"{folder}.token").write_text("{secret}")  # the token in a file beside the folder, never an argument
from momos_hf.app.cli import main
main(["push", r"{folder}", "me/probe", "--token_file", r"{folder}.token"%s])
"""


def checkpoint_with(extra: Callable[[Path], object]) -> Callable[[Path], Path]:
    def prepare(tmp: Path) -> Path:
        folder = copy_base("llama", tmp)
        extra(folder)
        return folder

    return prepare


def link_out(folder: Path, name: str, text: str = SECRET) -> None:
    (folder.parent / f"outside-{name}").write_text(text)
    (folder / name).symlink_to(folder.parent / f"outside-{name}")


def add_push_cases() -> None:
    cli, public = CLI_PUSH % "", CLI_PUSH % ', "--public"'
    for name, prepare, code, expect, *pub in [
        ("secrets-beside-checkpoint", checkpoint_with(plant_secrets), cli, None, False),
        ("public-flag", checkpoint_with(plant_secrets), public, None, True),
        ("tokenizer-link-out", checkpoint_with(lambda f: link_out(f, "tokenizer.json")), cli, r"tokenizer\.json"),
        ("readme-link-out", checkpoint_with(lambda f: link_out(f, "README.md")), cli, r"README\.md"),
        ("readme-is-a-folder", checkpoint_with(lambda f: (f / "README.md").mkdir()), cli, r"README\.md"),
        ("weights-link-out", checkpoint_with(replace(None, kind="link-out")), cli, r"model\.safetensors"),
        ("corrupted-weights", checkpoint_with(flip(lambda s, h: s - 3, 0x01)), cli, r"sha256|corrupt"),
        ("edited-config", checkpoint_with(qedit(lambda q: q["momos_config"].update(k=64))), cli, EDITED),
        ("dense-folder", dense_copy, cli, r"not a MoMos"),
        ("missing-folder", lambda tmp: tmp / "nope", cli, r"nope"),
        (
            "checksums-list-private-file",
            checkpoint_with(
                lambda f: (
                    plant_secrets(f),
                    qedit(lambda q: q["checksums"].update({"notes.txt": ckpt.sha256_of(f / "notes.txt")}))(f),
                )
            ),
            cli,
            None,
        ),
        ("bad-repo-id", checkpoint_with(lambda f: None), CLI_PUSH.replace("me/probe", "a/b/c") % "", r"repo"),
        (
            "api-push-to-hub-default",
            lambda tmp: tmp,
            """
                from momos_hf import MoMosModel
                MoMosModel.from_pretrained(r"{base}").push_to_hub("org/api", token="{secret}")""",
            None,
            False,
        ),
        (
            "transformers-push-to-hub-default",
            lambda tmp: tmp,
            """
                from momos_hf import MoMosModel
                MoMosModel.from_pretrained(r"{base}").base_model.push_to_hub("org/transformers", token="{secret}")""",
            None,
            False,
        ),
        (
            "save-pretrained-push-default",
            lambda tmp: tmp,
            """
                from momos_hf import MoMosModel
                MoMosModel.from_pretrained(r"{base}").save_pretrained(r"{folder}/out", push_to_hub=True, repo_id="org/save", token="{secret}")""",  # noqa: E501
            None,
            False,
        ),
        (
            "trainer-push-to-hub-default",
            lambda tmp: tmp,
            """
                from transformers import Trainer, TrainingArguments
                from momos_hf import MoMosModel
                mm = MoMosModel.from_pretrained(r"{base}")
                args = TrainingArguments(r"{folder}/trainer", push_to_hub=True, hub_model_id="org/trainer",
                                         hub_token="{secret}", report_to=[], use_cpu=True, save_strategy="no")
                Trainer(model=mm.base_model, args=args).push_to_hub()""",
            None,
            False,
        ),
    ]:
        add(
            "push",
            name,
            functools.partial(push_case, prepare=prepare, code=code, expect=expect, public=bool(pub and pub[0])),
            quick=name == "secrets-beside-checkpoint",
            timeout=180,
        )
    add("push", "unreachable-endpoint", push_unreachable)


def push_unreachable(tmp: Path) -> Verdict:
    folder = copy_base("llama", tmp)
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home")}
    (tmp / "token").write_text(SECRET)
    done = run([PY, "-m", "momos_hf.app.cli", "push", folder, "me/x", "--token_file", tmp / "token"], tmp, env=env)
    v = cli_verdict(done, "momos-hf: error:", r"connect|reach|network|127\.0\.0\.1")
    leak = ("leak", "the secret is in the output") if done and SECRET in done.stdout + done.stderr else None
    return worst(v or ("wrong", "exited 0"), leak)


# 5. CLI --------------------------------------------------------------------------------------------------


def cli_case(
    tmp: Path,
    argv: Callable[[Path], list],
    expect: Optional[str],
    check: Optional[Callable] = None,
    cwd: Optional[Callable[[Path], tuple]] = None,
) -> Verdict:
    """`python -m momos_hf.app.cli ARGV` in a subprocess; a refusal must be one clear line; a success is judged
    by `check(tmp, done)`; `cwd` prepares the working folder and says which of its files must survive."""
    work, keep = cwd(tmp) if cwd else (tmp, {})
    done = run([PY, "-m", "momos_hf.app.cli", *argv(tmp)], work)
    v = cli_verdict(done, "momos-hf: error:", expect)
    lost_v = damaged(work, keep)
    if v:
        return worst(v, lost_v)
    if check is None:
        return worst(("wrong", f"exited 0 although a refusal matching {expect!r} was expected"), lost_v)
    return worst(check(tmp, done), lost_v)


def loads_like(folder_of: Callable[[Path], Path], ref: str = "llama", same: bool = True) -> Callable:
    def check(tmp: Path, done) -> Verdict:
        v, mm = attempt(lambda: MoMosModel.from_pretrained(folder_of(tmp)))
        if v:
            return "wrong", f"compress exited 0, the output does not load: {v[1]}"
        got = outputs(mm)
        if not torch.isfinite(got).all():
            return "wrong", "the output gives NaN/inf"
        if same and not torch.equal(got, reference(ref)):
            return "wrong", "the output loads with other outputs than the model it came from"
        return "correct", "compressed; loads"

    return check


def dense_copy(tmp: Path) -> Path:
    shutil.copytree(base("dense"), tmp / "dense")
    return tmp / "dense"


def in_dense(tmp: Path) -> tuple:
    folder = dense_copy(tmp)
    return folder, snapshot(folder)


def with_notes(tmp: Path) -> tuple:
    (tmp / "work").mkdir()
    return tmp / "work", plant(tmp / "work")


def calibration(*extra: str) -> Callable[[Path], list]:
    return lambda tmp: [
        "compress",
        base("dense"),
        "--output_dir",
        tmp / "o",
        "--k",
        "12",
        "--s",
        "4",
        "--kmeans_iters",
        "1",
        "--fit",
        "data-aware",
        "--calibration_file",
        WORK / "base" / "calib.txt",
        *extra,
    ]


def add_cli_cases() -> None:
    fit = ["--k", "12", "--s", "4", "--kmeans_iters", "1", "--scale"]
    D = lambda *a: lambda tmp: ["compress", base("dense"), "--output_dir", tmp / "o", *a]  # noqa: E731
    for name, argv, expect, check, cwd in [
        ("info-no-argument", lambda tmp: ["info"], r"directory", None, None),
        ("info-missing-folder", lambda tmp: ["info", tmp / "nope"], r"nope.*not a folder", None, None),
        ("info-a-file", lambda tmp: ["info", WORK / "base" / "calib.txt"], r"not a folder", None, None),
        ("info-dense-model", lambda tmp: ["info", base("dense")], r"not a MoMos", None, None),
        (
            "compress-missing-model",
            lambda tmp: ["compress", tmp / "nope", "--output_dir", tmp / "o"],
            r"not a local model folder",
            None,
            None,
        ),
        (
            "compress-file-as-model",
            lambda tmp: ["compress", WORK / "base" / "calib.txt", "--output_dir", tmp / "o"],
            r"not a local model folder",
            None,
            None,
        ),
        ("compress-no-output-dir", lambda tmp: ["compress", base("dense")], r"output_dir", None, None),
        ("compress-k-0", D("--k", "0"), r"\bk\b", None, None),
        ("compress-k-not-a-number", D("--k", "abc"), r"--k", None, None),
        ("compress-s-negative", D("--s", "-4"), r"\bs\b", None, None),
        ("compress-k-too-large", D("--k", "100000", "--s", "4"), r"do not fit", None, None),
        ("compress-seed-negative", D("--seed", "-1", *fit), r"seed", None, None),
        ("compress-bad-regex", D("--target_regex", "(", *fit), r"regex", None, None),
        (
            "compress-embedding-target",
            D("--target_modules", "embed_tokens", *fit),
            r"not nn.Linear",  # newer trees convert embeddings
            loads_like(lambda tmp: tmp / "o", same=False),
            None,
        ),
        (
            "compress-output-is-a-file",
            lambda tmp: ["compress", base("dense"), "--output_dir", WORK / "base" / "calib.txt", *fit],
            r"is a file",
            None,
            None,
        ),
        (
            "compress-into-dot-of-dense-folder",
            lambda tmp: ["compress", tmp / "dense", "--output_dir", ".", *fit],
            r"not a MoMos checkpoint",
            None,
            in_dense,
        ),
        (
            "compress-into-dot-with-notes",
            lambda tmp: ["compress", base("dense"), "--output_dir", ".", *fit],
            None,
            loads_like(lambda tmp: tmp / "work", same=False),
            with_notes,
        ),
        (
            "compress-fp16",
            D("--torch_dtype", "float16", *fit),
            None,
            loads_like(lambda tmp: tmp / "o", same=False),
            None,
        ),
        (
            "compress-momos-other-settings",
            lambda tmp: ["compress", base("llama"), "--output_dir", tmp / "o", "--k", "8", "--s", "4"],
            r"other settings",
            None,
            None,
        ),
        (
            "compress-momos-same-settings",
            lambda tmp: ["compress", base("llama"), "--output_dir", tmp / "o", *fit],
            None,
            loads_like(lambda tmp: tmp / "o"),
            None,
        ),
        (
            "compress-momos-in-place",
            lambda tmp: ["compress", tmp / "momos", "--output_dir", tmp / "momos", *fit],
            r"output_dir",
            None,
            lambda tmp: (copy_base("llama", tmp, "momos").parent, {}),
        ),
        ("data-aware-without-file", D("--fit", "data-aware", *fit), r"calibration_file", None, None),
        (
            "calibration-file-without-data-aware",
            D("--calibration_file", WORK / "base" / "calib.txt", *fit),
            r"calibration_file",
            None,
            None,
        ),
        (
            "calibration-file-missing",
            lambda tmp: calibration()(tmp)[:-1] + [tmp / "missing.txt"],
            r"missing\.txt",
            None,
            None,
        ),
        ("calibration-samples-0", calibration("--calibration_samples", "0"), r"calibration_samples", None, None),
        ("calibration-seq-len-0", calibration("--calibration_seq_len", "0"), r"calibration_seq_len", None, None),
        (
            "calibration-samples-negative",
            calibration("--calibration_samples", "-3"),
            r"calibration_samples",
            None,
            None,
        ),
        (
            "report-json-unwritable",
            lambda tmp: ["report", base("dense"), *fit, "--max_bytes", "0", "--json", tmp / "no" / "r.json"],
            r"r\.json",
            None,
            None,
        ),
        (
            "report-max-bytes-negative",
            lambda tmp: ["report", base("dense"), *fit, "--max_bytes", "-5"],
            r"max_bytes",
            None,
            None,
        ),
        ("demo-k-0", lambda tmp: ["demo", "--k", "0", "--steps", "1"], r"\bk\b", None, None),
        ("calibration-samples-huge", calibration("--calibration_samples", "100000000"), r"calibration", None, None),
        ("finetune-lr-nan", calibration("--finetune_steps", "1", "--finetune_lr", "nan"), r"finetune_lr", None, None),
        ("push-token-literal", lambda tmp: ["push", base("dense"), "me/x", "--token", SECRET], r"--token", None, None),
        ("demo-flags-first", lambda tmp: ["--steps", "3"], r"momos-hf demo --steps 3", None, None),
    ]:
        add(
            "cli",
            name,
            functools.partial(cli_case, argv=argv, expect=expect, check=check, cwd=cwd),
            quick=name in ("compress-k-0",),
            timeout=180,
        )


# 6. recipe -----------------------------------------------------------------------------------------------

RECIPE = ROOT / "recipes" / "finetune.py"
TINY_RUN = [
    "--fit",
    "sample",
    "--k",
    "16",
    "--s",
    "4",
    "--block_size",
    "32",
    "--per_device_train_batch_size",
    "2",
    "--max_eval_samples",
    "4",
    "--logging_steps",
    "1",
    "--lr_scheduler_type",
    "constant",
    "--learning_rate",
    "1e-2",
]


def recipe(tmp: Path, *args, cwd: Optional[Path] = None, env: Optional[dict] = None):
    model = ["--model_config", WORK / "base" / "tiny_llama.json"]
    return run([PY, RECIPE, *model, *TINY_RUN, *args], cwd or tmp, RECIPE_TIMEOUT, env)


def base_run() -> Path:
    """A finished 3-step run with step_1..step_3 training checkpoints (built once)."""
    folder = WORK / "base" / "run"
    if not (folder / "eval_results.json").exists():
        done = recipe(WORK / "base", "--max_steps", "3", "--checkpointing_steps", "1", "--output_dir", folder)
        if done is None or done.returncode:
            raise RuntimeError(f"the base recipe run failed: {done and done.stderr[-2000:]}")
    return folder


def recipe_case(
    tmp: Path,
    args: Callable[[Path], list],
    expect: Optional[str],
    check: Optional[Callable] = None,
    cwd: Optional[Callable[[Path], Path]] = None,
) -> Verdict:
    work = cwd(tmp) if cwd else tmp
    done = recipe(tmp, *args(tmp), cwd=work)
    v = cli_verdict(done, "finetune.py: error:", expect)
    if v:
        return v
    if check is None:
        return "wrong", f"exited 0 although a refusal matching {expect!r} was expected"
    return check(tmp, done)


def step_copy(tmp: Path, step: int = 2, edit: Optional[Callable[[Path], object]] = None) -> Path:
    folder = tmp / f"step_{step}"
    shutil.copytree(base_run() / f"step_{step}", folder)
    if edit:
        edit(folder)
    return folder


def same_as_base_run(tmp: Path, done) -> Verdict:
    got, want = read_json(tmp / "out" / "eval_results.json"), read_json(base_run() / "eval_results.json")
    if (got["steps"], got["eval_loss"]) != (want["steps"], want["eval_loss"]):
        return "wrong", (
            f"resumed run ends at step {got['steps']} with eval loss {got['eval_loss']:.6f}; the "
            f"uninterrupted run: step {want['steps']}, {want['eval_loss']:.6f}"
        )
    return "correct", "resumed run equals the uninterrupted one"


def no_secret_written(tmp: Path, done) -> Verdict:
    found = [
        p.relative_to(tmp).as_posix()
        for p in tmp.rglob("*")
        if p.is_file() and p != tmp / "token.txt" and SECRET.encode() in p.read_bytes()  # the user's own token file
    ]
    if SECRET in done.stdout + done.stderr:
        found.append("(stdout/stderr)")
    events = sum(1 for p in tmp.rglob("*tfevents*"))
    written = sum(1 for p in tmp.rglob("*") if p.is_file())
    return (
        ("leak", f"the token is in {found}")
        if found
        else ("correct", f"token in none of {written} files ({events} tensorboard event files)")
    )


def trained(tmp: Path, done) -> Verdict:
    return (
        ("correct", "trained and saved")
        if (tmp / "out" / "eval_results.json").exists()
        else ("wrong", "exited 0 without results")
    )


def user_files_kept(tmp: Path, done) -> Verdict:
    return damaged(tmp / "work", MINE) or ("correct", "user files intact")


def recipe_cwd(tmp: Path) -> Path:
    return with_notes(tmp)[0]


def token_file(tmp: Path) -> Path:
    """The secret in a file of its own, as the recipe takes tokens (never as a command-line value)."""
    path = tmp / "token.txt"
    path.write_text(SECRET + "\n", encoding="utf-8")
    return path


def recipe_push(tmp: Path) -> Verdict:
    from hub_server import HubServer

    with HubServer() as hub:
        env = {**ENV, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home")}
        done = recipe(
            tmp,
            "--max_steps",
            "2",
            "--output_dir",
            tmp / "out",
            "--report_to",
            "tensorboard",
            "--push_to_hub",
            "--hub_model_id",
            "me/run",
            "--hub_token_file",
            token_file(tmp),
            env=env,
        )
        v = cli_verdict(done, "finetune.py: error:", None)
        if v:
            return v
        leaks = hub_leaks(hub, done) + ([] if hub.state.private.get("me/run") else ["repository created public"])
        return (
            ("leak", "; ".join(leaks))
            if leaks
            else worst(
                ("correct", f"uploaded {sorted(hub.state.repos.get('me/run', {}))}, privately"),
                no_secret_written(tmp, done),
            )
        )


def add_recipe_cases() -> None:
    text = lambda data: (
        lambda tmp: after(
            (tmp / "train.txt").write_bytes(data),
            ["--train_file", tmp / "train.txt", "--max_steps", "1", "--output_dir", tmp / "out"],
        )
    )  # noqa: E731
    resume = lambda step, max_steps, edit=None, *extra: (
        lambda tmp: [  # noqa: E731
            "--max_steps",
            str(max_steps),
            "--resume_from_checkpoint",
            step_copy(tmp, step, edit),
            "--output_dir",
            tmp / "out",
            *extra,
        ]
    )
    for name, args, expect, check, cwd in [
        ("max-steps-0", lambda tmp: ["--max_steps", "0"], r"max_steps", None, None),
        ("learning-rate-inf", lambda tmp: ["--learning_rate", "inf"], r"learning_rate", None, None),
        (
            "validation-split-negative",
            lambda tmp: ["--validation_split_percentage=-10"],
            r"validation_split",
            None,
            None,
        ),
        (
            "hub-token-literal",
            lambda tmp: ["--push_to_hub", "--hub_model_id", "me/x", "--hub_token", SECRET],
            r"hub_token",
            None,
            None,
        ),
        (
            "model-path-missing",
            lambda tmp: ["--model_name_or_path", tmp / "no" / "model"],
            r"model_name_or_path",
            None,
            None,
        ),
        ("block-size-0", lambda tmp: ["--block_size", "0", "--max_steps", "1"], r"block_size", None, None),
        ("block-size-huge", lambda tmp: ["--block_size", "100000", "--max_steps", "1"], r"block_size", None, None),
        ("empty-train-file", text(b""), r"train\.txt.*empty", None, None),
        ("whitespace-train-file", text(b"  \n\n \t\n"), r"train\.txt.*empty", None, None),
        ("binary-train-file", text(bytes(range(256)) * 64), r"train\.txt.*(binary|UTF-8)", None, None),
        (
            "missing-train-file",
            lambda tmp: ["--train_file", tmp / "missing.txt", "--max_steps", "1"],
            r"missing\.txt",
            None,
            None,
        ),
        (
            "train-file-is-a-folder",
            lambda tmp: after((tmp / "d.txt").mkdir(), ["--train_file", tmp / "d.txt", "--max_steps", "1"]),
            r"d\.txt",
            None,
            None,
        ),
        (
            "train-file-unknown-extension",
            lambda tmp: after(
                (tmp / "t.parquet").write_text("x"), ["--train_file", tmp / "t.parquet", "--max_steps", "1"]
            ),
            r"t\.parquet",
            None,
            None,
        ),
        ("train-file-too-short", text(b"tiny\n"), r"block_size", None, None),
        (
            "json-without-text-column",
            lambda tmp: after(
                (tmp / "t.json").write_text("".join(f'{{"id": {i}, "label": {i % 2}}}\n' for i in range(300))),
                ["--train_file", tmp / "t.json", "--max_steps", "1", "--output_dir", tmp / "out"],
            ),
            r"text|column",
            None,
            None,
        ),
        (
            "csv-with-empty-cells",
            lambda tmp: after(
                (tmp / "t.csv").write_text(
                    "text\n" + "".join(("" if i % 3 else f"line {i} of text here") + "\n" for i in range(300))
                ),
                ["--train_file", tmp / "t.csv", "--max_steps", "1", "--output_dir", tmp / "out"],
            ),
            r"t\.csv|empty|None|text",
            trained,
            None,
        ),
        (
            "text-column-unknown",
            lambda tmp: ["--train_file", WORK / "base" / "train.txt", "--text_column", "nope", "--max_steps", "1"],
            r"nope",
            None,
            None,
        ),
        (
            "resume-missing",
            lambda tmp: ["--max_steps", "3", "--resume_from_checkpoint", tmp / "step_9"],
            r"step_9",
            None,
            None,
        ),
        (
            "resume-corrupted",
            resume(
                2,
                3,
                lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-1] + b"\x00"),
            ),
            r"corrupted",
            None,
            None,
        ),
        (
            "resume-file-deleted",
            resume(2, 3, lambda f: (f / "optimizer.bin").unlink()),
            r"corrupted|incomplete",
            None,
            None,
        ),
        (
            "resume-extra-file",
            resume(2, 3, lambda f: (f / "evil.pkl").write_bytes(b"cos\nsystem\n")),
            r"corrupted|differ",
            None,
            None,
        ),
        (
            "resume-step-record-missing",
            resume(2, 3, lambda f: (f / "momos_step.json").unlink()),
            r"not a complete",
            None,
            None,
        ),
        ("resume-past-max-steps", resume(3, 2), r"beyond --max_steps", None, None),
        ("resume-finished", resume(3, 3), r"max_steps|nothing", same_as_base_run, None),
        ("resume-exact", resume(2, 3), None, same_as_base_run, None),
        ("resume-other-settings", resume(2, 3, None, "--k", "8"), r"step_2|k|settings|checkpoint", None, None),
        ("resume-dense-mode", resume(2, 3, None, "--train_mode", "dense"), r"step_2|dense|checkpoint", None, None),
        (
            "resume-from-final-checkpoint",
            lambda tmp: ["--max_steps", "3", "--resume_from_checkpoint", base_run()],
            r"not a complete",
            None,
            None,
        ),
        (
            "hub-token-tensorboard",
            lambda tmp: [
                "--max_steps",
                "2",
                "--output_dir",
                tmp / "out",
                "--report_to",
                "tensorboard",
                "--hub_token",
                SECRET,
                "--checkpointing_steps",
                "1",
                "--eval_steps",
                "1",
            ],
            None,
            no_secret_written,
            None,
        ),
        (
            "output-dir-dot-with-user-files",
            lambda tmp: ["--max_steps", "1", "--output_dir", "."],
            None,
            user_files_kept,
            recipe_cwd,
        ),
        (
            "output-dir-holds-dense-model",
            lambda tmp: ["--max_steps", "1", "--output_dir", dense_copy(tmp)],
            r"not a MoMos",
            None,
            None,
        ),
    ]:
        add(
            "recipe",
            name,
            functools.partial(recipe_case, args=args, expect=expect, check=check, cwd=cwd),
            quick=name == "max-steps-0",
            timeout=RECIPE_TIMEOUT + 30,
        )
    add("recipe", "push-with-token", recipe_push, timeout=RECIPE_TIMEOUT + 30)


# -- running -----------------------------------------------------------------------------------------------


def _alarm(signum, frame):
    raise Hang()


def run_in_process(case: Case, tmp: Path) -> Verdict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(case.timeout)
    cwd = os.getcwd()
    try:
        return case.fn(tmp)
    except Hang:
        return "hang", f"no result within {case.timeout} s"
    except Exception as err:  # noqa: BLE001 - an exception the case did not expect
        return judge(err, None)
    finally:
        signal.alarm(0)
        os.chdir(cwd)


def run_case(case: Case) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=WORK))
    start = time.perf_counter()
    if case.isolate:
        done = run([PY, __file__, "--case", case.name, "--work", WORK, "--tmp", tmp], ROOT, case.timeout)
        if done is None:
            verdict = ("hang", f"no result within {case.timeout} s")
        else:
            found = [l for l in done.stdout.splitlines() if l.startswith("PROBE-RESULT ")]
            verdict = (
                tuple(json.loads(found[-1][13:]))
                if found
                else ("raw", f"case process died: {line(done.stderr[-400:])}")
            )
    else:
        verdict = run_in_process(case, tmp)
    return {
        "name": case.name,
        "family": case.family,
        "category": verdict[0],
        "message": verdict[1],
        "seconds": round(time.perf_counter() - start, 2),
    }


def table(results: list) -> str:
    families = list(dict.fromkeys(r["family"] for r in results))
    rows = [(f, [r for r in results if r["family"] == f]) for f in families] + [("total", results)]
    head = f"{'family':<8} {'tries':>5} " + " ".join(f"{label:>{max(len(label), 5)}}" for label in LABELS)
    lines = [head, "-" * len(head)]
    for family, rs in rows:
        counts = [sum(r["category"] == c for r in rs) for c in CATEGORIES]
        lines.append(
            f"{family:<8} {len(rs):>5} " + " ".join(f"{n:>{max(len(label), 5)}}" for n, label in zip(counts, LABELS))
        )
        if family == families[-1]:
            lines.append("-" * len(head))
    return "\n".join(lines)


def build_cases() -> None:
    if not CASES:
        for adder in (
            add_config_cases,
            add_load_cases,
            add_save_cases,
            add_push_cases,
            add_cli_cases,
            add_recipe_cases,
        ):
            adder()


def main(argv: Optional[list] = None) -> int:
    global WORK, ENV
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a fixed subset of about 20 fast cases")
    p.add_argument("--json", help="write per-case results (name, family, category, message) to this file")
    p.add_argument("--only", help="run only the cases whose name matches this regex")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--strict", action="store_true", help="exit 1 when a case is neither correct nor a clear error")
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument(SAVER, nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    WORK = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="probe-trust-"))
    ENV = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    if args.saver:
        sources, target, seed, saves, delay = args.saver
        saver_main(sources.split(","), target, int(seed), int(saves), float(delay))
        return 0
    build_cases()
    if args.case:  # one isolated case, in this fresh process
        case = next(c for c in CASES if c.name == args.case)
        print("PROBE-RESULT " + json.dumps(run_in_process(case, Path(args.tmp))), flush=True)
        return 0
    start = time.perf_counter()
    build_bases()
    selected = [c for c in CASES if (c.quick or not args.quick) and (not args.only or re.search(args.only, c.name))]
    print(f"momos-hf trust probe: {len(selected)} cases{' (quick)' if args.quick else ''}, scratch {WORK}", flush=True)
    results = []
    for case in selected:
        result = run_case(case)
        results.append(result)
        flag = "" if result["category"] in ("correct", "clear") else f"  <-- {result['category'].upper()}"
        print(f"  {result['category']:<7} {result['seconds']:6.1f}s  {case.name}{flag}", flush=True)
    print()
    print(table(results))
    bad = [r for r in results if r["category"] not in ("correct", "clear")]
    if bad:
        print(f"\n{len(bad)} cases neither correct nor a clear error:")
        for r in bad:
            print(f"  [{r['category']}] {r['name']}: {r['message']}")
    print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep and not args.work:
        shutil.rmtree(WORK, ignore_errors=True)
    if OWN_HF_HOME:
        shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
