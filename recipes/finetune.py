"""MoMos-aware training of a causal language model with Accelerate, from one CPU process to many GPUs.

    accelerate launch recipes/finetune.py                       # tiny Llama, byte tokenizer, embedded sonnets
    accelerate launch recipes/finetune.py --model_name_or_path PATH --train_file train.txt --k 256 --s 16 \\
        --train_mode ste --distill --max_steps 1000 --output_dir out/
    accelerate launch recipes/finetune.py --model_name_or_path MOMOS_CHECKPOINT --train_file train.txt \\
        --lora_r 16 --output_dir adapter/                      # LoRA adapters on a frozen MoMos base

Trains in one of the `MoMosConfig.train_mode`s (`motifs`, `projected`, `ste`) or `dense` (no conversion, the
baseline), optionally distilling from the dense starting model, evaluates validation loss and perplexity,
logs them with bits per weight and complexity figures, and writes the compact MoMos checkpoint with a model
card holding the evaluation results. With `--lora_r` it trains LoRA adapters on a MoMos checkpoint instead
(`momos_hf.integrations.lora`; the base stays frozen and compact) and writes the adapter alone, with a card naming
the base checkpoint and how to load the adapter onto it. --output_dir is a new or empty folder, or the output of an
earlier run of the same kind (a README or notes of yours in it are kept). Where no GPU exists it runs on CPU
processes (gloo), so
`accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py` gives two real ranks.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from peft import LoraConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    SchedulerType,
    default_data_collator,
    get_scheduler,
)

from momos_hf import ComplexityTracker, MoMosConfig, complexity_report, get_lora_model, get_momos_model, momos_layers
from momos_hf.app import (
    UPLOADABLE,
    OneLineParser,
    add_token_arguments,
    byte_tokenizer,
    load_text_datasets,
    motif_bits_int,
    non_negative_int,
    number_in,
    positive_int,
    push_folder,
    read_token_file,
    seed_int,
    tiny_llama,
    tokenize_and_group,
)
from momos_hf.checkpoint import sha256_of
from momos_hf.config import FITS, SCOPES, TRAIN_MODES
from momos_hf.fit import NEEDS_INPUT_MOMENTS
from momos_hf.metrics import load_metric, token_losses
from momos_hf.report import is_generated_card, render_card
from momos_hf.train import (
    ProjectionSchedule,
    distillation_loss,
    hidden_state_loss,
    momos_state_digest,
    trainable_digest,
)

STEP_FILE = "momos_step.json"
# What a run writes into --output_dir besides step_N folders and a README (a user's README is kept).
RUN_FILES = (UPLOADABLE - {"README.md"}) | {"config.json", "adapter_config.json", "complexity.json"}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")
# Flags that leave the trained weights as they are; every other one is part of a training checkpoint's settings,
# and a resume with other values is refused.
RESULT_NEUTRAL = {
    "output_dir",
    "resume_from_checkpoint",
    "report_to",
    "logging_steps",
    "eval_steps",
    "per_device_eval_batch_size",
    "max_eval_samples",
    "complexity_every",
    "complexity_budget",
    "checkpointing_steps",
    "preprocessing_num_workers",
    "push_to_hub",
    "hub_model_id",
    "hub_token_file",
    "refused_hub_token",
    "hub_public",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="finetune.py", description="MoMos-aware training of a causal LM with Accelerate")
    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="local folder or Hub id of a pretrained causal LM")
    model.add_argument("--model_config", help="JSON config to train from scratch (default: a 1M-parameter Llama)")
    model.add_argument(
        "--tokenizer_name", help="tokenizer folder or Hub id (default: the model's, else an embedded byte tokenizer)"
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="a `datasets` name (Hub or local script/folder)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_file", help=".txt, .json/.jsonl or .csv")
    data.add_argument("--validation_file")
    data.add_argument("--validation_split_percentage", type=number_in(int, 1, 99, name="percentage"), default=10)
    data.add_argument("--text_column")
    data.add_argument("--block_size", type=positive_int, default=128, help="tokens per training example")
    data.add_argument("--max_train_samples", type=positive_int, help="use only the first N training blocks")
    data.add_argument("--max_eval_samples", type=positive_int, help="evaluate on the first N validation blocks only")
    data.add_argument("--preprocessing_num_workers", type=number_in(int, 1, 256, name="workers"))
    momos = p.add_argument_group("MoMos")
    momos.add_argument("--k", type=positive_int, default=256)
    momos.add_argument("--s", type=positive_int, default=16)
    momos.add_argument("--motif_scope", choices=SCOPES, default="layer")
    momos.add_argument(
        "--fit", choices=FITS, default="kmeans", help="how motifs and mosaic are fitted (momos_hf.fit.methods)"
    )
    momos.add_argument("--scale", action="store_true")
    momos.add_argument(
        "--motif_bits", type=motif_bits_int, default=None, help="q-bit motifs, 2-16 (default: the motif dtype's width)"
    )
    momos.add_argument(
        "--calibration_batches",
        type=positive_int,
        default=16,
        help="training batches whose inputs calibrate --fit data-aware",
    )
    momos.add_argument(
        "--train_mode",
        choices=("dense",) + TRAIN_MODES,
        default="motifs",
        help="what trains (see MoMosConfig.train_mode); dense: the baseline, no conversion",
    )
    momos.add_argument(
        "--project_every",
        type=non_negative_int,
        default=50,
        help="optimizer steps between projections in projected/ste modes (0: each epoch end, as the paper)",
    )
    momos.add_argument("--modules_to_save", nargs="*", default=None, help="dense modules trained in `motifs` mode")
    momos.add_argument("--distill", action="store_true", help="distil from the dense starting model")
    momos.add_argument(
        "--distill_alpha",
        type=number_in(float, 0, 1),
        default=0.5,
        help="weight of the KL term (1 - alpha on the LM loss)",
    )
    momos.add_argument("--distill_temperature", type=number_in(float, 0, 100, low_open=True), default=2.0)
    momos.add_argument(
        "--distill_hidden_weight",
        type=number_in(float, 0, 1000),
        default=0.0,
        help="weight of a hidden-state MSE term",
    )
    lora = p.add_argument_group("LoRA adapters on a MoMos checkpoint (--model_name_or_path)")
    lora.add_argument(
        "--lora_r",
        type=number_in(int, 1, 4096, name="lora_r"),
        help="train LoRA adapters of this rank; the MoMos base stays frozen",
    )
    lora.add_argument(
        "--lora_alpha",
        type=number_in(float, 0, 65536, low_open=True),
        help="LoRA scaling numerator (default: 2 * --lora_r)",
    )
    lora.add_argument("--lora_dropout", type=number_in(float, 0, 1, high_open=True), default=0.05)
    lora.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=["all-linear"],
        help="module names, or all-linear (every MoMos matrix layer and dense linear layer, not the head)",
    )
    train = p.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=positive_int, default=8)
    train.add_argument("--per_device_eval_batch_size", type=positive_int, default=8)
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    train.add_argument("--learning_rate", type=number_in(float, 0, 1, low_open=True), default=1e-3)
    train.add_argument("--weight_decay", type=number_in(float, 0, 1), default=0.0)
    train.add_argument("--lr_scheduler_type", default="linear", choices=[kind.value for kind in SchedulerType])
    train.add_argument("--num_warmup_steps", type=non_negative_int, default=0)
    train.add_argument("--num_train_epochs", type=positive_int, default=1)
    train.add_argument("--max_steps", type=positive_int, default=None, help="overrides --num_train_epochs")
    train.add_argument(
        "--eval_steps", type=non_negative_int, default=0, help="evaluate every N optimizer steps (0: at the end only)"
    )
    train.add_argument("--logging_steps", type=positive_int, default=10)
    train.add_argument(
        "--complexity_every",
        type=non_negative_int,
        default=0,
        help="log compressibility, BDM and entropy of the weights every N steps (0: off); written to complexity.json",
    )
    train.add_argument(
        "--complexity_budget",
        type=number_in(float, 0, 1),
        default=0.1,
        help="largest share of the wall time tracking may take (a due measurement that would exceed it "
        "is skipped; 0: no limit)",
    )
    train.add_argument(
        "--checkpointing_steps", type=non_negative_int, default=0, help="save the training state every N steps"
    )
    train.add_argument("--resume_from_checkpoint", help="a step_N folder written by --checkpointing_steps")
    train.add_argument("--output_dir", default="momos-out")
    train.add_argument("--seed", type=seed_int, default=42)
    train.add_argument("--report_to", default="none", help="an Accelerate tracker (tensorboard, wandb, ...) or 'none'")
    train.add_argument(
        "--push_to_hub", action="store_true", help="upload the checkpoint, tokenizer and card at the end"
    )
    train.add_argument("--hub_model_id")
    add_token_arguments(train, "--hub_token")
    train.add_argument(
        "--hub_public",
        action="store_true",
        help="create the Hub repository public (default: private, as publishing a compressed copy of a "
        "model is a decision about its license, not a default)",
    )
    args = p.parse_args(argv)
    if args.model_name_or_path and args.model_config:
        p.error("give --model_name_or_path or --model_config, not both")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    if args.hub_token_file and not args.push_to_hub:
        p.error("--hub_token_file is used with --push_to_hub only")
    if args.hub_token_file:
        try:
            read_token_file(args.hub_token_file)  # checked now, not after training; read again to push
        except ValueError as err:
            p.error(str(err))
    if args.push_to_hub and (args.train_mode == "dense" or args.lora_r):
        p.error("--push_to_hub publishes MoMos checkpoints; upload a dense run or an adapter with `hf upload`")
    if args.lora_r and not args.model_name_or_path:
        p.error("--lora_r trains adapters on a MoMos checkpoint: give it with --model_name_or_path")
    if args.lora_r and args.distill:
        p.error("--lora_r and --distill: distillation needs the dense model, which a MoMos checkpoint does not hold")
    for flag in ("model_name_or_path", "tokenizer_name", "dataset_name"):
        if getattr(args, flag) is not None and not is_present_or_hub_id(getattr(args, flag)):
            p.error(f"--{flag} {getattr(args, flag)} is neither a local path nor a Hub id (owner/name)")
    for flag in ("model_config", "resume_from_checkpoint"):
        if getattr(args, flag) is not None and not Path(getattr(args, flag)).exists():
            p.error(f"--{flag} {getattr(args, flag)} does not exist")
    return args


def is_present_or_hub_id(name: str) -> bool:
    """Whether `name` exists here or could be a Hub id (`name` or `owner/name`, no path syntax)."""
    return Path(name).exists() or (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith("."))


def momos_config(args: argparse.Namespace) -> MoMosConfig:
    return MoMosConfig(
        k=args.k,
        s=args.s,
        motif_scope=args.motif_scope,
        fit=args.fit,
        scale=args.scale,
        motif_bits=args.motif_bits,
        train_mode=args.train_mode,
        project_every=args.project_every,
        modules_to_save=args.modules_to_save,
        seed=args.seed,
    )


def run_kind(args: argparse.Namespace) -> str:
    return "LoRA" if args.lora_r else ("dense" if args.train_mode == "dense" else "MoMos")


def finished_run_kind(folder: Path) -> Optional[str]:
    """The kind of the finished run of this recipe whose output `folder` holds (None: none)."""
    if not (folder / "eval_results.json").is_file():
        return None
    if (folder / "adapter_config.json").is_file():
        return "LoRA"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return "MoMos" if isinstance(quantization, dict) and quantization.get("quant_method") == "momos" else "dense"


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse, before any work, an --output_dir whose files the run would overwrite, unless it holds a finished run
    of the same kind (a rerun). Files a run does not write (a README, notes) are kept as they are."""
    folder, kind = Path(args.output_dir), run_kind(args)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {folder} is a file, not a folder")
    if args.model_name_or_path and folder.resolve() == Path(args.model_name_or_path).resolve():
        raise ValueError(f"--output_dir {folder} is the --model_name_or_path folder: give a folder of its own")
    if not folder.is_dir():
        return
    clashes = sorted(p.name for p in folder.iterdir() if p.name in RUN_FILES or p.name.endswith(WEIGHT_SUFFIXES))
    if clashes and finished_run_kind(folder) != kind:
        raise ValueError(
            f"--output_dir {folder} holds files a {kind} run would overwrite ({', '.join(clashes[:4])}) and is not "
            f"the output of a finished {kind} run of this recipe: give a new or empty folder"
        )


def from_local_or_hub(loader, flag: str, name: str):
    """`loader(name)`, its failure to find `name` (offline, missing, no such repository) one line naming the flag."""
    try:
        return loader(name)
    except OSError as err:
        raise ValueError(
            f"{flag} {name} cannot be loaded: {str(err).splitlines()[0] if str(err) else err!r}"
        ) from None


def load_model_and_tokenizer(args: argparse.Namespace):
    if args.tokenizer_name or args.model_name_or_path:
        flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
        tokenizer = from_local_or_hub(
            AutoTokenizer.from_pretrained, flag, args.tokenizer_name or args.model_name_or_path
        )
    else:
        tokenizer = byte_tokenizer()
    if args.model_name_or_path:
        model = from_local_or_hub(
            AutoModelForCausalLM.from_pretrained, "--model_name_or_path", args.model_name_or_path
        )
    elif args.model_config:
        config = AutoConfig.for_model(**json.loads(Path(args.model_config).read_text()))
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = tiny_llama(args.seed, vocab_size=len(tokenizer))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        if momos_layers(model):  # a MoMos embedding has no rows to add
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens and the MoMos checkpoint {args.model_name_or_path} "
                f"{model.get_input_embeddings().num_embeddings} embeddings: give the checkpoint's own tokenizer"
            )
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def training_loss(model, teacher, batch, args) -> torch.Tensor:
    """Language-model loss, blended with distillation from the dense teacher when asked."""
    want_hidden = teacher is not None and args.distill_hidden_weight > 0
    out = model(**batch, output_hidden_states=want_hidden)
    if teacher is None:
        return out.loss
    with torch.no_grad():
        reference = teacher(input_ids=batch["input_ids"], output_hidden_states=want_hidden)
    loss = (1 - args.distill_alpha) * out.loss + args.distill_alpha * distillation_loss(
        out.logits, reference.logits, args.distill_temperature
    )
    if want_hidden:
        loss = loss + args.distill_hidden_weight * hidden_state_loss(out.hidden_states, reference.hidden_states)
    return loss


@torch.no_grad()
def evaluate(model, dataloader, accelerator) -> dict[str, float]:
    """Token-weighted validation loss and perplexity (`momos_hf.metrics` perplexity), over every rank's share."""
    model.eval()
    metric = load_metric("perplexity", keep_in_memory=True)  # in memory: ranks share no cache file
    for batch in tqdm(dataloader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        losses, tokens = accelerator.gather_for_metrics(token_losses(model(**batch).logits, batch["labels"]))
        metric.add_batch(loss=losses.tolist(), tokens=tokens.tolist())
    model.train()
    result = metric.compute()
    return {"eval_loss": result["eval_loss"], "perplexity": result["perplexity"]}


def momos_figures(model) -> dict[str, float]:
    report = complexity_report(model, max_bytes=2**20)
    figures = {"bits_per_weight": report.bits_per_weight}
    figures.update({f"{name}_ratio": ratio for name, ratio in report.compression_ratios.items()})
    if report.bdm_bits is not None:
        figures["bdm_bits_per_sign"] = report.bdm_bits / report.bdm_sign_bits
    return figures


def result_settings(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Every setting that changes what a run trains (as JSON values): the flags outside RESULT_NEUTRAL, the world
    size and the mixed precision."""
    settings = {name: value for name, value in vars(args).items() if name not in RESULT_NEUTRAL}
    settings.update(world_size=accelerator.num_processes, mixed_precision=str(accelerator.mixed_precision))
    return json.loads(json.dumps(settings))


def save_training_state(accelerator: Accelerator, output_dir: Path, step: int, settings: dict) -> Path:
    """`accelerator.save_state` into `step_N`, made whole before it gets its name: written as `step_N.partial`,
    then the sha256 of every file goes into momos_step.json, then the rename. A kill leaves at most a
    `.partial` folder, which the next save of that step replaces."""
    folder = output_dir / f"step_{step}"
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        for old in (partial, folder):  # only training checkpoints this recipe wrote are replaced
            if old.exists() and (old == partial or (old / STEP_FILE).exists()):
                shutil.rmtree(old)
            elif old.exists():
                raise ValueError(f"{old} exists and is not a training checkpoint written by this recipe")
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.relative_to(partial).as_posix(): sha256_of(p) for p in sorted(partial.rglob("*")) if p.is_file()}
        record = {"step": step, "files": files, "settings": settings}
        (partial / STEP_FILE).write_text(json.dumps(record, indent=1))
        os.replace(partial, folder)
    accelerator.wait_for_everyone()
    return folder


def load_training_state(accelerator: Accelerator, folder: Path, max_steps: int, settings: dict) -> int:
    """Check a `step_N` folder whole (every file's sha256, before any of its pickles is read) and that it was saved
    with these `settings`, and load it; returns its step."""
    try:
        record = json.loads((folder / STEP_FILE).read_text())
        step, files, saved = int(record["step"]), dict(record["files"]), dict(record["settings"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder} is not a complete training checkpoint ({STEP_FILE}: {err})") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {STEP_FILE}
    if present != set(files) or any(sha256_of(folder / name) != digest for name, digest in files.items()):
        raise ValueError(
            f"{folder} is corrupted: its files differ from those recorded in {STEP_FILE} when it was saved"
        )
    if step >= max_steps:
        raise ValueError(f"{folder} is at step {step}, and --max_steps is {max_steps}: nothing is left to train")
    differing = sorted(name for name in saved.keys() | settings.keys() if saved.get(name) != settings.get(name))
    if differing:
        raise ValueError(
            f"{folder} was saved by a run with other settings: "
            + "; ".join(f"{name} {saved.get(name)!r} there, {settings.get(name)!r} here" for name in differing)
        )
    try:
        accelerator.load_state(folder)
    except (RuntimeError, KeyError, ValueError) as err:  # a model or optimizer of another shape
        raise ValueError(
            f"{folder} was saved by a run with other settings (model, train mode or optimizer): "
            f"{str(err).splitlines()[0]}"
        ) from None
    return step


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_output_dir(args)
    momos_mode = args.train_mode != "dense" and not args.lora_r  # MoMos layers are converted and trained here
    config = momos_config(args) if momos_mode else None  # its checks, before anything is loaded
    # Without a GPU, Accelerate must be told to use the CPU, or each launched process silently runs alone.
    # The data order is a function of (seed, epoch), so a resumed run sees the batches the interrupted one would have.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    accelerator.print(
        f"world size {accelerator.num_processes}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}, train mode {args.train_mode}"
    )
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args)
    with accelerator.main_process_first():
        raw = load_text_datasets(
            args.dataset_name,
            args.dataset_config_name,
            args.train_file,
            args.validation_file,
            args.validation_split_percentage,
        )
        data = tokenize_and_group(raw, tokenizer, args.block_size, args.text_column, args.preprocessing_num_workers)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    train_dl = DataLoader(
        data["train"], shuffle=True, batch_size=args.per_device_train_batch_size, collate_fn=default_data_collator
    )
    eval_dl = DataLoader(
        data["validation"], batch_size=args.per_device_eval_batch_size, collate_fn=default_data_collator
    )

    teacher = copy.deepcopy(model).eval().requires_grad_(False) if args.distill else None
    if args.lora_r:
        if not momos_layers(model):
            raise ValueError(
                f"--lora_r trains adapters on a MoMos checkpoint, and {args.model_name_or_path} has no MoMos layers"
            )
        targets = "all-linear" if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
        model = get_lora_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha or 2 * args.lora_r,
                lora_dropout=args.lora_dropout,
                target_modules=targets,
            ),
        )
    if momos_mode:
        calibration = (
            list(itertools.islice(train_dl, args.calibration_batches)) if args.fit in NEEDS_INPUT_MOMENTS else None
        )
        model = get_momos_model(model, config, calibration)
    trainable = [p for p in model.parameters() if p.requires_grad]
    accelerator.print(
        f"trainable parameters {sum(p.numel() for p in trainable):,d} of "
        f"{sum(p.numel() for p in model.parameters()):,d}"
    )
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        args.num_warmup_steps * accelerator.num_processes,
        max_steps * accelerator.num_processes,
    )
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, scheduler
    )
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    logged = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and "token" not in k}
    accelerator.init_trackers("momos-finetune", logged)  # secrets are never logged

    step, skip_batches, settings = 0, 0, result_settings(args, accelerator)
    if args.resume_from_checkpoint:
        step = load_training_state(accelerator, Path(args.resume_from_checkpoint), max_steps, settings)
        skip_batches = (step % steps_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"resumed from step {step}")
    initial = evaluate(model, eval_dl, accelerator)
    accelerator.print(f"step {step}: eval loss {initial['eval_loss']:.4f}, perplexity {initial['perplexity']:.2f}")
    schedule = ProjectionSchedule(model) if momos_mode else None
    train_start = time.perf_counter()

    tracker = (
        ComplexityTracker(every=args.complexity_every, max_overhead=args.complexity_budget or None)
        if args.complexity_every
        else None
    )
    if tracker is not None:
        tracker.track(model, step)
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    for epoch in range(step // steps_per_epoch, math.ceil(max_steps / steps_per_epoch)):
        train_dl.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dl, skip_batches) if skip_batches else train_dl
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, teacher, batch, args)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if schedule is not None:
                schedule.step_end(step)
            if tracker is not None and (row := tracker.track(model, step, loss.item())) is not None:
                accelerator.log(
                    {f"complexity/{key}": value for key, value in row.items() if key not in ("step", "loss")},
                    step=step,
                )
            if step % args.logging_steps == 0:
                train_loss = accelerator.gather(loss.detach().float()).mean().item()
                progress.set_postfix(loss=f"{train_loss:.3f}")
                accelerator.log({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}, step=step)
            if args.eval_steps and step % args.eval_steps == 0:
                metrics = evaluate(model, eval_dl, accelerator) | (momos_figures(model) if momos_mode else {})
                accelerator.log(metrics, step=step)
                accelerator.print(
                    f"step {step}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
                )
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_training_state(accelerator, Path(args.output_dir), step, settings)
            if step >= max_steps:
                break
        if schedule is not None:
            schedule.epoch_end(step)
        if step >= max_steps:
            break
    progress.close()
    if schedule is not None:
        schedule.train_end(step)  # finish exactly in MoMos form
    train_seconds = time.perf_counter() - train_start
    if tracker is not None:
        accelerator.print(
            f"complexity tracking: {len(tracker.history)} measurements, {tracker.overhead:.1%} of training time"
        )
        if accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "complexity.json").write_text(json.dumps(tracker.history, indent=1))
    metrics = evaluate(model, eval_dl, accelerator)
    metrics.update(
        {
            "initial_eval_loss": initial["eval_loss"],
            "steps": step,
            "world_size": accelerator.num_processes,
            "train_seconds": train_seconds,
            "projection_seconds": schedule.seconds if schedule else 0.0,
        }
    )
    if tracker is not None:
        metrics["complexity_overhead"] = tracker.overhead
    if momos_mode or args.lora_r:
        state = momos_state_digest(model) if momos_mode else trainable_digest(model)
        digests = accelerator.gather_for_metrics([state], use_gather_object=True)
        metrics["ranks_agree"] = len(set(digests)) == 1
        what = "MoMos state" if momos_mode else "adapter"
        accelerator.print(f"{what} identical on all {accelerator.num_processes} ranks: {metrics['ranks_agree']}")
    if momos_mode:
        metrics.update(momos_figures(model))
    accelerator.print(
        f"final: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f} "
        f"(from {initial['eval_loss']:.4f})"
    )
    accelerator.log(metrics, step=step)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathered whole from every rank when sharded (FSDP)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if momos_mode:
            unwrapped.save_pretrained(args.output_dir, tokenizer=tokenizer, state_dict=state_dict)
        elif args.lora_r:  # the adapter alone, with a card naming the base checkpoint and how to load it
            unwrapped.save_pretrained(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
        else:
            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
            tokenizer.save_pretrained(args.output_dir)
        (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        if momos_mode:
            readme = Path(args.output_dir) / "README.md"
            if not readme.exists() or is_generated_card(readme):  # a README of the user's is kept
                readme.write_text(render_card(args.output_dir, args.hub_model_id, results=metrics), encoding="utf-8")
            if args.push_to_hub:
                push_folder(
                    args.output_dir,
                    args.hub_model_id,
                    private=not args.hub_public,
                    token=read_token_file(args.hub_token_file) if args.hub_token_file else None,
                    commit_message=f"MoMos training, step {step}",
                )
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # torch's gloo backend frees the tensors of finished collectives on its worker thread, which needs the
        # GIL; releasing the process group (the DDP model going out of scope) while that is pending deadlocks
        # in ~ProcessGroupGloo (seen one run in a few on a busy machine). Let the worker finish first.
        time.sleep(1.0)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except (ValueError, OSError) as err:  # bad input or a missing file/model: one line, exit status 2
        print(f"finetune.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
