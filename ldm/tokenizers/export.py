"""Tokenizers on disk: build from the config, record the architecture, load a frozen tokenizer, export.

`load_tokenizer(path)` accepts, and tells apart by their files:
* an ldm tokenizer run directory (`latest` -> checkpoints/step_*/) or one checkpoint directory (`state.pt`):
  EMA weights (`ema.safetensors`) when present, else the autoencoder part of `model.safetensors`; the architecture
  comes from `tokenizer_arch.json` written into the run directory when training starts;
* an export folder or any diffusers AutoencoderKL folder (`config.json` + weights), e.g. a downloaded SD-VAE;
* a VQ export folder (`vq_config.json` + `vq_model.safetensors`).
Latent statistics (`latent_stats.json`, see stats.py) are attached when they exist and belong to the same weights
(their fingerprint matches); a plain diffusers folder contributes its config's `scaling_factor` /
`latents_mean` / `latents_std`.

`export_tokenizer(src, out_dir)` writes a KL tokenizer as a diffusers folder (save_pretrained, the statistics also
registered in its config as scaling_factor / latents_mean / latents_std) plus `latent_stats.json`; a VQ tokenizer as
`vq_model.safetensors` + `vq_config.json` (+ stats). A KL tokenizer without statistics keeps the scaling factor
`load_tokenizer` reports (a diffusers folder's own); when there is none (an ldm run before `ldm tokenizer-stats`)
its config gets scaling_factor 1.0, no scaling, with a warning, never diffusers' default 0.18215 (SD-VAE's factor,
which describes no other tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch import nn

from ldm.tokenizers.kl import (
    Posterior,
    autoencoder_downsample,
    build_autoencoder_kl,
    decode_latent,
    encode_posterior,
    load_autoencoder_kl,
)
from ldm.tokenizers.stats import STATS_FILE, LatentStats, load_latent_stats, save_latent_stats
from ldm.tokenizers.vq import VQAutoencoder

log = logging.getLogger(__name__)

ARCH_FILE = "tokenizer_arch.json"
VQ_CONFIG_FILE = "vq_config.json"
VQ_WEIGHTS_FILE = "vq_model.safetensors"
AUTOENCODER_PREFIX = "autoencoder."  # the TokenizerTask attribute holding the autoencoder
# diffusers config keys that define the AutoencoderKL network (the rest are inference metadata)
KL_ARCH_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
                "use_post_quant_conv", "mid_block_add_attention")
VQ_ARCH_KEYS = ("block_out_channels", "layers_per_block", "norm_num_groups", "mid_block_attention", "attn_levels",
                "z_channels", "codebook_size", "code_dim", "l2_norm", "in_channels")
VQ_TRAINING_BUFFERS = ("quantizer.usage", "quantizer.usage_initialized", "quantizer.ema_cluster_size",
                       "quantizer.ema_embed_sum")


# ----------------------------------------------------------------------------------------------------------- build
def build_tokenizer(cfg, image_size: int) -> nn.Module:
    """The trainable autoencoder of `cfg` (a TokenizerCfg): an AutoencoderKL or a VQAutoencoder, new or initialised
    from `cfg.pretrained` (a diffusers AutoencoderKL folder, or an ldm tokenizer run / checkpoint directory whose
    non-EMA autoencoder weights continue training). Raises ValueError when image_size is not a multiple of the
    downsampling factor or the pretrained tokenizer is of another kind."""
    if cfg.pretrained is not None:
        model = load_pretrained_autoencoder(cfg.pretrained)
        kind = "kl" if isinstance(model, AutoencoderKL) else "vq"
        if kind != cfg.kind:
            raise ValueError(f"tokenizer.pretrained={cfg.pretrained!r} is a {kind} tokenizer but "
                             f"tokenizer.kind={cfg.kind!r}")
    elif cfg.kind == "kl":
            model = build_autoencoder_kl(latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
                                         layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                                         mid_block_attention=cfg.mid_block_attention, attn_levels=cfg.attn_levels,
                                         use_quant_conv=cfg.use_quant_conv, sample_size=image_size)
    elif cfg.kind == "vq":
        q = cfg.vq
        model = VQAutoencoder(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                              norm_num_groups=cfg.norm_num_groups, mid_block_attention=cfg.mid_block_attention,
                              attn_levels=cfg.attn_levels, z_channels=cfg.latent_channels,
                              codebook_size=q.codebook_size, code_dim=q.code_dim, beta=q.beta, l2_norm=q.l2_norm,
                              use_ema=q.ema, ema_decay=q.ema_decay, dead_code_threshold=q.dead_code_threshold,
                              entropy_weight=q.entropy_weight, entropy_temperature=q.entropy_temperature)
    else:
        raise ValueError(f"tokenizer.kind={cfg.kind!r}; expected one of ['kl', 'vq']")
    down = model_downsample(model)
    if image_size % down:
        raise ValueError(f"data.image_size={image_size} is not divisible by the tokenizer's downsampling factor "
                         f"{down}; choose a multiple of {down}")
    return model


def is_run_or_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "state.pt").is_file() or (path / "latest").is_file()


def run_checkpoint_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(architecture record, full Task state_dict from model.safetensors, checkpoint dir) of an ldm tokenizer run."""
    from ldm.runs import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    return _arch_for_run(ckpt.parent.parent), load_file(str(ckpt / "model.safetensors")), ckpt


def load_pretrained_autoencoder(path: str | Path) -> nn.Module:
    """A trainable autoencoder from a diffusers AutoencoderKL folder or an ldm run (its non-EMA weights)."""
    if not is_run_or_checkpoint(path):
        return load_autoencoder_kl(path)
    arch, full, ckpt = run_checkpoint_state(path)
    model = model_from_arch(arch)
    _load_strict(model, _autoencoder_part(full, ckpt), str(ckpt / "model.safetensors"))
    log.info("initialised the %s autoencoder from %s (non-EMA weights)", arch["kind"], ckpt)
    return model


def _autoencoder_part(full: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    state = {k[len(AUTOENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(AUTOENCODER_PREFIX)}
    if not state:
        raise ValueError(f"{ckpt / 'model.safetensors'} holds no '{AUTOENCODER_PREFIX}*' weights: not a tokenizer "
                         f"checkpoint")
    return state


def model_downsample(model: nn.Module) -> int:
    return autoencoder_downsample(model) if isinstance(model, AutoencoderKL) else model.downsample


def tokenizer_arch(model: nn.Module) -> dict[str, Any]:
    """JSON-able architecture record that `model_from_arch` rebuilds the (untrained) network from."""
    if isinstance(model, AutoencoderKL):
        return {"kind": "kl", "config": {k: _plain(model.config[k]) for k in KL_ARCH_KEYS if k in model.config}}
    if isinstance(model, VQAutoencoder):
        return {"kind": "vq", "config": dict(model.config)}
    raise TypeError(f"not a tokenizer autoencoder: {type(model).__name__}")


def model_from_arch(arch: dict[str, Any]) -> nn.Module:
    kind, config = arch.get("kind"), arch.get("config")
    if kind == "kl":
        return AutoencoderKL(**config)
    if kind == "vq":
        return VQAutoencoder(**config)
    raise ValueError(f"unknown tokenizer architecture record (kind={kind!r}); expected 'kl' or 'vq'")


def save_tokenizer_arch(model: nn.Module, run_dir: str | Path) -> Path:
    from ldm.io import atomic_write_text

    path = Path(run_dir) / ARCH_FILE
    atomic_write_text(path, json.dumps(tokenizer_arch(model), indent=2) + "\n")
    return path


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the architecture record and every inference tensor (as float32 bytes)."""
    h = hashlib.sha256(json.dumps(tokenizer_arch(model), sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        if name in VQ_TRAINING_BUFFERS:
            continue
        t = state[name].detach().to("cpu", torch.float32 if state[name].is_floating_point() else state[name].dtype)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------- frozen API
class Tokenizer(nn.Module):
    """A frozen tokenizer: `encode(images in [-1, 1]) -> latents`, `decode(latents) -> images`.

    KL: `encode` returns the posterior mean, or a posterior sample with `sample=True` (`generator` optional).
    VQ: `encode` returns the quantised latents; `encode_indices` the code indices; `decode` accepts either.
    `stats` holds the latent mean/std per channel and scaling factor when known (else None); `scaling_factor` is
    the scalar factor (stats, else a diffusers config's); `fingerprint` identifies the weights + architecture.
    """

    def __init__(self, model: nn.Module, *, stats: LatentStats | None = None, scaling_factor: float | None = None,
                 source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind = "kl" if isinstance(model, AutoencoderKL) else "vq"
        self.downsample = model_downsample(model)
        self.latent_channels = model.config.latent_channels if self.kind == "kl" else model.latent_channels
        self.fingerprint = fingerprint(model)
        if stats is not None and stats.fingerprint and stats.fingerprint != self.fingerprint:
            log.warning("latent statistics from %s belong to tokenizer %s, not %s: ignored", source,
                        stats.fingerprint, self.fingerprint)
            stats = None
        if stats is not None and len(stats.mean) != self.latent_channels:
            raise ValueError(f"latent statistics have {len(stats.mean)} channels; tokenizer {source!r} has "
                             f"{self.latent_channels}")
        self.stats = stats
        self.scaling_factor = stats.scaling_factor if stats is not None else scaling_factor
        self.source = source

    def train(self, mode: bool = True) -> "Tokenizer":
        return super().train(False)  # always frozen

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"tokenizer.encode expects images (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the tokenizer's downsampling "
                             f"factor {self.downsample}")

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> Posterior:
        if self.kind != "kl":
            raise ValueError("posterior() is defined for KL tokenizers only")
        self._check(images)
        return encode_posterior(self.model, images.to(self._dtype()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) float32 latents."""
        self._check(images)
        if self.kind == "kl":
            post = encode_posterior(self.model, images.to(self._dtype()))
            z = post.sample(generator) if sample else post.mean
        else:
            z = self.model.encode(images.to(self._dtype())).z_q
        return z.float()

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind != "vq":
            raise ValueError("encode_indices() is defined for VQ tokenizers only")
        self._check(images)
        return self.model.encode(images.to(self._dtype())).indices

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents (VQ: or (B, h, w) indices) -> (B, 3, H, W) float32 images, roughly in [-1, 1]."""
        if latents.dim() == 4 and latents.shape[1] != self.latent_channels:
            raise ValueError(f"tokenizer.decode expects {self.latent_channels} latent channels, got "
                             f"{latents.shape[1]} (shape {tuple(latents.shape)})")
        if self.kind == "kl":
            return decode_latent(self.model, latents.to(self._dtype())).float()
        if latents.is_floating_point():
            latents = latents.to(self._dtype())
        return self.model.decode(latents).float()


# ----------------------------------------------------------------------------------------------------------- loading
def _stats_beside(folder: Path) -> LatentStats | None:
    return load_latent_stats(folder / STATS_FILE) if (folder / STATS_FILE).is_file() else None


def _load_diffusers_folder(folder: Path) -> Tokenizer:
    vae = load_autoencoder_kl(folder)
    stats = _stats_beside(folder)
    cfg = vae.config
    if stats is None and cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        stats = LatentStats(mean=list(cfg.latents_mean), std=list(cfg.latents_std),
                            scaling_factor=float(cfg.scaling_factor), num_images=0)
    return Tokenizer(vae, stats=stats, scaling_factor=float(cfg.scaling_factor), source=str(folder))


def _load_vq_folder(folder: Path) -> Tokenizer:
    weights = folder / VQ_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"VQ tokenizer folder {str(folder)!r} has {VQ_CONFIG_FILE} but no {VQ_WEIGHTS_FILE}")
    model = model_from_arch({"kind": "vq", "config": json.loads((folder / VQ_CONFIG_FILE).read_text())})
    _load_strict(model, load_file(str(weights)), str(weights), allow_missing=VQ_TRAINING_BUFFERS)
    return Tokenizer(model, stats=_stats_beside(folder), source=str(folder))


def _load_strict(model: nn.Module, state: dict, what: str, allow_missing: tuple[str, ...] = ()) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allow_missing]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: weights do not match the tokenizer architecture; missing keys {missing[:8]}, "
                         f"unexpected keys {result.unexpected_keys[:8]}")


def _arch_for_run(run_dir: Path) -> dict[str, Any]:
    """The architecture record of a run: tokenizer_arch.json, else rebuilt from the run's config.yaml."""
    if (run_dir / ARCH_FILE).is_file():
        return json.loads((run_dir / ARCH_FILE).read_text())
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"tokenizer run {str(run_dir)!r} has neither {ARCH_FILE} nor config.yaml")
    from ldm.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    if cfg.stage != "tokenizer":
        raise ValueError(f"{str(run_dir)!r} is a {cfg.stage} run, not a tokenizer run")
    return tokenizer_arch(build_tokenizer(cfg.tokenizer, cfg.data.image_size))


def _load_run(path: Path, use_ema: bool) -> Tokenizer:
    from ldm.runs import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    model = model_from_arch(_arch_for_run(run_dir))
    ema_file = ckpt / "ema.safetensors"
    if use_ema and ema_file.is_file():
        _load_strict(model, load_file(str(ema_file)), str(ema_file))
        source = str(ema_file)
    else:
        source = str(ckpt / "model.safetensors")
        _load_strict(model, _autoencoder_part(load_file(source), ckpt), source)
    return Tokenizer(model, stats=_stats_beside(run_dir), source=source)


def load_tokenizer(path: str | Path, *, use_ema: bool = True, device: str | torch.device | None = None) -> Tokenizer:
    """A frozen `Tokenizer` from a run dir, checkpoint dir, export folder or diffusers AutoencoderKL folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
    if (path / VQ_CONFIG_FILE).is_file():
        tok = _load_vq_folder(path)
    elif (path / "config.json").is_file():
        tok = _load_diffusers_folder(path)
    elif is_run_or_checkpoint(path):
        tok = _load_run(path, use_ema)
    else:
        raise FileNotFoundError(f"{str(path)!r} is not a tokenizer: expected an ldm run directory ('latest'), a "
                                f"checkpoint directory ('state.pt'), a diffusers AutoencoderKL folder ('config.json') "
                                f"or a VQ export ('{VQ_CONFIG_FILE}')")
    return tok.to(device) if device is not None else tok


# ----------------------------------------------------------------------------------------------------------- export
def export_tokenizer(src: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write the tokenizer at `src` (see load_tokenizer) to `out_dir` for inference; returns out_dir.

    KL: `AutoencoderKL.from_pretrained(out_dir)` gives the same network (decodes identically) and its config carries
    scaling_factor / latents_mean / latents_std when statistics are known; without them, the source's own
    scaling_factor, else 1.0 and a warning (see the module docstring). Both kinds get latent_stats.json when known.
    """
    tok = load_tokenizer(src, use_ema=use_ema)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity_scale = tok.kind == "kl" and tok.stats is None and tok.scaling_factor is None
    if tok.kind == "kl":
        vae: AutoencoderKL = tok.model
        if tok.stats is not None:
            vae.register_to_config(scaling_factor=tok.stats.scaling_factor, latents_mean=list(tok.stats.mean),
                                   latents_std=list(tok.stats.std))
        elif identity_scale:  # the model's config holds diffusers' default, SD-VAE's 0.18215
            vae.register_to_config(scaling_factor=1.0)
        vae.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        from ldm.io import atomic_write_text, save_tensors

        state = {k: v for k, v in tok.model.state_dict().items() if k not in VQ_TRAINING_BUFFERS}
        save_tensors(out_dir / VQ_WEIGHTS_FILE, state)
        atomic_write_text(out_dir / VQ_CONFIG_FILE, json.dumps(tok.model.config, indent=2) + "\n")
    if tok.stats is not None:
        save_latent_stats(tok.stats, out_dir / STATS_FILE)
    else:
        scale_note = (", and its config.json says scaling_factor=1.0 (no scaling), not diffusers' default 0.18215 "
                      "(SD-VAE's)" if identity_scale else "")
        log.warning("%s has no latent statistics: exported without latent_stats.json%s. Run `ldm tokenizer-stats %s "
                    "--data ... --image-size ...` and export again to record them.", src, scale_note, src)
    log.info("exported %s tokenizer %s (fingerprint %s) to %s", tok.kind, src, tok.fingerprint, out_dir)
    return out_dir
