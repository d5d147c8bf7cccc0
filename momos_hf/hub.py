"""Upload of MoMos checkpoints to a Hugging Face Hub (the endpoint in `HF_ENDPOINT`, huggingface.co by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi

from .card import render_card


def push_folder(
    directory: Union[str, os.PathLike],
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload MoMos model",
) -> str:
    """Create `repo_id` if needed and upload every file of the checkpoint folder in one commit, adding a
    model card as README.md when the folder has none. Returns the commit URL."""
    directory = Path(directory)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p)) for p in files]
    if not (directory / "README.md").exists():
        card = render_card(directory, repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return commit.commit_url
