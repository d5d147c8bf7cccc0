"""Argument parsing shared by `momos-hf` and the recipes: one-line errors, defaults shown once in help, range-checked
numbers, and token flags that take files, never secrets."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Optional


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each default once: not where the help text already speaks of it, nor for None or off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, `PROG: error: ...`, exit status 2 (`--help` shows usage), and
    whose help shows each default once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsOnceFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see --help)\n")


class _RefuseSecretValue(argparse.Action):
    """A token flag that refuses any value: a secret on the command line is shown whole by process lists and by
    launchers (`accelerate launch` prints a failed child's command line). It names the ways that keep it
    private, and never repeats the value."""

    def __init__(self, option_strings: list[str], dest: str, file_flag: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.file_flag = file_flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(
            f"{option_string} takes no value on the command line, where process lists and launchers show it: "
            f"set HF_TOKEN, log in with `hf auth login`, or give {self.file_flag} PATH (a file holding the token)"
        )


def add_token_arguments(parser: argparse.ArgumentParser, flag: str) -> None:
    """`FLAG_file PATH` for a Hub token kept in a file, and `FLAG` itself refusing a literal token."""
    file_flag = f"{flag}_file"
    parser.add_argument(
        file_flag,
        default=None,
        help="file holding the Hub token (default: HF_TOKEN, else the login of `hf auth login`); "
        "tokens are never taken on the command line",
    )
    parser.add_argument(flag, action=_RefuseSecretValue, file_flag=file_flag, dest=f"refused_{flag.lstrip('-')}")


def number_in(
    kind: Callable[[str], float],
    low: float,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    name: Optional[str] = None,
) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` (int or float) in `[low, high]` (open ends as asked; no `high`: no upper
    bound). NaN, infinities and values out of range are refused with the range, naming the flag."""
    if high is None:
        wanted = f"{'>' if low_open else '>='} {low}"
    else:
        wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str):
        value = kind(text)
        below = value < low or (low_open and value == low)
        above = high is not None and (value > high or (high_open and value == high))
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(
                f"must be {'a finite number ' if kind is float else ''}{wanted}, got {text}"
            )
        return value

    parse.__name__ = name or kind.__name__
    return parse


positive_int = number_in(int, 1, name="positive_int")
non_negative_int = number_in(int, 0, name="non_negative_int")
seed_int = number_in(int, 0, 2**32 - 1, name="seed")  # numpy's seeds, which Accelerate's set_seed also sets
motif_bits_int = number_in(int, 2, 16, name="motif_bits")
