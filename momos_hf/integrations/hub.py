"""Upload of MoMos checkpoints to a Hugging Face Hub (the endpoint in `HF_ENDPOINT`, huggingface.co by default).

Only an allow-list leaves the machine: config.json, the weight files its quantization config names (checked
against their sha256 first), the generation config, tokenizer files, the model card and evaluation results.
Everything else in the folder (training state, tracker logs, hidden folders, notes) stays. Every file is
checked before the first network call, and a repository is created private unless asked otherwise: a
compressed copy inherits its base model's license, so publishing it should be a decision, not a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi, constants

from ..checkpoint.verify import (
    read_checkpoint_config,
    verify_checkpoint,
    weight_file_names,
)
from ..report.card import render_card

# Files beside the weights that a model repository carries (tokenizers write some of these, never all).
UPLOADABLE = frozenset(
    {
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
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def read_token_file(path: Union[str, os.PathLike]) -> str:
    """The Hub token stored in the file at `path` (surrounding whitespace removed). Tokens are read from files,
    `HF_TOKEN` or huggingface_hub's login, never taken as command-line values, which process lists and launchers
    (`accelerate launch` on a failure) show whole. Errors name the file, never its content."""
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as err:
        raise ValueError(f"token file {path}: {err.strerror or err}") from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or len(data) > 4096 or not token.isprintable() or " " in token:
        raise ValueError(f"token file {path} does not hold one token (one line of printable ASCII, no spaces)")
    return token


def files_to_push(directory: Union[str, os.PathLike]) -> list[Path]:
    """The files of a MoMos checkpoint folder that a push uploads, after checking the checkpoint whole
    (checksums included) and that each file is a regular file inside the folder (a link may point only
    inside it)."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    quantization = config["quantization_config"]
    verify_checkpoint(directory, config)
    names = {"config.json", quantization["weights"], *weight_file_names(directory, quantization["weights"])}
    names |= {entry.name for entry in directory.iterdir() if entry.name in UPLOADABLE}
    root = directory.resolve()
    files = []
    for name in sorted(names):
        path = directory / name
        resolved = path.resolve()
        if not resolved.is_file() or resolved.parent != root:
            raise ValueError(
                f"{path} is not a regular file inside {directory} (a link to elsewhere?); it is not uploaded"
            )
        files.append(path)
    return files


def push_folder(
    directory: Union[str, os.PathLike],
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload MoMos model",
) -> str:
    """Upload the checkpoint in `directory` to `repo_id` in one commit (see the module docstring for what is
    uploaded), adding a model card as README.md when the folder has none. The repository is created if
    needed, private unless `private=False`. Returns the commit URL."""
    directory = Path(directory)
    files = files_to_push(directory)
    card = None if (directory / "README.md").exists() else render_card(directory, repo_id).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private is None else private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision).commit_url
    except Exception as err:  # network and Hub errors come in many classes; say which request failed, once
        raise OSError(
            f"the upload of {directory} to {repo_id} at {constants.ENDPOINT} failed: "
            f"{type(err).__name__}: {' '.join(str(err).split())}"
        ) from err
