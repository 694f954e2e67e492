"""train.init_from (issue #15): a generator run starts from another run's EMA or raw weights with a fresh optimizer,
and refuses another architecture, another tokenizer, a tokenizer run, and a missing weight choice, with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_decoder_losses_off import generator_cfg, tiny_vae

from ldm.config import ConfigError, load_config
from ldm.runs import load_checkpoint

_cfg = generator_cfg


def _build(cfg):
    from ldm.train.generator_task import build_generator_task

    torch.manual_seed(0)
    return build_generator_task(cfg)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-step source run (EMA decay 0.9, so its EMA and raw weights differ) and its tokenizer."""
    from ldm.train.loop import fit

    root = tmp_path_factory.mktemp("init_from")
    vae = tiny_vae(root / "vae")
    cfg = _cfg(root, vae, "src")
    task, data = _build(cfg)
    fit(cfg, task, data, progress=False)
    return root, vae


def test_loads_the_chosen_weights_and_starts_a_fresh_run(source, tmp_path):
    from ldm.train.loop import fit

    root, vae = source
    ckpt = load_checkpoint(root / "src" / "checkpoints" / "step_0000003")
    raw = {k[len("model."):]: v for k, v in ckpt["model"].items() if k.startswith("model.")}
    assert any(not torch.equal(raw[k], ckpt["ema"][k]) for k in raw)
    for which, expected in (("ema", ckpt["ema"]), ("raw", raw)):
        cfg = _cfg(tmp_path, vae, f"post_{which}", f"train.init_from={root / 'src'}", f"train.init_weights={which}",
                   "diffusion.pixel_loss.enabled=true", "train.max_steps=1")
        task, data = _build(cfg)
        assert all(torch.equal(v, expected[k]) for k, v in task.model.state_dict().items())
        norm = {k[len("normalizer."):]: v for k, v in ckpt["model"].items() if k.startswith("normalizer.")}
        assert all(torch.equal(v, norm[k]) for k, v in task.normalizer.state_dict().items())
        fit(cfg, task, data, progress=False)
    state = load_checkpoint(tmp_path / "post_raw" / "checkpoints" / "step_0000001")["state"]
    assert state["step"] == 1  # a new run: step 0 + 1, one optimizer step of Adam state
    assert all(s["step"] == 1 for s in state["optimizers"]["model"]["state"].values())


def test_refuses_another_architecture_tokenizer_or_a_tokenizer_run(source, tmp_path):
    from ldm.train.loop import fit

    root, vae = source
    src = f"train.init_from={root / 'src'}"
    other_vae = tmp_path / "other_vae"
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(1)
    build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
                         norm_num_groups=4).save_pretrained(other_vae)
    tok = load_config(None, ["stage=tokenizer", "name=tok", f"train.run_root={tmp_path}", "data.image_size=8",
                             "data.class_cond=false", "tokenizer.block_out_channels=[8,8]",
                             "tokenizer.norm_num_groups=4", "tokenizer.latent_channels=4",
                             "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1", "tokenizer.disc_filters=8",
                             "train.batch_size=8",
                             "train.max_steps=1", "train.mixed_precision=no"])
    fit(tok, progress=False)
    cases = [
        (_cfg(tmp_path, vae, "a", src, "train.init_weights=ema", "model.use_qknorm=true"),
         "is another architecture: it has model.use_qknorm=False, this run model.use_qknorm=True"),
        (_cfg(tmp_path, other_vae, "b", src, "train.init_weights=raw"), "was trained on tokenizer"),
        (_cfg(tmp_path, vae, "c", f"train.init_from={tmp_path / 'tok'}", "train.init_weights=ema"),
         "is a tokenizer run, not a generator run"),
        (_cfg(tmp_path, vae, "d", src), "needs train.init_weights=ema or train.init_weights=raw"),
        (_cfg(tmp_path, vae, "e", "train.init_weights=raw"), "train.init_weights='raw' without train.init_from"),
        (_cfg(tmp_path, vae, "f", "train.init_from=/nowhere", "train.init_weights=raw"), "train.init_from: "),
    ]
    for cfg, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            _build(cfg)
        assert "\n" not in str(err.value), str(err.value)
