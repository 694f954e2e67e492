"""A run directory written before the layer refactor (tests/fixtures/legacy_run, made at commit 7620d8b by
tests/fixtures/make_legacy_run.py) still resumes and samples, bit for bit as that commit's code did."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from conftest import REPO, run_python

FIXTURE = REPO / "tests" / "fixtures" / "legacy_run"
sys.path.insert(0, str(FIXTURE.parent))
from make_legacy_run import weights_digest  # noqa: E402  (the digest the fixture's expected.json was made with)

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "legacy_run"
    shutil.copytree(FIXTURE, root)
    return root


def test_legacy_generator_run_resumes_bit_exactly(tmp_path):
    root = _copy(tmp_path)
    run_python([str(REPO / "train.py"), str(root / "gen" / "config.yaml"), f"train.run_root={root}",
                f"tokenizer.checkpoint={root / 'tok'}", "train.max_steps=4", "--no-progress"], cwd=root)
    assert weights_digest(root / "gen" / "checkpoints" / "step_0000004") == EXPECTED["resumed_step4_weights_sha256"]


def test_legacy_generator_run_samples_identically(tmp_path):
    root = _copy(tmp_path)
    out = tmp_path / "samples"
    run_python([str(REPO / "sample.py"), "gen", "--num", "6", "--cfg", "2.0", "--sampler", "heun", "--steps", "4",
                "--npz", "--out", str(out), "--no-progress"], cwd=root)
    arr = np.load(out / "samples.npz")
    assert hashlib.sha256(arr["arr_0"].tobytes()).hexdigest() == EXPECTED["samples_npz_arr0_sha256"]
    assert arr["arr_1"].tolist() == EXPECTED["samples_npz_arr1"]
