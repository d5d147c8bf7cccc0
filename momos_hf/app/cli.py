"""`momos-hf` command line. With no arguments it runs the demo (the main job on an embedded default).

Every failure the user can fix ends in one line, `momos-hf: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from .. import __version__
from ..checkpoint.info import checkpoint_info, format_info
from ..config import FITS, SCOPES, MoMosConfig
from ..convert.converter import DEFAULT_ACTIVATION_BYTES
from ..fit.methods import NEEDS_INPUT_MOMENTS
from ..integrations.hub import push_folder, read_token_file
from ..integrations.quantizer import architecture_class
from ..model import get_momos_model
from ..report.complexity import complexity_report
from ..train.distill import DEFAULT_FINETUNE_LR, finetune_to_teacher, teacher_targets
from .args import (
    OneLineParser,
    add_token_arguments,
    motif_bits_int,
    non_negative_int,
    number_in,
    positive_int,
    seed_int,
)
from .demo import run_demo, tiny_llama
from .text import byte_tokenizer, calibration_batches, check_calibration_size, check_text_file

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_ACTIVATION_MB = DEFAULT_ACTIVATION_BYTES // 2**20
DEMO_FLAGS = ("--steps", "--k", "--s", "--motif_scope", "--seed", "--layers")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=positive_int, default=256, help="motifs per dictionary")
    parser.add_argument(
        "--s", type=positive_int, default=16, help="values per block (the mosaic costs ceil(log2 k)/s bits per weight)"
    )
    parser.add_argument(
        "--motif_scope", choices=SCOPES, default="layer", help="one dictionary per layer, or one for all"
    )
    parser.add_argument(
        "--fit", choices=FITS, default="kmeans", help="how motifs and mosaic are fitted (momos_hf.fit.methods)"
    )
    parser.add_argument(
        "--kmeans_iters",
        type=number_in(int, 0, 10_000, name="kmeans_iters"),
        default=15,
        help="Lloyd steps of the k-means fits",
    )
    parser.add_argument("--scale", action="store_true", help="learn a scale per output row")
    parser.add_argument(
        "--motif_bits", type=motif_bits_int, default=None, help="q-bit motifs, 2-16 (default: the motif dtype's width)"
    )
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        help="module names, or all-linear (default: the attention and MLP projections)",
    )
    targets.add_argument("--target_regex", default=None, help="regular expression over full module names")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of every random choice of the fit")
    parser.add_argument(
        "--torch_dtype",
        choices=TORCH_DTYPES,
        default="auto",
        help="dtype to load the model in, and so to store its untouched weights and motifs "
        "(auto: the dtype it was saved in)",
    )
    parser.add_argument(
        "--calibration_file",
        default=None,
        help="text file for --fit data-aware: windows of it are run through the model",
    )
    parser.add_argument("--calibration_samples", type=positive_int, default=128, help="calibration windows")
    parser.add_argument("--calibration_seq_len", type=positive_int, default=128, help="tokens per calibration window")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="--fit data-aware block by block, each block calibrated on the converted ones before it "
        "(one block's statistics in memory at a time)",
    )
    parser.add_argument(
        "--offload_folder",
        default=None,
        help="with --sequential: where hidden states past --activation_budget_mb go "
        "(default: the system's temporary folder)",
    )
    parser.add_argument(
        "--activation_budget_mb",
        type=non_negative_int,
        default=None,
        help=f"with --sequential: memory for the hidden states between blocks (default {DEFAULT_ACTIVATION_MB})",
    )
    parser.add_argument(
        "--resume_folder",
        default=None,
        help="with --sequential: save each converted block here as it finishes, and reuse the blocks "
        "found here when the same conversion runs again (after an interruption)",
    )
    parser.add_argument(
        "--finetune_steps",
        type=non_negative_int,
        default=0,
        help="after conversion, train motifs, scales and norms this many steps (one calibration window "
        "each) to predict what the dense model predicted (momos_hf.train.distill; needs --calibration_file)",
    )
    parser.add_argument(
        "--finetune_lr",
        type=number_in(float, 0, 1, low_open=True),
        default=None,
        help=f"peak learning rate of --finetune_steps (cosine to 0; default {DEFAULT_FINETUNE_LR})",
    )


def calibration_users(args: argparse.Namespace) -> list[str]:
    """The flags that need calibration windows."""
    return [f"--fit {args.fit}"] * (args.fit in NEEDS_INPUT_MOMENTS) + ["--finetune_steps"] * (args.finetune_steps > 0)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that disagree, and calibration that cannot fit in memory, before anything is loaded."""
    conversion_options(args), config_from_args(args)
    if not args.finetune_steps and args.finetune_lr is not None:
        raise ValueError("--finetune_lr is used with --finetune_steps only")
    needed_by = calibration_users(args)
    if not needed_by and args.calibration_file:
        raise ValueError("--calibration_file is used by --fit data-aware and --finetune_steps only")
    if needed_by and not args.calibration_file:
        raise ValueError(f"{needed_by[0]} needs --calibration_file TEXT")
    if needed_by:
        check_calibration_size(args.calibration_samples, args.calibration_seq_len)
        check_text_file(args.calibration_file)
    output_dir = getattr(args, "output_dir", None)
    if output_dir is not None and Path(output_dir).is_file():
        raise ValueError(f"--output_dir {output_dir}: it is a file, not a folder")
    if output_dir is not None and args.model_path and Path(output_dir).resolve() == Path(args.model_path).resolve():
        raise ValueError(
            f"--output_dir {output_dir} is the model folder: give the MoMos checkpoint a folder of its own"
        )


def calibration_from_args(args: argparse.Namespace, model, tokenizer):
    """Calibration batches for `--fit data-aware` and `--finetune_steps` (`None` without them); `check_flags`
    has checked the flags."""
    needed_by = calibration_users(args)
    if not needed_by:
        return None
    if tokenizer is None:
        raise ValueError(f"{needed_by[0]} needs a tokenizer in the model folder to tokenize --calibration_file")
    batches = calibration_batches(
        tokenizer,
        args.calibration_file,
        args.calibration_samples,
        args.calibration_seq_len,
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    if model.config.is_encoder_decoder:
        batches = [dict(b, decoder_input_ids=b["input_ids"]) for b in batches]
    return batches


def conversion_options(args: argparse.Namespace) -> dict:
    """`get_momos_model`'s runtime options from the flags."""
    if not args.sequential and (
        args.offload_folder is not None or args.activation_budget_mb is not None or args.resume_folder
    ):
        raise ValueError(
            "--offload_folder, --activation_budget_mb and --resume_folder are used with --sequential only"
        )
    if args.sequential and args.fit not in NEEDS_INPUT_MOMENTS:
        raise ValueError(f"--sequential calibrates --fit data-aware; --fit {args.fit} reads no calibration")
    budget_mb = DEFAULT_ACTIVATION_MB if args.activation_budget_mb is None else args.activation_budget_mb
    return {
        "sequential": args.sequential,
        "activation_budget_bytes": budget_mb * 2**20,
        "offload_folder": args.offload_folder,
        "resume_folder": args.resume_folder,
    }


def config_from_args(args: argparse.Namespace):
    targets = args.target_regex or args.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return MoMosConfig(
        k=args.k,
        s=args.s,
        motif_scope=args.motif_scope,
        fit=args.fit,
        kmeans_iters=args.kmeans_iters,
        scale=args.scale,
        motif_bits=args.motif_bits,
        target_modules=targets,
        seed=args.seed,
    )


def convert_from_args(args: argparse.Namespace, model, tokenizer):
    """Calibrate, convert and, with `--finetune_steps`, fine-tune towards the dense model, as the flags say."""
    options, config = conversion_options(args), config_from_args(args)
    lr = DEFAULT_FINETUNE_LR if args.finetune_lr is None else args.finetune_lr
    calibration = calibration_from_args(args, model, tokenizer)
    targets = teacher_targets(model, calibration) if args.finetune_steps else None
    mm = get_momos_model(model, config, calibration if args.fit in NEEDS_INPUT_MOMENTS else None, **options)
    if targets is not None:
        finetune_to_teacher(mm, targets, args.finetune_steps, lr)
    return mm


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(steps=args.steps, k=args.k, s=args.s, scope=args.motif_scope, seed=args.seed, show_layers=args.layers)


def load_model(path: str, torch_dtype: str = "auto"):
    """The model in a local Transformers folder, as the class its config names, in `torch_dtype`."""
    folder = Path(path)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ValueError(f"{path} is not a local model folder (a folder with config.json)")
    return architecture_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=torch_dtype)


def load_tokenizer(path: Optional[str]):
    """The tokenizer of a model folder (`None` if it has none); the byte tokenizer for the default model."""
    if path is None:
        return byte_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):  # a model folder without a tokenizer is fine
        return None


def cmd_report(args: argparse.Namespace) -> None:
    check_flags(args)
    model = tiny_llama(args.seed) if args.model_path is None else load_model(args.model_path, args.torch_dtype)
    mm = convert_from_args(args, model, load_tokenizer(args.model_path))
    report = complexity_report(mm, mm.fit_errors, max_bytes=args.max_bytes)
    print(report.format(per_layer=not args.totals_only))
    if args.json:
        Path(args.json).write_text(report.to_json(), encoding="utf-8")


def cmd_compress(args: argparse.Namespace) -> None:
    check_flags(args)
    model = load_model(args.model_path, args.torch_dtype)
    tokenizer = load_tokenizer(args.model_path)
    mm = convert_from_args(args, model, tokenizer)
    mm.save_pretrained(args.output_dir, tokenizer=tokenizer)
    print(format_info(checkpoint_info(args.output_dir)))


def cmd_info(args: argparse.Namespace) -> None:
    print(format_info(checkpoint_info(args.directory)))


def cmd_push(args: argparse.Namespace) -> None:
    url = push_folder(
        args.directory,
        args.repo_id,
        private=not args.public,
        token=read_token_file(args.token_file) if args.token_file else None,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.directory} to {args.repo_id}: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="momos-hf", description="Mosaic-of-Motifs compression for Hugging Face models")
    parser.add_argument("--version", action="version", version=f"momos-hf {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    demo = sub.add_parser(
        "demo",
        help="convert a small Llama, train it on embedded text, print the report (default)",
    )
    demo.add_argument("--steps", type=positive_int, default=60, help="training steps")
    demo.add_argument("--k", type=positive_int, default=256, help="motifs in the dictionary")
    demo.add_argument("--s", type=positive_int, default=16, help="values per block")
    demo.add_argument(
        "--motif_scope", choices=SCOPES, default="global", help="one dictionary for all layers, or one per layer"
    )
    demo.add_argument("--seed", type=seed_int, default=0, help="seed of the model, the fit and the batches")
    demo.add_argument("--layers", action="store_true", help="print the per-layer table")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="convert a local model and print its size/complexity report")
    report.add_argument(
        "model_path", nargs="?", help="local Hugging Face model folder (default: a small Llama built from a config)"
    )
    add_fit_arguments(report)
    report.add_argument(
        "--max_bytes",
        type=non_negative_int,
        default=4 * 2**20,
        help="bytes of weights given to the compressors and BDM (0: skip)",
    )
    report.add_argument("--totals_only", action="store_true", help="leave out the per-layer table")
    report.add_argument("--json", help="also write the report as JSON to this file")
    report.set_defaults(func=cmd_report)

    compress = sub.add_parser("compress", help="convert a local model and save the compact MoMos checkpoint")
    compress.add_argument("model_path", help="local Hugging Face model folder")
    compress.add_argument("--output_dir", required=True, help="folder of the MoMos checkpoint (created if needed)")
    add_fit_arguments(compress)
    compress.set_defaults(func=cmd_compress)

    info = sub.add_parser("info", help="settings and sizes of a MoMos checkpoint folder (reads no weights)")
    info.add_argument("directory", help="MoMos checkpoint folder")
    info.set_defaults(func=cmd_info)

    push = sub.add_parser(
        "push",
        help="upload a MoMos checkpoint folder to a Hub repository (HF_ENDPOINT); private unless --public",
    )
    push.add_argument("directory", help="MoMos checkpoint folder")
    push.add_argument("repo_id", help="repository, as owner/name")
    push.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    add_token_arguments(push, "--token")
    push.add_argument("--revision", default=None, help="branch to commit to (created if needed)")
    push.add_argument("--commit_message", default="Upload MoMos model", help="commit message")
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if (
        argv and argv[0].split("=")[0] in DEMO_FLAGS
    ):  # the demo is the default command, but its flags come after its name
        parser.error(f"options go after a command: for the demo, `momos-hf demo {' '.join(argv)}`")
    args = parser.parse_args(argv or ["demo"])
    try:
        args.func(args)
    except (ValueError, OSError, SafetensorError) as err:  # input and environment errors: one clear line
        parser.exit(2, f"momos-hf: error: {' '.join(str(err).split())}\n")


if __name__ == "__main__":
    main()
