"""Folder manifests: the image files under a folder, found by one scan and cached, so that the processes of a run
(and later runs) read one small file instead of each walking the tree.

Where: beside the folder, `.<folder name>.ldm-manifest.npz` in its parent (a hidden file: never taken for an image),
when the parent is writable; else `$LDM_CACHE_DIR/manifests/<sha256 of the absolute path>.npz` (~/.cache/ldm when
LDM_CACHE_DIR is unset). Not inside the folder: writing there would change the folder's own modification time, which
the manifest records.

What: the relative paths of the image files in `FolderSource` order (sorted by path components, hidden files and
__MACOSX/ left out, symlinked files followed, symlinked folders not entered: exactly what the scan `Path.rglob` did
before) and every folder scanned with its modification time. The walk visits each folder's entries in sorted order,
which lists the files sorted by path components without a global sort, and it stats no file (the directory entries'
types suffice): a file's size and time are read only for the data fingerprint (`ImageSource.fingerprint`).

When it is trusted: while every folder it lists still has the recorded modification time. Adding, removing or
renaming a file changes its folder's time, so these are caught by one stat per folder (1,000 for ImageNet) instead of
a listing of every folder. (A file rewritten in place keeps its name: the list stays right, and the fingerprint, which
stats the files, sees the change.) A folder modified within RACY_S seconds before the scan could gain a file in the
same clock tick without a visible change (file systems with coarse times), so a scan that meets one is used but not
written (git's "racy" rule); the next open scans again.

Concurrency: the first process to need a manifest holds an exclusive lock (fcntl.flock on a file in the cache
directory) while it scans and writes; the others wait on the lock and then read its result. Where locks do not work
every process scans for itself, with the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".ldm-manifest.npz"
RACY_S = 2.0  # FAT and some network file systems keep modification times to the second or two


@dataclass
class Manifest:
    """The image files under `root`: relative names in source order."""

    root: Path
    names: list[str]


def cache_dir() -> Path:
    """$LDM_CACHE_DIR, else ~/.cache/ldm (the directory evaluation caches its reference statistics under)."""
    return Path(os.environ.get("LDM_CACHE_DIR", Path.home() / ".cache" / "ldm")).expanduser()


def _cached_path(root: Path) -> Path:
    return cache_dir() / "manifests" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.npz"


# ------------------------------------------------------------------------------------------------------ scanning
def _walk(root: Path, is_image, is_junk) -> tuple[list[str], list[tuple[str, int]]]:
    """(image files as relative paths in path-component order, folders as (relative path, mtime_ns)) under `root`.

    Depth first, each folder's entries in sorted name order: that lists the files exactly as sorting their path
    components would (a folder's files and sub-folders interleave by name, as their components compare)."""
    files: list[str] = []
    folders: list[tuple[str, int]] = []

    def visit(folder: str, prefix: str) -> None:
        folders.append((prefix.rstrip(os.sep), os.stat(folder).st_mtime_ns))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if is_junk([entry.name]):  # hidden or __MACOSX (the ancestors were checked on the way down)
                continue
            try:
                if entry.is_dir(follow_symlinks=False):  # as Path.rglob: symlinked folders are not entered
                    visit(entry.path, prefix + entry.name + os.sep)
                elif is_image(entry.name) and entry.is_file():  # a symlinked file counts (is_file follows it)
                    files.append(prefix + entry.name)
            except OSError:  # vanished, or a dangling link: no file to read
                continue

    visit(str(root), "")
    return files, folders


def scan(root: Path, is_image, is_junk) -> tuple[Manifest, list[tuple[str, int]], float]:
    """Walk `root`: (the manifest, its folders with their mtimes, the time the walk started)."""
    started = time.time()
    files, folders = _walk(root, is_image, is_junk)
    return Manifest(root=root, names=files), folders, started


# ------------------------------------------------------------------------------------------------------ the file
def _write(path: Path, manifest: Manifest, folders: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, format_version=np.int64(FORMAT_VERSION), root=np.array(str(manifest.root)),
                 names=np.frombuffer("\n".join(manifest.names).encode(), dtype=np.uint8),
                 folders=np.frombuffer("\n".join(name for name, _ in folders).encode(), dtype=np.uint8),
                 folder_mtimes_ns=np.array([m for _, m in folders], dtype=np.int64))
    os.replace(tmp, path)


def _read(path: Path, root: Path) -> Manifest | None:
    """The manifest at `path` if it describes `root` as it is now (every folder's mtime unchanged), else None."""
    try:
        with np.load(path) as data:
            if int(data["format_version"]) != FORMAT_VERSION or str(data["root"]) != str(root):
                return None
            folders = data["folders"].tobytes().decode().split("\n")
            for rel, mtime in zip(folders, data["folder_mtimes_ns"].tolist()):
                if os.stat(root / rel).st_mtime_ns != mtime:
                    return None
            blob = data["names"].tobytes().decode()
            return Manifest(root=root, names=blob.split("\n") if blob else [])
    except (OSError, ValueError, KeyError, EOFError):  # missing, unreadable, or a folder gone: scan again
        return None


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an exclusive lock for `root`'s manifest (a no-op where locks are unavailable)."""
    lock = _cached_path(root).with_suffix(".lock")
    try:
        import fcntl

        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def folder_manifest(root: str | Path, is_image, is_junk, *, use_cache: bool = True) -> Manifest:
    """The image files under `root` (see the module docstring): a valid cached manifest, else one scan, written
    beside the data (or in the cache directory) for the next process. `is_image(name)` and `is_junk(parts)` decide
    what counts, so the rules stay those of ldm.data.sources."""
    root = Path(root).absolute()
    if not use_cache:
        return scan(root, is_image, is_junk)[0]
    candidates = [root.parent / f".{root.name}{MANIFEST_SUFFIX}", _cached_path(root)]
    for path in candidates:
        if (found := _read(path, root)) is not None:
            return found
    with _exclusive(root):
        for path in candidates:  # another process may have written it while this one waited
            if (found := _read(path, root)) is not None:
                return found
        manifest, folders, started = scan(root, is_image, is_junk)
        if any(mtime >= (started - RACY_S) * 1e9 for _, mtime in folders):
            log.debug("%s changed within %.0f s of the scan: manifest not cached", root, RACY_S)
            return manifest
        for path in candidates:
            try:
                _write(path, manifest, folders)
                log.debug("file manifest of %s (%d images) written to %s", root, len(manifest.names), path)
                break
            except OSError:  # a read-only data folder: the cache directory next
                continue
        return manifest
