"""Text data: an embedded byte-level tokenizer, loading through `datasets`, the tokenize-then-group-into-
blocks step of the Transformers language-modelling examples, and calibration batches from a text file."""

from __future__ import annotations

import copy
import os
from importlib import resources
from typing import Optional

import torch
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
CALIBRATION_BUDGET_BYTES = 2**30  # token ids and masks of the calibration windows; the model's activations come on top


def embedded_text() -> str:
    """About 39 KB of Shakespeare's sonnets (public domain), shipped in `momos_hf/data/`."""
    return resources.files("momos_hf.app").joinpath("data/sonnets.txt").read_text(encoding="utf-8")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (256) plus `<|endoftext|>`; needs no download and can encode
    any text. Used when a model is trained from a config without a tokenizer."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def load_text_datasets(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_file: Optional[str] = None,
    validation_file: Optional[str] = None,
    validation_split_percentage: int = 10,
) -> DatasetDict:
    """`train` and `validation` splits from a Hub/local dataset name, from text/json/csv files, or (with no
    argument) from the embedded sonnets. Without a validation split, the last percentage of train is used."""
    if dataset_name is not None:
        raw = load_dataset(dataset_name, dataset_config_name)
    elif train_file is not None:
        files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
        extension = os.path.splitext(train_file)[1].lstrip(".")
        builder = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "csv": "csv"}.get(extension)
        if builder is None:
            raise ValueError(f"--train_file {train_file}: expected a .txt, .json, .jsonl or .csv file")
        for path in files.values():
            check_text_file(path)
        raw = load_dataset(builder, data_files=files)
    else:
        raw = DatasetDict({"train": Dataset.from_dict({"text": embedded_text().splitlines(keepends=True)})})
    if "validation" not in raw:
        cut = len(raw["train"]) * (100 - validation_split_percentage) // 100
        raw = DatasetDict(
            {
                "train": raw["train"].select(range(cut)),
                "validation": raw["train"].select(range(cut, len(raw["train"]))),
            }
        )
    return raw


def check_text_file(path: str) -> None:
    """Refuse a data file that is missing, empty, or not UTF-8 text, naming it (`datasets` would fail
    later with chained tracebacks that never say so)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    with open(path, "rb") as f:
        head = f.read(2**20)
    if not head.strip():
        raise ValueError(f"{path} is empty: it holds no text to train or evaluate on")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not a multi-byte character cut at the end of the chunk
            raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): is it a binary file?") from None


def tokenize_and_group(
    raw: DatasetDict, tokenizer, block_size: int, text_column: Optional[str] = None, num_proc: Optional[int] = None
) -> DatasetDict:
    """Tokenize every split, concatenate the token streams and cut them into `block_size` blocks with
    `labels` (the remainder is dropped). `datasets` caches both steps for file-backed data."""
    column = text_column or ("text" if "text" in raw["train"].column_names else raw["train"].column_names[0])
    if column not in raw["train"].column_names:
        raise ValueError(f"--text_column {column!r} is not a column of the data: {raw['train'].column_names}")

    def tokenize(batch):
        return tokenizer(batch[column])

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        total = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = raw.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=raw["train"].column_names, desc="tokenize"
    )
    grouped = tokenized.map(
        group,
        batched=True,
        num_proc=num_proc,
        remove_columns=tokenized["train"].column_names,
        desc=f"group into blocks of {block_size}",
    )
    for split, data in grouped.items():
        if len(data) == 0:
            raise ValueError(f"the {split} split has fewer than block_size={block_size} tokens; lower --block_size")
    return grouped


def check_calibration_size(num_samples: int, seq_len: int, budget_bytes: int = CALIBRATION_BUDGET_BYTES) -> None:
    """Refuse, before anything is allocated, calibration windows whose token ids and masks alone exceed
    `budget_bytes`."""
    needed = num_samples * seq_len * 2 * 8  # int64 input ids and attention mask per token
    if needed > budget_bytes:
        raise ValueError(
            f"{num_samples} calibration windows of {seq_len} tokens need {needed / 2**30:.1f} GiB for their token ids "
            f"alone, over the {budget_bytes / 2**30:.1f} GiB allowed: ask for fewer --calibration_samples"
        )


def calibration_batches(
    tokenizer,
    text_file: str,
    num_samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    vocab_size: Optional[int] = None,
) -> list[dict]:
    """`num_samples` windows of `seq_len` tokens, evenly spaced over a text file (loaded with `datasets`),
    in batches of model inputs for `get_momos_model(..., calibration_data=...)`. Deterministic. With `vocab_size`,
    a tokenizer giving ids the model has no embedding for is refused."""
    check_calibration_size(num_samples, seq_len)
    check_text_file(text_file)
    lines = load_dataset("text", data_files=text_file, split="train")["text"]
    # A copy: encoding without truncation switches off the tokenizer's own truncation and padding settings,
    # which a save of the tokenizer afterwards would then lose.
    ids = copy.deepcopy(tokenizer)("\n".join(lines), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    seq_len = min(seq_len, getattr(tokenizer, "model_max_length", seq_len) or seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"{text_file} has {len(ids)} tokens, fewer than one calibration window of {seq_len}")
    if num_samples > len(ids) - seq_len + 1:
        raise ValueError(
            f"{text_file} gives {len(ids) - seq_len + 1} distinct windows of {seq_len} tokens, fewer than the "
            f"{num_samples} calibration samples asked"
        )
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer gives token id {int(ids.max())} for {text_file}, and the model has {vocab_size} "
            "embeddings: the tokenizer is not this model's"
        )
    starts = torch.linspace(0, len(ids) - seq_len, num_samples).long()
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
