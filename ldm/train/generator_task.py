"""Stage 2 as a `Task`: a DiT/UNet generator trained in a frozen tokenizer's latent space.

Latents come from the latent cache (`data.latents`) or are encoded on the fly from images (KL: posterior mean in both
cases, so the same batch gives the same loss either way). They are normalised by `LatentNormalizer` — per-channel
mean/std (LightningDiT), a scalar scaling factor (SD-VAE's 0.18215) or nothing — whose statistics are buffers of the
task, so they are stored in every generator checkpoint and used unchanged at decode time.

The loss is `ldm.diffusion.objectives.training_loss` (diffusion or flow matching, t=0 data, t=1 noise), plus REPA's
alignment term when `diffusion.repa` is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch
from torch import nn

from ldm.config import RunConfig, config_from_dict
from ldm.diffusion.objectives import training_loss
from ldm.diffusion.paths import Path, get_path
from ldm.train.task import StepOutput, Task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ normalisation
class LatentNormalizer(nn.Module):
    """z_norm = (z - mean) / std per channel ("channel"), z * scale ("scalar"), or z ("none")."""

    KINDS = ("channel", "scalar", "none")

    def __init__(self, kind: str, channels: int, mean=None, std=None, scale: float | None = None):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"diffusion.latent_norm={kind!r}; expected one of {list(self.KINDS)}")
        self.kind = kind
        mean = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"latent statistics have shapes {tuple(mean.shape)}/{tuple(std.shape)}; expected "
                             f"({channels},) for a {channels}-channel tokenizer")
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())
        self.register_buffer("scale", torch.tensor(1.0 if scale is None else float(scale)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "channel":
            return (z - self.mean) / self.std
        return z * self.scale if self.kind == "scalar" else z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "channel":
            return z * self.std + self.mean
        return z / self.scale if self.kind == "scalar" else z


def normalizer_for(cfg: RunConfig, tokenizer, images_for_stats=None) -> LatentNormalizer:
    """Statistics from, in order: the config's scaling_factor, the tokenizer's stored stats, or a pass over data."""
    kind, c = cfg.diffusion.latent_norm, tokenizer.latent_channels
    if kind == "none":
        return LatentNormalizer("none", c)
    stats = tokenizer.stats
    if kind == "scalar" and (cfg.diffusion.scaling_factor or tokenizer.scaling_factor):
        return LatentNormalizer("scalar", c, scale=cfg.diffusion.scaling_factor or tokenizer.scaling_factor)
    if stats is None:
        if images_for_stats is None:
            raise ValueError(f"diffusion.latent_norm={kind} needs latent statistics, and tokenizer "
                             f"{tokenizer.source!r} has none stored; run `ldm tokenizer-stats` or give "
                             f"diffusion.scaling_factor")
        from ldm.tokenizers.stats import compute_latent_stats

        stats = compute_latent_stats(tokenizer.encode, images_for_stats, num_images=cfg.tokenizer.stats_num_images,
                                     channels=c, fingerprint=tokenizer.fingerprint)
        log.info("latent statistics computed over %d images: mean %s std %s", stats.num_images,
                 [round(v, 4) for v in stats.mean], [round(v, 4) for v in stats.std])
    if kind == "scalar":
        return LatentNormalizer("scalar", c, scale=stats.scaling_factor)
    return LatentNormalizer("channel", c, mean=stats.mean, std=stats.std)


# ------------------------------------------------------------------------------------------------------ networks
def build_generator_model(model_cfg, *, latent_channels: int, latent_size: int, num_classes: int,
                          repa_depth: int | None = None) -> nn.Module:
    """DiT (any preset, LightningDiT switches) or the diffusers UNet adapter, from ModelCfg."""
    if model_cfg.arch == "dit":
        from ldm.models.dit import build_dit

        return build_dit(model_cfg.preset, input_size=latent_size, in_channels=latent_channels,
                         num_classes=num_classes, class_dropout_prob=model_cfg.class_dropout,
                         learn_sigma=model_cfg.learn_sigma, use_swiglu=model_cfg.use_swiglu,
                         use_rmsnorm=model_cfg.use_rmsnorm, use_rope=model_cfg.use_rope,
                         use_qknorm=model_cfg.use_qknorm, repa_depth=repa_depth,
                         grad_checkpointing=model_cfg.grad_checkpointing)
    from ldm.models.unet import UNetGenerator

    if repa_depth is not None:
        raise ValueError("diffusion.repa needs model.arch=dit (REPA aligns transformer hidden states)")
    widths = tuple(model_cfg.unet_block_out_channels)
    return UNetGenerator(input_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
                         block_out_channels=widths, layers_per_block=model_cfg.unet_layers_per_block,
                         learn_sigma=model_cfg.learn_sigma, class_dropout_prob=model_cfg.class_dropout,
                         norm_num_groups=min(32, *widths))


def _prediction_and_path(cfg: RunConfig) -> tuple[Path, str]:
    return get_path(cfg.diffusion.path), cfg.diffusion.prediction


# ------------------------------------------------------------------------------------------------------ the task
class GeneratorTask(Task):
    phases = ("model",)

    def __init__(self, cfg: RunConfig, model: nn.Module, tokenizer, normalizer: LatentNormalizer, num_classes: int,
                 latent_shape: tuple[int, int, int], repa: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.normalizer = normalizer
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self.path, self.prediction = _prediction_and_path(cfg)
        # frozen helpers are kept out of the module tree: they are not trained, averaged or checkpointed
        self._frozen: dict[str, nn.Module] = {"tokenizer": tokenizer}
        self.projector = None
        if repa is not None:
            self.projector, self._frozen["encoder"] = repa

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for m in self._frozen.values():
            m._apply(fn)
        return self

    @property
    def tokenizer(self):
        return self._frozen["tokenizer"]

    def param_groups(self):
        params = list(self.model.parameters())
        if self.projector is not None:
            params += list(self.projector.parameters())
        return {"model": params}

    def ema_module(self) -> nn.Module:
        return self.model

    def describe(self) -> dict:
        tok = self.tokenizer
        return {"kind": "generator", "latent_shape": list(self.latent_shape), "num_classes": self.num_classes,
                "tokenizer_source": str(tok.source), "tokenizer_fingerprint": tok.fingerprint,
                "latent_norm": self.normalizer.kind}

    def latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised latents of a batch (from the cache or encoded now)."""
        z = batch["latent"] if "latent" in batch else self.tokenizer.encode(batch["image"])
        return self.normalizer.normalize(z.float())

    def forward(self, batch, *, step: int, phase: str, micro: int = 0) -> StepOutput:
        d = self.cfg.diffusion
        x0 = self.latents(batch)  # (B, C, h, w)
        y = batch["label"] if self.num_classes > 0 else None
        hidden = {}

        def model_fn(x_t, t):
            if self.projector is None:
                return self.model(x_t, t, y)
            out = self.model(x_t, t, y, return_hidden=True)
            hidden["h"] = out.hidden
            return out.output

        timesteps = None if d.path.startswith("ddpm") else d.t_sampler
        loss, logs = training_loss(model_fn, x0, path=self.path, prediction=self.prediction, timesteps=timesteps,
                                   logit_mean=d.t_mean, logit_std=d.t_std, shift=d.t_shift,
                                   weighting=None if d.weighting == "none" else d.weighting,
                                   min_snr_gamma=d.min_snr_gamma, cos_loss_weight=d.cos_loss_weight,
                                   learned_sigma=self.cfg.model.learn_sigma)
        total = loss.mean()
        if self.projector is not None:
            from ldm.diffusion.repa import repa_loss

            with torch.no_grad():
                feats = self._frozen["encoder"](batch["image"])  # (B, L_enc, D_enc)
            proj = repa_loss(self.projector(hidden["h"]), feats)  # (B,)
            total = total + d.repa_weight * proj.mean()
            logs["repa"] = proj.detach().mean()
        return StepOutput(total, {k: float(v) for k, v in logs.items()})

    @torch.no_grad()
    def generate(self, model: nn.Module, labels: torch.Tensor | None, indices: list[int], seed: int) -> torch.Tensor:
        """Images in [-1, 1] for sample indices (per-index seeds) with cfg.sample's sampler and guidance."""
        from ldm.eval.generate import initial_noise, sample_latents
        from ldm.seeding import index_generators

        device = self.normalizer.mean.device
        gens = index_generators(seed, indices)
        noise = initial_noise(self.latent_shape, gens, device)
        was_training = model.training
        model.eval()
        z = sample_latents(model, noise, labels, path=self.path, prediction=self.prediction, sample_cfg=self.cfg.sample,
                           num_classes=self.num_classes, learned_sigma=self.cfg.model.learn_sigma, generators=gens)
        model.train(was_training)
        return self.tokenizer.decode(self.normalizer.denormalize(z)).clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, ema, step: int) -> dict[str, float]:
        """Periodic FID (train.eval_every): eval.num_samples EMA samples (labels cycling through the classes), the
        same feature pass and Fréchet distance as `ldm eval fid`, against eval.reference (default: the data).
        Generation is sharded by whole batches over the processes; the features are gathered by evaluate_batches."""
        import numpy as np

        from ldm.eval.evaluate import evaluate_batches
        from ldm.eval.features import dist_info
        from ldm.eval.generate import labels_for, to_uint8

        e, model = self.cfg.eval, ema if ema is not None else self.model
        rank, world = dist_info()
        classes = list(range(self.num_classes)) if self.num_classes else None
        seed = self.cfg.sample.seed + 1

        def batches():
            for b in range(rank, -(-e.num_samples // e.batch_size), world):
                idx = list(range(b * e.batch_size, min(e.num_samples, (b + 1) * e.batch_size)))
                labels = labels_for(idx, classes, seed=seed)
                labels = labels.to(self.normalizer.mean.device) if labels is not None else None
                yield to_uint8(self.generate(model, labels, idx, seed)), np.asarray(idx)

        weights = e.inception_weights if e.extractor == "inception" else None
        result = evaluate_batches(batches(), e.reference or self.cfg.data.source, extractor=e.extractor,
                                  extractor_weights=weights, metrics=("fd",), size=self.cfg.data.image_size,
                                  batch_size=e.batch_size, progress=False, total=e.num_samples)
        return {f"val/{k}": float(v) for k, v in result.items() if isinstance(v, float)}

    @torch.no_grad()
    def visualize(self, batch, ema):
        from ldm.io import make_grid

        cols = min(self.num_classes, 10) if self.num_classes else 8
        rows = 4
        labels = torch.arange(cols).repeat(rows).to(self.normalizer.mean.device) if self.num_classes else None
        images = self.generate(ema if ema is not None else self.model, labels, list(range(rows * cols)),
                               self.cfg.sample.seed)
        return make_grid(images, nrow=cols)


# ------------------------------------------------------------------------------------------------------ building
def tokenizer_path(cfg: RunConfig) -> str:
    path = cfg.tokenizer.checkpoint or cfg.tokenizer.pretrained
    if path is None:
        raise ValueError("the generator stage needs a frozen tokenizer: set tokenizer.checkpoint=<tokenizer run dir "
                         "or export folder> or tokenizer.pretrained=<diffusers AutoencoderKL folder>")
    return path


def build_generator_task(cfg: RunConfig):
    """(GeneratorTask, dataset) for a generator config: images encoded on the fly, or the latent cache."""
    from ldm.data.images import build_dataset
    from ldm.tokenizers.export import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path(cfg))
    image_data = build_dataset(cfg.data) if cfg.data.latents is None or cfg.diffusion.repa else None
    if cfg.data.latents is not None:
        from ldm.data.latents import LatentCacheDataset

        if cfg.diffusion.repa:
            raise ValueError("diffusion.repa needs the images for the frozen encoder: unset data.latents to encode "
                             "latents on the fly")
        dataset = LatentCacheDataset(cfg.data.latents, expected_fingerprint=tokenizer.fingerprint)
        num_classes = dataset.num_classes if cfg.data.class_cond else 0
        latent_shape = tuple(dataset[(0, 0)]["latent"].shape)
        stats_images = None
    else:
        dataset = image_data
        num_classes = dataset.num_classes
        f = tokenizer.downsample
        if cfg.data.image_size % f:
            raise ValueError(f"data.image_size={cfg.data.image_size} is not divisible by the tokenizer's "
                             f"downsampling factor {f}")
        latent_shape = (tokenizer.latent_channels, cfg.data.image_size // f, cfg.data.image_size // f)
        stats_images = _stat_batches(dataset, cfg.tokenizer.stats_num_images)
    normalizer = normalizer_for(cfg, tokenizer, stats_images)
    d = cfg.diffusion
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=num_classes, repa_depth=d.repa_depth if d.repa else None)
    repa = None
    if d.repa:
        from ldm.diffusion.repa import build_projector
        from ldm.encoders import build_encoder

        encoder = build_encoder(d.repa_encoder, weights_path=d.repa_weights)
        projector = build_projector(model.hidden_size, encoder.feature_dim, hidden_dim=d.repa_proj_dim)
        repa = (projector, encoder)
    task = GeneratorTask(cfg, model, tokenizer, normalizer, num_classes, latent_shape, repa)
    return task, dataset


def _stat_batches(dataset, num_images: int, batch_size: int = 64):
    """Deterministic image batches (the first `num_images` items) for latent statistics."""
    n = min(num_images, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[(i, 0)]["image"] for i in range(start, min(n, start + batch_size))])


# ------------------------------------------------------------------------------------------------------ inference
@dataclass
class LoadedGenerator:
    """A trained generator ready to sample: network (EMA by default), normaliser, tokenizer and config."""

    task: GeneratorTask
    cfg: RunConfig
    checkpoint: FsPath
    used_ema: bool

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.task.latent_shape

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.task.tokenizer.decode(self.task.normalizer.denormalize(z))


def load_generator(path: str | FsPath, *, use_ema: bool = True, device: str | torch.device = "cpu",
                   tokenizer: str | None = None, overrides: dict[str, Any] | None = None) -> LoadedGenerator:
    """Load a generator run directory or checkpoint directory for sampling.

    The tokenizer is the one recorded in the run's config (or `tokenizer`, checked against the recorded fingerprint).
    use_ema=True loads the EMA weights and fails clearly when the checkpoint has none.
    """
    from ldm.runs import load_checkpoint, load_state_strict, resolve_checkpoint
    from ldm.tokenizers.export import load_tokenizer

    ckpt_dir = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_dir)
    meta = ckpt["state"].get("task", {})
    if meta.get("kind") != "generator":
        raise ValueError(f"{ckpt_dir} is not a generator checkpoint (it was written by a {meta.get('kind', 'tokenizer')!r} run)")
    cfg = config_from_dict(ckpt["state"]["config"])
    if overrides:
        cfg = config_from_dict({**ckpt["state"]["config"], **overrides})
    tok = load_tokenizer(tokenizer or tokenizer_path(cfg))
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(f"tokenizer {tok.source!r} (fingerprint {tok.fingerprint}) is not the one generator "
                         f"{ckpt_dir} was trained with (fingerprint {meta['tokenizer_fingerprint']}, from "
                         f"{meta['tokenizer_source']!r})")
    latent_shape = tuple(meta["latent_shape"])
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=meta["num_classes"])
    normalizer = LatentNormalizer(meta["latent_norm"], latent_shape[0])
    task = GeneratorTask(cfg, model, tok, normalizer, meta["num_classes"], latent_shape)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projector.")}
    load_state_strict(task, state, f"{ckpt_dir}/model.safetensors")
    if use_ema:
        if ckpt["ema"] is None:
            raise ValueError(f"{ckpt_dir} has no EMA weights (the run had train.ema=false); sample with --no-ema")
        load_state_strict(task.model, ckpt["ema"], f"{ckpt_dir}/ema.safetensors")
    task.to(device).eval()
    return LoadedGenerator(task=task, cfg=cfg, checkpoint=ckpt_dir, used_ema=use_ema)
