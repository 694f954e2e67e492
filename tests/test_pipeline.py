"""The quickstart pipeline end to end with reduced steps, its resumption, and train.py's no-argument default."""

import json

from conftest import REPO, run_python

FAST = ["tokenizer.train.max_steps=3", "generator.train.max_steps=3", "num_samples=20", "grid_per_class=1",
        "tokenizer.tokenizer.stats_num_images=64", "generator.sample.steps=2", "tokenizer.train.sample_every=0",
        "generator.train.sample_every=0", "fid_extractors=[digits]"]


def test_quickstart_end_to_end_then_skips(tmp_path, capsys):
    out = run_python(["-m", "ldm.cli", "quickstart", f"run_root={tmp_path}", *FAST, "--no-progress"], timeout=900)
    root = tmp_path / "quickstart"
    for rel in ("pipeline.yaml", "tokenizer/latest", "tokenizer/latent_stats.json", "latents/meta.json",
                "generator/latest", "samples/grid/grid.png", "samples/fid/samples.npz", "eval.json", "summary.json"):
        assert (root / rel).exists(), rel
    summary = json.loads((root / "summary.json").read_text())
    fd = summary["stages"]["eval"]["digits"]["fd_digits"]
    assert fd == fd and fd >= 0.0 and fd != float("inf")  # finite
    assert "fd_digits" in out.stdout and "extractor digits" in out.stdout
    assert f"everything is under {root}" in out.stdout
    import numpy as np

    with np.load(root / "samples" / "fid" / "samples.npz") as f:
        assert f["arr_0"].shape == (20, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert sorted(set(f["arr_1"].tolist())) == list(range(10))
    from ldm.cli import main  # the rerun in this process: it only reads the two finished stages

    assert main(["quickstart", f"run_root={tmp_path}", *FAST, "--no-progress", "stages=[tokenizer,generator]"]) == 0
    assert capsys.readouterr().out.count("already complete, skipped") == 2


def test_readme_quickstart_command_is_the_one_that_runs():
    readme = (REPO / "README.md").read_text()
    assert "python train.py" in readme and "ldm quickstart" in readme
    train_py = (REPO / "train.py").read_text()
    assert '["quickstart"]' in train_py  # no arguments -> the quickstart
    from ldm.cli import quickstart_config_path

    assert quickstart_config_path().endswith("configs/quickstart.yaml")
