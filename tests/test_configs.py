"""The newcomer configs under configs/tokenizer/tiny_f4.yaml and configs/generator/ run as shipped on the embedded
digits (two steps each here; only the budget, batch and output folder are overridden)."""

from pathlib import Path

import pytest

from conftest import REPO
from ldm.config import load_config

# Every generator config trains its two steps under -m slow only (with its tokenizer fixture, 25-60 s each on 2 CPU
# cores), to keep the default run under 10 minutes; the default run still loads and validates each of them
# (tests/test_recipes.py), trains a DiT-Ti/2 with flow matching on the digits through the quickstart pipeline
# (tests/test_pipeline.py) and trains the DDPM objective (tests/test_generator_task.py).
GENERATOR_CONFIGS = [pytest.param(p, marks=pytest.mark.slow)
                     for p in sorted((REPO / "configs" / "generator").glob("*.yaml"))]
SHORT = ["train.max_steps=2", "train.batch_size=16", "train.ckpt_every=1000", "train.log_every=1"]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    from ldm.train.loop import fit

    root = tmp_path_factory.mktemp("configs")
    cfg = load_config(REPO / "configs" / "tokenizer" / "tiny_f4.yaml",
                      [f"train.run_root={root}", "tokenizer.stats_num_images=64", *SHORT])
    return fit(cfg, progress=False).run_dir


def test_the_generator_configs_named_by_the_help_exist():
    assert (REPO / "configs" / "generator" / "dit_s2.yaml").is_file()
    assert len(GENERATOR_CONFIGS) >= 2


@pytest.mark.parametrize("path", GENERATOR_CONFIGS, ids=lambda p: getattr(p, "stem", None))
def test_generator_config_trains_on_the_digits(path, tokenizer_run):
    from ldm.train.loop import fit

    cfg = load_config(path)
    assert cfg.stage == "generator" and cfg.data.source == "digits"
    assert cfg.tokenizer.checkpoint == "runs/tiny_f4"  # what `ldm train configs/tokenizer/tiny_f4.yaml` writes
    cfg = load_config(path, [f"train.run_root={tokenizer_run.parent}", f"tokenizer.checkpoint={tokenizer_run}",
                             *SHORT])
    result = fit(cfg, progress=False)
    assert result.step == 2 and (result.run_dir / "samples").is_dir()


def test_the_tokenizer_docs_folder_example_runs_on_a_small_folder(tmp_path, shared):
    """docs/tokenizers.md's own-folder command, as written, on the six shared photos (one step)."""
    from ldm.train.loop import fit

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        (folder / name).write_bytes(shared(f"images/{name}").read_bytes())
    doc = (REPO / "docs" / "tokenizers.md").read_text()
    line = next(x for x in doc.splitlines() if "data.source=/path/to/images" in x)
    overrides = [a for a in line.split()[3:] if "=" in a]
    cfg = load_config(REPO / "configs" / "tokenizer" / "tiny_f4.yaml",
                      [a.replace("/path/to/images", str(folder)) for a in overrides]
                      + [f"train.run_root={tmp_path}", "train.max_steps=1", "tokenizer.stats_num_images=8"])
    assert fit(cfg, progress=False).step == 1
