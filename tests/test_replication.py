"""The replication study (bench/replication/run.py) is deterministic: the same seeds give the same numbers on CPU.

Two fresh run roots, the --tiny budgets (the machinery of --quick at a few steps), two variants (plain and VA-VAE,
whose aligner path run.py drives itself), no docs rewritten."""

import json

import pytest
from conftest import run_python


def _study(root):
    run_python(["bench/replication/run.py", "--tiny", "--seeds", "0", "--variants", "kl,kl_va", "--run-root",
                str(root), "--no-docs"], timeout=900)
    result = json.loads((root / "tiny" / "results.json").read_text())
    for run in result["runs"]:  # wall-clock times are the only fields allowed to differ
        del run["seconds"]
    return result


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_same_seeds_give_the_same_numbers(tmp_path):
    a, b = _study(tmp_path / "a"), _study(tmp_path / "b")
    assert [r["variant"] for r in a["runs"]] == ["kl", "kl_va"]
    assert a["aggregate"] == b["aggregate"]
    assert a["runs"] == b["runs"]
