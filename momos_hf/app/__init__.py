"""The programs: the `momos-hf` command line (`cli`, its argument types in `args`), the embedded demo (`demo`),
text data helpers (`text`)."""

from ..integrations.hub import UPLOADABLE, push_folder, read_token_file
from .args import (
    OneLineParser,
    add_token_arguments,
    motif_bits_int,
    non_negative_int,
    number_in,
    positive_int,
    seed_int,
)
from .demo import tiny_llama
from .text import byte_tokenizer, calibration_batches, load_text_datasets, tokenize_and_group

__all__ = [
    "UPLOADABLE",
    "OneLineParser",
    "add_token_arguments",
    "motif_bits_int",
    "non_negative_int",
    "number_in",
    "positive_int",
    "push_folder",
    "read_token_file",
    "seed_int",
    "byte_tokenizer",
    "calibration_batches",
    "load_text_datasets",
    "tiny_llama",
    "tokenize_and_group",
]
