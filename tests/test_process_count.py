"""Training does not depend on the process count: one process with batch B and two (gloo, `torch.distributed.run`)
with B/2 each train the same weights over 20 steps, up to the order of float reductions, for the generator stage
(flow matching with velocity prediction; DDPM with eps prediction; CFG label dropout on) and the tokenizer stage (KL
with EQ-VAE, DC-AE and FSQ; the GAN off). Per-sample draws come from the sampler's sample seeds (ldm.data.sampler),
the EQ-VAE transform from (seed, step). With the GAN on the stages differ by design (docs/multi-gpu.md): the
discriminator's BatchNorm statistics and the adaptive weight are per process.

Run as a script (`python tests/test_process_count.py RUN_ROOT VAE_DIR NAME[,NAME...]`, under torch.distributed.run
or not), this file is the worker: it trains the named runs of RUNS one after the other in one interpreter. The
default suite checks the stages (flow, eps, KL tokenizer); the other tokenizer kinds are slow-marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
LR = 1e-3  # per-process draws (the old behaviour) moved weights apart by about 2 * LR after one step
COMMON = ["data.image_size=16", "train.batch_size=8", f"train.max_steps={STEPS}", f"train.log_every={STEPS}",
          "train.ckpt_every=1000", "train.mixed_precision='no'", "train.ema=false", f"optim.lr={LR}"]
GENERATOR = ["stage=generator", "model.preset=DiT-Pico/2", "tokenizer.stats_num_images=64", "sample.steps=2"]
RUNS = {
    "flow": GENERATOR,
    "eps": [*GENERATOR, "diffusion.path=ddpm_linear", "diffusion.prediction=eps", "sample.sampler=ddim"],
    "tokenizer": ["stage=tokenizer", "data.class_cond=false", "tokenizer.latent_channels=4",
                  "tokenizer.block_out_channels=[16,16]", "tokenizer.norm_num_groups=8", "tokenizer.layers_per_block=1",
                  "tokenizer.mid_block_attention=false", "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1",
                  "tokenizer.disc_weight=0", "tokenizer.disc_start=1000", "tokenizer.eq.enabled=true",
                  "tokenizer.eq.scale_num_min=16"],
    # DC-AE of ResBlocks with RMSNorm in the decoder (BatchNorm statistics would be per process, as the
    # discriminator's). EfficientViTBlocks are left out: the ReLU feature maps of their linear attention switch a
    # unit's gradient on or off when float-level weight differences move its pre-activation across 0, so the two
    # runs part by ~5e-5 after 20 steps (with the ReLU swapped for softplus they stay within 1.2e-7)
    "dc": ["stage=tokenizer", "data.class_cond=false", "tokenizer.kind=dc", "tokenizer.latent_channels=8",
           "tokenizer.block_out_channels=[16,32]", "tokenizer.norm_num_groups=16",
           "tokenizer.dc.encoder_block_types=[ResBlock]", "tokenizer.dc.decoder_block_types=[ResBlock]",
           "tokenizer.dc.decoder_norm_types=[rms_norm]", "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1",
           "tokenizer.disc_weight=0", "tokenizer.disc_start=1000"],
    "fsq": ["stage=tokenizer", "data.class_cond=false", "tokenizer.kind=fsq", "tokenizer.fsq.levels=[5,4,3]",
            "tokenizer.block_out_channels=[16,16]", "tokenizer.norm_num_groups=8", "tokenizer.layers_per_block=1",
            "tokenizer.mid_block_attention=false", "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1",
            "tokenizer.disc_weight=0", "tokenizer.disc_start=1000"],
}
# the discriminator's BatchNorm running statistics: each process normalises its own images (DDP broadcasts rank 0's)
PER_PROCESS = ("running_mean", "running_var")
TOLERANCE = 2e-5  # float reduction order (DDP's gradient all-reduce, batch means over B/2 + B/2 instead of B)


def worker(run_root: str, vae_dir: str, names: str) -> None:
    sys.path.insert(0, str(REPO))
    from ldm.config import load_config
    from ldm.train.loop import fit

    for name in names.split(","):
        extra = RUNS[name]
        vae = [f"tokenizer.pretrained={vae_dir}"] if extra[0] == "stage=generator" else []
        fit(load_config(None, [*COMMON, *extra, *vae, f"name={name}", f"train.run_root={run_root}"]), progress=False)


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / name / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))


def _one_and_two_processes(tmp_path: Path, names: list[str]) -> None:
    from conftest import run_python

    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    vae = tmp_path / "vae"
    build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(vae)
    run_python([__file__, str(tmp_path / "one"), str(vae), ",".join(names)], timeout=600)
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path / "two"),
                      str(vae), ",".join(names)], timeout=600)
    assert "2 processes" in two.stdout + two.stderr
    diffs = {}
    for name in names:
        one, other = _weights(tmp_path / "one", name), _weights(tmp_path / "two", name)
        assert one.keys() == other.keys()
        compared = [k for k in one if not k.endswith(PER_PROCESS)]
        diffs[name] = max(float((one[k].double() - other[k].double()).abs().max()) for k in compared)
        assert diffs[name] < TOLERANCE, (name, diffs)
    print("max |w1 - w2| per run:", diffs)


def test_one_and_two_processes_train_the_same_weights(tmp_path):
    _one_and_two_processes(tmp_path, ["flow", "eps", "tokenizer"])


@pytest.mark.slow  # ~25 s more: two more tokenizer kinds
def test_other_tokenizer_kinds_train_the_same_weights_on_one_and_two_processes(tmp_path):
    _one_and_two_processes(tmp_path, ["dc", "fsq"])


if __name__ == "__main__":
    worker(*sys.argv[1:4])
