"""The programs: the `momos-hf` command line (`cli`, its argument types in `args`), the embedded demo (`demo`),
text data helpers (`text`)."""

from .args import OneLineParser, add_token_arguments
from .demo import tiny_llama
from .text import byte_tokenizer, calibration_batches, load_text_datasets, tokenize_and_group

__all__ = [
    "OneLineParser",
    "add_token_arguments",
    "byte_tokenizer",
    "calibration_batches",
    "load_text_datasets",
    "tiny_llama",
    "tokenize_and_group",
]
