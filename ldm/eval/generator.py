"""The inference `Generator`: a generator network with the latent contract around it, and its loaders.

A `Generator` holds what turns noise into images and nothing about training: the network `model(x, t, y)` (OUR time:
t=0 data, t=1 noise), the `LatentNormalizer` it was trained with, the frozen tokenizer that decodes, the noising
path and prediction type, the number of classes, the latent shape and whether the network also predicts a variance.
Where it came from (checkpoint, EMA or not, the run config) rides along for sample folders and messages.

`sample_latents` is the one place that turns a network into a sampler call: CFG wrapper (guidance.py) -> prediction
conversion (samplers.make_denoiser) -> time grid -> sampler. Noise comes from one torch.Generator per sample index
(edm2's StackedRandomGenerator idea), so sample i is the same for any batch size or process count.

Three ways to get one, all sampling through the same code:
    load_generator(run_or_checkpoint)              a run trained here (EMA weights by default)
    load_official_generator(kind, weights, ...)    released DiT / SiT / LightningDiT weights, sampled by default as
                                                   their own sample scripts do (OFFICIAL_SETUPS)
    GeneratorTask.generator(network)               the network being trained (periodic FID, sample grids)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch
from torch import nn

from ldm.config import RunConfig, SampleCfg, TokenizerCfg, config_from_dict
from ldm.diffusion.guidance import classifier_free_guidance, interval_from_sit_time
from ldm.diffusion.paths import Path, get_path
from ldm.diffusion.samplers import get_sampler, make_denoiser, randn_like, sampler_options, sampler_times
from ldm.seeding import index_generators
from ldm.tokenizers.stats import LatentNormalizer, normalizer_for


# ------------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_latents(model: Callable, noise: torch.Tensor, y: torch.Tensor | None, *, path: Path, prediction: str,
                   sample_cfg: SampleCfg, num_classes: int, learned_sigma: bool = False,
                   generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Integrate from `noise` (B, C, H, W) at t=1 to latents at t=0 with sample_cfg's sampler, steps and guidance.

    `model(x, t, y)` is the generator; y (B,) class ids (None for unconditional). Guidance applies when
    sample_cfg.cfg_scale != 1 on class-conditional models; stochastic samplers draw from `generators`.
    """
    guided = sample_cfg.cfg_scale != 1.0
    if guided:
        if num_classes < 1 or y is None:
            raise ValueError(f"sample.cfg_scale={sample_cfg.cfg_scale} needs a class-conditional model; this model "
                             f"is unconditional (use sample.cfg_scale=1)")
        model_fn = classifier_free_guidance(model, y, num_classes=num_classes, scale=sample_cfg.cfg_scale,
                                            interval=tuple(sample_cfg.interval), channels=sample_cfg.cfg_channels,
                                            learned_sigma=learned_sigma, rule=sample_cfg.guidance_rule)
    else:
        model_fn = (lambda x, t: model(x, t, y)) if y is not None else (lambda x, t: model(x, t, None))
    denoise = make_denoiser(model_fn, path=path, prediction=prediction, learned_sigma=learned_sigma,
                            step_aware=guided)  # the guidance wrapper reads the step start (sample.guidance_rule)
    sampler = get_sampler(sample_cfg.sampler)
    return sampler(denoise, noise, sampler_times(sample_cfg, path), path=path, generator=generators,
                   **sampler_options(sample_cfg, learned_sigma))


def initial_noise(shape: Sequence[int], generators: list[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """x_T ~ N(0, I), one draw per sample from its own generator."""
    return randn_like(torch.empty(len(generators), *shape, device=device), generators)


# ------------------------------------------------------------------------------------------------------ the generator
@dataclass(eq=False, repr=False)
class Generator:
    """A generator network ready to sample, with the latent contract it was trained under."""

    model: nn.Module                      # net(x, t, y) -> prediction (ldm/models interface)
    normalizer: LatentNormalizer          # the training normalisation; denormalize() before decoding
    tokenizer: nn.Module                  # frozen ldm.tokenizers.export.Tokenizer: decode(), fingerprint
    path: Path                            # noising path (ldm/diffusion/paths.py)
    prediction: str                       # what the network predicts: velocity | eps | v | x0
    num_classes: int                      # 0 = unconditional
    latent_shape: tuple[int, int, int]    # (C, h, w)
    learned_sigma: bool = False           # output holds a variance half (DiT learn_sigma)
    checkpoint: FsPath | None = None      # where the weights came from (run checkpoint or weights file)
    used_ema: bool = False
    cfg: RunConfig | None = None          # the run config it was trained with (loaded generators; sample defaults)

    @property
    def device(self) -> torch.device:
        return self.normalizer.mean.device

    def to(self, device: str | torch.device) -> Generator:
        for module in (self.model, self.normalizer, self.tokenizer):
            module.to(device)
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W), roughly in [-1, 1]."""
        return self.tokenizer.decode(self.normalizer.denormalize(z))

    def sample_latents(self, noise: torch.Tensor, labels: torch.Tensor | None, *, sample_cfg: SampleCfg,
                       generators: list[torch.Generator]) -> torch.Tensor:
        """`sample_latents` with this generator's network, path, prediction, classes and variance head."""
        return sample_latents(self.model, noise, labels, path=self.path, prediction=self.prediction,
                              sample_cfg=sample_cfg, num_classes=self.num_classes, learned_sigma=self.learned_sigma,
                              generators=generators)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None, indices: Sequence[int], seed: int, *,
                 sample_cfg: SampleCfg | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] of the global sample `indices` (per-index seeds), labels (B,) or None.

        The network runs in eval mode and is put back in the mode it was in (the training task's generator wraps
        its live network or EMA copy). sample_cfg defaults to the run's `cfg.sample`.
        """
        if sample_cfg is None:
            if self.cfg is None:
                raise ValueError("Generator.generate needs sample_cfg: this generator carries no run config")
            sample_cfg = self.cfg.sample
        gens = index_generators(seed, indices)
        noise = initial_noise(self.latent_shape, gens, self.device)  # (B, C, h, w)
        was_training = self.model.training
        self.model.eval()
        z = self.sample_latents(noise, labels, sample_cfg=sample_cfg, generators=gens)
        self.model.train(was_training)
        return self.decode(z).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------ loaders
def tokenizer_path(tokenizer_cfg: TokenizerCfg) -> str:
    """The frozen tokenizer a generator run names: tokenizer.checkpoint, else tokenizer.pretrained."""
    path = tokenizer_cfg.checkpoint or tokenizer_cfg.pretrained
    if path is None:
        raise ValueError("the generator stage needs a frozen tokenizer: set tokenizer.checkpoint=<tokenizer run dir "
                         "or export folder> or tokenizer.pretrained=<diffusers AutoencoderKL folder>")
    return path


def load_generator(path: str | FsPath, *, use_ema: bool = True, device: str | torch.device = "cpu",
                   tokenizer: str | None = None, overrides: dict[str, Any] | None = None) -> Generator:
    """Load a generator run directory or checkpoint directory for sampling.

    The tokenizer is the one recorded in the run's config (or `tokenizer`, checked against the recorded fingerprint).
    use_ema=True loads the EMA weights and fails clearly when the checkpoint has none. `overrides` replace top-level
    sections of the recorded config.
    """
    from ldm.models import build_generator_model
    from ldm.runs import load_checkpoint, load_state_strict, resolve_checkpoint
    from ldm.tokenizers.export import load_tokenizer

    from ldm.hub import resolve_path

    ckpt_dir = resolve_checkpoint(resolve_path(path))  # a run or checkpoint directory, or an hf:// reference to one
    ckpt = load_checkpoint(ckpt_dir)
    meta = ckpt["state"].get("task", {})
    if meta.get("kind") != "generator":
        raise ValueError(f"{ckpt_dir} is not a generator checkpoint (it was written by a "
                         f"{meta.get('kind', 'tokenizer')!r} run)")
    cfg = config_from_dict(ckpt["state"]["config"])
    if overrides:
        cfg = config_from_dict({**ckpt["state"]["config"], **overrides})
    tok = load_tokenizer(tokenizer or tokenizer_path(cfg.tokenizer))
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(f"tokenizer {tok.source!r} (fingerprint {tok.fingerprint}) is not the one generator "
                         f"{ckpt_dir} was trained with (fingerprint {meta['tokenizer_fingerprint']}, from "
                         f"{meta['tokenizer_source']!r})")
    latent_shape = tuple(meta["latent_shape"])
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=meta["num_classes"])
    normalizer = LatentNormalizer(meta["latent_norm"], latent_shape[0])
    # model.safetensors holds the training task's state: "model.*", the normaliser's buffers and (REPA) the
    # projector, which sampling does not need
    weights = nn.ModuleDict({"model": model, "normalizer": normalizer})
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projector.")}
    load_state_strict(weights, state, f"{ckpt_dir}/model.safetensors")
    if use_ema:
        if ckpt["ema"] is None:
            raise ValueError(f"{ckpt_dir} has no EMA weights (the run had train.ema=false); sample with --no-ema")
        load_state_strict(model, ckpt["ema"], f"{ckpt_dir}/ema.safetensors")
    model.eval()
    gen = Generator(model=model, normalizer=normalizer, tokenizer=tok, path=get_path(cfg.diffusion.path),
                    prediction=cfg.diffusion.prediction, num_classes=meta["num_classes"], latent_shape=latent_shape,
                    learned_sigma=cfg.model.learn_sigma, checkpoint=ckpt_dir, used_ema=use_ema, cfg=cfg)
    return gen.to(device)


# How each official family was trained (ldm/models/checkpoints.py converts its network to OUR time) and the sampler
# of its own sample script, converted to our time (t = 0 data, t = 1 noise):
#   dit           DiT sample.py: DDPM, 250 respaced steps, eps + learned sigma, latents x 0.18215.
#   sit           SiT sample.py: SDE, 250 steps, velocity.
#   lightningdit  LightningDiT inference.py with configs/lightningdit_xl_vavae_f16d32.yaml: torchdiffeq's fixed-grid
#                 Euler on num_sampling_steps = 250 grid POINTS, linspace(0, 1, 250) in its time (data at 1), i.e.
#                 249 steps; timestep_shift 0.3 maps each point to 0.3 t / (1 - 0.7 t), which is our shifted grid
#                 with shift 1 / 0.3 (paths.shift_time); forward_with_cfg guides iff t_SiT >= cfg_interval_start
#                 0.11, our interval [0, 0.89], and only output channels 0-2. Latents: its VA-VAE's per-channel
#                 mean / std with latent_multiplier 1. The guidance scale stays the user's (--cfg): that config pairs
#                 10.0 with this interval, its 800-epoch reproduction 6.7 with cfg_interval_start 0.125.
OFFICIAL_SETUPS = {
    "dit": {"diffusion": dict(path="ddpm_linear", prediction="eps", latent_norm="scalar"),
            "sample": dict(sampler="ddpm", steps=250)},
    "sit": {"diffusion": dict(path="linear", prediction="velocity", latent_norm="scalar"),
            "sample": dict(sampler="euler_maruyama", steps=250)},
    "lightningdit": {"diffusion": dict(path="linear", prediction="velocity", latent_norm="channel"),
                     "sample": dict(sampler="euler", steps=249, time_grid="shifted", shift=1 / 0.3,
                                    interval=list(interval_from_sit_time(0.11)), cfg_channels="first3")},
}


def official_run_config(kind: str, *, tokenizer: str | FsPath | None = None) -> RunConfig:
    """The run config an official family's weights sample under: its path, prediction and latent normalisation, and
    its sample script's sampler (OFFICIAL_SETUPS) as the `sample` defaults."""
    from ldm.config import DiffusionCfg

    if kind not in OFFICIAL_SETUPS:
        raise ValueError(f"--official={kind!r}; expected one of {sorted(OFFICIAL_SETUPS)}")
    setup = OFFICIAL_SETUPS[kind]
    pretrained = None if tokenizer is None else str(tokenizer)
    return RunConfig(name=f"official-{kind}", tokenizer=TokenizerCfg(pretrained=pretrained),
                     diffusion=DiffusionCfg(**setup["diffusion"]), sample=SampleCfg(**setup["sample"]))


def load_official_generator(kind: str, weights: str | FsPath, *, tokenizer: str | FsPath | None,
                            device: str | torch.device = "cpu") -> Generator:
    """A Generator from an official DiT / SiT / LightningDiT weights file and the tokenizer it was trained with
    (a diffusers AutoencoderKL folder: sd-vae-ft-ema for DiT/SiT, whose config gives the 0.18215 factor; a VA-VAE
    export with its latent statistics for LightningDiT). The released files hold EMA weights (training checkpoints:
    their "ema" entry), so used_ema is True. Its `cfg` is official_run_config(kind)."""
    from ldm.models.checkpoints import load_official
    from ldm.tokenizers.export import load_tokenizer

    cfg = official_run_config(kind, tokenizer=tokenizer)  # an unknown kind fails here, before any file is read
    if tokenizer is None:
        raise ValueError(f"--official {kind} needs --tokenizer FOLDER: the VAE its latents come from (diffusers "
                         f"AutoencoderKL folder or ldm tokenizer export)")
    model = load_official(weights, kind)
    tok = load_tokenizer(tokenizer)
    if tok.latent_channels != model.in_channels:
        raise ValueError(f"--tokenizer {tokenizer} has {tok.latent_channels} latent channels; the {kind} weights "
                         f"{weights} take {model.in_channels}")
    cfg.model.learn_sigma = model.learn_sigma  # what the weights hold (DiT's released files: learned sigma)
    d = cfg.diffusion
    normalizer = normalizer_for(tok, kind=d.latent_norm, scaling_factor=d.scaling_factor)
    gen = Generator(model=model.eval(), normalizer=normalizer, tokenizer=tok, path=get_path(d.path),
                    prediction=d.prediction, num_classes=model.num_classes,
                    latent_shape=(model.in_channels, model.input_size, model.input_size),
                    learned_sigma=cfg.model.learn_sigma, checkpoint=FsPath(weights), used_ema=True, cfg=cfg)
    return gen.to(device)
    from ldm.hub import resolve_path

    weights = resolve_path(weights)  # a file, or an hf://org/name[@rev]/file reference
