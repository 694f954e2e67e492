"""Hugging Face Hub references: `hf://org/name[@revision][/path/in/repo]` -> a local path, and pushing a folder.

    hf://org/name                  the repository's snapshot folder (default branch)
    hf://org/name@v1.0             at a branch, tag or commit
    hf://org/name@main/vae         a folder or file inside it (a tokenizer subfolder, an official weights file)

`resolve_path` is called wherever ldm opens a tokenizer, generator or weights path, so every such option takes a
Hub reference; other paths pass through unchanged. It downloads through huggingface_hub's cache (HF_HUB_CACHE /
HF_HOME, read when called). With HF_HUB_OFFLINE=1 it only looks in that cache and fails with one line naming the
reference when the snapshot is not there. Revisions containing '/' (refs/pr/1) cannot be written in this syntax.

`push_folder` uploads a folder (an `ldm export` output) as one commit to a model repository, creating it if needed.
Ground floor: imports nothing from ldm.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_PREFIX = "hf://"
_HUB_REF = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?")


def is_hub_ref(path: str | os.PathLike | None) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(repo_id, revision or None, path inside the repository or None) of an hf:// reference."""
    m = _HUB_REF.fullmatch(ref)
    if m is None:
        raise ValueError(f"{ref!r} is not a Hub reference; expected hf://org/name[@revision][/path/in/repo]")
    sub = m["sub"].strip("/") if m["sub"] else None
    return m["repo"], m["rev"], sub or None


def offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (huggingface_hub's own reading of the variable)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_path(path: str | os.PathLike) -> str | os.PathLike:
    """A local path for `path`: hf:// references are fetched into (or, offline, found in) the Hub cache; anything else
    is returned as given. FileNotFoundError names the reference when it cannot be resolved."""
    if not is_hub_ref(path):
        return path
    repo_id, revision, sub = parse_hub_ref(str(path))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    patterns = None if sub is None else [sub, f"{sub}/*"]
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline())
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline():
            raise FileNotFoundError(f"{path}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it "
                                    f"first (unset HF_HUB_OFFLINE, or `hf download {repo_id}`)") from None
        raise FileNotFoundError(f"{path}: cannot reach the Hugging Face Hub and the repository is not cached") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{path}: {str(err).splitlines()[0]}") from None
    local = Path(folder) / sub if sub else Path(folder)
    if not local.exists():
        raise FileNotFoundError(f"{path}: repository {repo_id} has no {sub!r} at revision {revision or 'main'}")
    return str(local)


def push_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str, private: bool = False,
                token: str | None = None) -> str:
    """Upload `folder` to model repository `repo_id` (created if missing) as one commit; returns the commit URL."""
    if offline():
        raise ValueError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 forbids uploads; unset it to push")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
