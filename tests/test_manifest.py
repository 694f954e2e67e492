"""Folder manifests (ldm.data.manifest): the same files, order and fingerprint as the per-file scan they replace
(Path.rglob + stat, written out here as the reference), cached beside the folder or in the cache directory, trusted
while no folder's modification time changed, and not cached right after a change ("racy" folders)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import manifest
from ldm.data.sources import IMAGE_EXTENSIONS, FolderSource, is_junk

HOUR_NS = 3600 * 10**9


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((9, 9, 3), seed, dtype=np.uint8)).save(path, format="PNG")


def _age(root: Path, ns_ago: int = HOUR_NS) -> None:
    """Set every folder's modification time (root included) to `ns_ago` before now, out of the racy window."""
    t = time.time_ns() - ns_ago
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.utime(folder, ns=(t, t))


def _rglob_reference(root: Path) -> tuple[list[str], str]:
    """What FolderSource found and fingerprinted before manifests: Path.rglob, sorted Paths, a stat per file."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not is_junk(p.relative_to(root).parts))
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(str((str(p.relative_to(root)), st.st_size, st.st_mtime_ns)).encode())
    return [str(p.relative_to(root)) for p in files], h.hexdigest()[:16]


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data" / "animals"
    for k, rel in enumerate(["cat/1.png", "cat/2.PNG", "a-b/x.png", "a/x.png", "a/deep/er/y.webp", "dog/z.jpeg"]):
        _png(root / rel, k)
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / ".hidden" / "h.png")
    _png(root / "__MACOSX" / "cat" / "._1.png")
    (root / "cat" / "._2.png").write_bytes(b"\x00\x05\x16\x07")
    _png(root.parent / "elsewhere" / "linked.png", 9)
    (root / "dog" / "link.png").symlink_to(root.parent / "elsewhere" / "linked.png")  # a linked file: an image
    _png(root.parent / "outside" / "o.png", 8)
    (root / "linked_dir").symlink_to(root.parent / "outside", target_is_directory=True)  # not entered, as rglob
    return root


def test_manifest_lists_what_the_per_file_scan_found(tree):
    names, fingerprint = _rglob_reference(tree)
    src = FolderSource(tree)
    # "a/x.png" before "a-b/x.png": path components compare, not strings ('-' sorts before '/')
    assert src.names == names == ["a/deep/er/y.webp", "a/x.png", "a-b/x.png", "cat/1.png", "cat/2.PNG",
                                  "dog/link.png", "dog/z.jpeg"]
    assert src.fingerprint() == fingerprint  # latent caches and FID statistics keyed by it stay valid
    assert src.classes == ["a", "a-b", "cat", "dog"]
    assert (src.read(1) == 3).all() and src.paths[1] == tree / "a/x.png"  # written 4th (k = 3)


def test_manifest_is_cached_beside_the_folder_and_trusted_until_a_folder_changes(tree, monkeypatch):
    _age(tree)
    beside = tree.parent / f".{tree.name}{manifest.MANIFEST_SUFFIX}"
    first = FolderSource(tree)
    assert beside.is_file()
    scans = []
    real_scan = manifest.scan
    monkeypatch.setattr(manifest, "scan", lambda *a: scans.append(1) or real_scan(*a))
    assert FolderSource(tree).names == first.names and not scans  # read, not scanned
    _png(tree / "cat" / "3.png", 3)  # a new file changes its folder's time
    assert FolderSource(tree).names == _rglob_reference(tree)[0] and len(scans) == 1
    assert FolderSource(tree).names == _rglob_reference(tree)[0] and len(scans) == 2  # racy: not cached yet
    _age(tree, 2 * HOUR_NS)
    FolderSource(tree)
    assert len(scans) == 3
    src = FolderSource(tree)
    assert len(scans) == 3 and "cat/3.png" in src.names and src.fingerprint() == _rglob_reference(tree)[1]
    (tree / "a" / "deep" / "er" / "y.webp").unlink()  # removed deep down: its own folder's time changes
    assert "a/deep/er/y.webp" not in FolderSource(tree).names and len(scans) == 4


def test_read_only_parent_uses_the_cache_dir(tree, monkeypatch):
    _age(tree)
    beside = tree.parent / f".{tree.name}{manifest.MANIFEST_SUFFIX}"
    real_write = manifest._write

    def write(path, *args):
        if path == beside:
            raise PermissionError(f"read-only: {path}")
        real_write(path, *args)

    monkeypatch.setattr(manifest, "_write", write)
    names = FolderSource(tree).names
    cached = list((Path(os.environ["LDM_CACHE_DIR"]) / "manifests").glob("*.npz"))
    assert not beside.exists() and len(cached) == 1
    monkeypatch.setattr(manifest, "scan", lambda *a: pytest.fail("scanned although the cache holds the manifest"))
    assert FolderSource(tree).names == names


def test_a_folder_changed_just_before_the_scan_is_not_cached(tree):
    FolderSource(tree)  # the tree was written a moment ago: within RACY_S of the scan
    assert not (tree.parent / f".{tree.name}{manifest.MANIFEST_SUFFIX}").exists()
    assert not list((Path(os.environ["LDM_CACHE_DIR"]) / "manifests").glob("*.npz"))
