"""Tokenizers on disk: build from the config, record the architecture, load a frozen tokenizer, export.

`load_tokenizer(path)` accepts, and tells apart by their files:
* an ldm tokenizer run directory (`latest` -> checkpoints/step_*/) or one checkpoint directory (`state.pt`):
  EMA weights (`ema.safetensors`) when present, else the autoencoder part of `model.safetensors`; the architecture
  comes from `tokenizer_arch.json` written into the run directory when training starts; a joint (end_to_end) run's
  tokenizer is the autoencoder part of `model.safetensors` with the generator's latent batch-norm statistics
  (`_load_joint_run`);
* an export folder of any kind (ldm.tokenizers.kinds decides whose it is: `TokenizerKind.is_folder`): a diffusers
  AutoencoderKL folder (`config.json` + weights, e.g. a downloaded SD-VAE), a VQ export (`vq_config.json` +
  `vq_model.safetensors`), or ldm's own folder of the other kinds (`tokenizer_config.json` + `tokenizer.safetensors`).
Latent statistics (`latent_stats.json`, see stats.py) are attached when they exist and belong to the same weights
(their fingerprint matches); a plain diffusers folder contributes its config's `scaling_factor` /
`latents_mean` / `latents_std`.

`export_tokenizer(src, out_dir)` writes the folder of the tokenizer's kind: a KL tokenizer as a diffusers folder
(save_pretrained, the statistics also registered in its config as scaling_factor / latents_mean / latents_std), a VQ
tokenizer as `vq_model.safetensors` + `vq_config.json`, plus `latent_stats.json` when statistics are known. A KL tokenizer without statistics keeps the scaling factor
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
from safetensors.torch import load_file
from torch import nn

from ldm.tokenizers.base import Posterior, load_strict
from ldm.tokenizers.kinds import KINDS, get_kind, kind_of
from ldm.tokenizers.stats import (
    STATS_FILE,
    LatentStats,
    load_latent_stats,
    save_latent_stats,
)

log = logging.getLogger(__name__)

ARCH_FILE = "tokenizer_arch.json"
AUTOENCODER_PREFIX = "autoencoder."  # the TokenizerTask attribute holding the autoencoder
JOINT_KEY = "joint"  # tokenizer_arch.json of a joint run (stage end_to_end): see _load_joint_run


# ----------------------------------------------------------------------------------------------------------- build
def build_tokenizer(cfg, image_size: int) -> nn.Module:
    """The trainable autoencoder of `cfg` (a TokenizerCfg) of kind cfg.kind (ldm.tokenizers.kinds), new or
    initialised from `cfg.pretrained` (an export / diffusers folder, or an ldm tokenizer run / checkpoint directory
    whose non-EMA autoencoder weights continue training). Raises ValueError when image_size is not a multiple of the
    downsampling factor or the pretrained tokenizer is of another kind."""
    kind = get_kind(cfg.kind)
    if cfg.pretrained is not None:
        model = load_pretrained_autoencoder(cfg.pretrained)
        found = kind_of(model).name
        if found != kind.name:
            raise ValueError(f"tokenizer.pretrained={cfg.pretrained!r} is a {found} tokenizer but "
                             f"tokenizer.kind={cfg.kind!r}")
    else:
        model = kind.build(cfg, image_size)
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
    """A trainable autoencoder from an export / diffusers folder or an ldm run (its non-EMA weights); hf:// too."""
    from ldm.hub import resolve_path

    path = resolve_path(path)
    if not is_run_or_checkpoint(path):
        return _load_folder(Path(path))[0]
    arch, full, ckpt = run_checkpoint_state(path)
    model = model_from_arch(arch)
    load_strict(model, _autoencoder_part(full, ckpt), str(ckpt / "model.safetensors"))
    log.info("initialised the %s autoencoder from %s (non-EMA weights)", arch["kind"], ckpt)
    return model


def _autoencoder_part(full: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    state = {k[len(AUTOENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(AUTOENCODER_PREFIX)}
    if not state:
        raise ValueError(f"{ckpt / 'model.safetensors'} holds no '{AUTOENCODER_PREFIX}*' weights: not a tokenizer "
                         f"checkpoint")
    return state


def model_downsample(model: nn.Module) -> int:
    return kind_of(model).downsample(model)


def tokenizer_arch(model: nn.Module) -> dict[str, Any]:
    """JSON-able architecture record {"kind", "config"} that `model_from_arch` rebuilds the (untrained) network
    from."""
    kind = kind_of(model)
    return {"kind": kind.name, "config": kind.arch(model)}


def model_from_arch(arch: dict[str, Any]) -> nn.Module:
    kind, config = arch.get("kind"), arch.get("config")
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer architecture record (kind={kind!r}); expected one of {sorted(KINDS)}")
    return KINDS[kind].from_arch(config)


def save_tokenizer_arch(model: nn.Module, run_dir: str | Path) -> Path:
    from ldm.io import atomic_write_text

    path = Path(run_dir) / ARCH_FILE
    atomic_write_text(path, json.dumps(tokenizer_arch(model), indent=2) + "\n")
    return path


def fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the architecture record and every inference tensor (as float32 bytes)."""
    h = hashlib.sha256(json.dumps(tokenizer_arch(model), sort_keys=True).encode())
    state = model.state_dict()
    skip = set(kind_of(model).training_buffers())
    for name in sorted(state):
        if name in skip:
            continue
        t = state[name].detach().to("cpu", torch.float32 if state[name].is_floating_point() else state[name].dtype)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------- frozen API
class Tokenizer(nn.Module):
    """A frozen tokenizer: `encode(images in [-1, 1]) -> latents`, `decode(latents) -> images`, of any kind
    (ldm.tokenizers.kinds).

    gaussian kinds (kl): `encode` returns the posterior mean, or a posterior sample with `sample=True` (`generator`
    optional); `posterior` the posterior. quantised kinds (vq): `encode` returns the quantised latents,
    `encode_indices` the code indices, and `decode` accepts either. `stats` holds the latent mean/std per channel and
    scaling factor when known (else None); `scaling_factor` is the scalar factor (stats, else a diffusers config's);
    `fingerprint` identifies the weights + architecture.
    """

    def __init__(self, model: nn.Module, *, stats: LatentStats | None = None, scaling_factor: float | None = None,
                 source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind_ops = kind_of(model)
        self.kind, self.family = self.kind_ops.name, self.kind_ops.family
        self.downsample = self.kind_ops.downsample(model)
        self.latent_channels = self.kind_ops.latent_channels(model)
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
        self._check(images)
        return self.kind_ops.posterior(self.model, images.to(self._dtype()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) float32 latents."""
        self._check(images)
        return self.kind_ops.encode(self.model, images.to(self._dtype()), sample=sample, generator=generator).float()

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.kind_ops.indices(self.model, images.to(self._dtype()))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents (quantised kinds: or (B, h, w) indices) -> (B, 3, H, W) float32 images, roughly in
        [-1, 1]."""
        if latents.dim() == 4 and latents.shape[1] != self.latent_channels:
            raise ValueError(f"tokenizer.decode expects {self.latent_channels} latent channels, got "
                             f"{latents.shape[1]} (shape {tuple(latents.shape)})")
        if latents.is_floating_point():
            latents = latents.to(self._dtype())
        return self.kind_ops.decode(self.model, latents).float()


# ----------------------------------------------------------------------------------------------------------- loading
def _stats_beside(folder: Path) -> LatentStats | None:
    return load_latent_stats(folder / STATS_FILE) if (folder / STATS_FILE).is_file() else None


def _load_folder(folder: Path) -> tuple[nn.Module, LatentStats | None, float | None]:
    """(network, statistics of the folder's own config, scaling factor) of an export folder of any kind."""
    for kind in KINDS.values():
        if kind.is_folder(folder):
            return kind.load_folder(folder)
    config = folder / "config.json"
    if config.is_file():
        cls_name = json.loads(config.read_text()).get("_class_name")
        raise ValueError(f"{str(folder)!r} holds a diffusers {cls_name}, which is not a tokenizer kind ldm reads "
                         f"(kinds: {sorted(KINDS)})")
    hint = " (a 'vae' sub-folder exists: point at it)" if (folder / "vae" / "config.json").is_file() else ""
    raise FileNotFoundError(f"{str(folder)!r} is not a tokenizer: expected an ldm run directory ('latest'), a "
                            f"checkpoint directory ('state.pt'), a diffusers AutoencoderKL folder ('config.json' + "
                            f"diffusion_pytorch_model.safetensors; download one, e.g. stabilityai/sd-vae-ft-ema, with "
                            f"`huggingface-cli download` into that folder) or an ldm export folder{hint}")


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
    arch = _arch_for_run(run_dir)
    model = model_from_arch(arch)
    if JOINT_KEY in arch:  # a joint run (stage end_to_end): its EMA file holds the generator
        return _load_joint_run(ckpt, model, arch[JOINT_KEY], use_ema)
    ema_file = ckpt / "ema.safetensors"
    if use_ema and ema_file.is_file():
        load_strict(model, load_file(str(ema_file)), str(ema_file))
        source = str(ema_file)
    else:
        source = str(ckpt / "model.safetensors")
        load_strict(model, _autoencoder_part(load_file(source), ckpt), source)
    return Tokenizer(model, stats=_stats_beside(run_dir), source=source)


def _load_joint_run(ckpt: Path, model: nn.Module, joint: dict[str, str], use_ema: bool) -> Tokenizer:
    """The tokenizer of a joint run (ldm.train.end_to_end_task, REPA-E). Its tokenizer_arch.json carries
    "joint": {"ema_module": prefix in model.safetensors of the module ema.safetensors averages (the generator),
    "latent_bn": prefix in that module of the batch norm that normalises the latents}. The tokenizer is trained
    without EMA (as REPA-E), so its weights are the "autoencoder." part of model.safetensors; its latent statistics
    are that batch norm's running mean and sqrt(running var), from the EMA weights unless use_ema=False (REPA-E
    save_vae_weights.py reads ckpt["ema"]["bn.running_mean" / "bn.running_var"]). The scaling factor is 1 / the
    pooled std over channels (equal counts per channel)."""
    source = str(ckpt / "model.safetensors")
    full = load_file(source)
    load_strict(model, _autoencoder_part(full, ckpt), source)
    ema_file = ckpt / "ema.safetensors"
    if use_ema and ema_file.is_file():
        state, prefix = load_file(str(ema_file)), joint["latent_bn"]
    else:
        state, prefix = full, joint["ema_module"] + joint["latent_bn"]
    mean, var = state[prefix + "running_mean"].double(), state[prefix + "running_var"].double()
    pooled_var = (var + mean.square()).mean() - mean.mean().square()
    stats = LatentStats(mean=mean.tolist(), std=var.sqrt().tolist(), scaling_factor=float(pooled_var.rsqrt()),
                        num_images=0, fingerprint=fingerprint(model))
    return Tokenizer(model, stats=stats, source=source)


def load_tokenizer(path: str | Path, *, use_ema: bool = True, device: str | torch.device | None = None) -> Tokenizer:
    """A frozen `Tokenizer` from a run dir, checkpoint dir, export folder or diffusers AutoencoderKL folder (each may
    be an hf://org/name[@rev][/sub] Hub reference, ldm.hub)."""
    from ldm.hub import resolve_path

    path = Path(resolve_path(path))
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
    if is_run_or_checkpoint(path):
        tok = _load_run(path, use_ema)
    else:
        model, own_stats, scaling_factor = _load_folder(path)
        tok = Tokenizer(model, stats=_stats_beside(path) or own_stats, scaling_factor=scaling_factor,
                        source=str(path))
    return tok.to(device) if device is not None else tok


# ----------------------------------------------------------------------------------------------------------- export
def export_tokenizer(src: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write the tokenizer at `src` (see load_tokenizer) to `out_dir` for inference, in its kind's folder format
    (kl: a diffusers AutoencoderKL folder; vq: vq_model.safetensors + vq_config.json); returns out_dir.

    KL: `AutoencoderKL.from_pretrained(out_dir)` gives the same network (decodes identically) and its config carries
    scaling_factor / latents_mean / latents_std when statistics are known; without them, the source's own
    scaling_factor, else 1.0 and a warning (see the module docstring). Every kind gets latent_stats.json when known.
    """
    tok = load_tokenizer(src, use_ema=use_ema)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity_scale = tok.stats is None and tok.scaling_factor is None
    tok.kind_ops.save_folder(tok.model, out_dir, stats=tok.stats,
                             scaling_factor=1.0 if identity_scale else tok.scaling_factor)
    if tok.stats is not None:
        save_latent_stats(tok.stats, out_dir / STATS_FILE)
    else:
        scale_note = (", and its config.json says scaling_factor=1.0 (no scaling), not diffusers' default 0.18215 "
                      "(SD-VAE's)" if identity_scale and (out_dir / "config.json").is_file() else "")
        log.warning("%s has no latent statistics: exported without latent_stats.json%s. Run `ldm tokenizer-stats %s "
                    "--data ... --image-size ...` and export again to record them.", src, scale_note, src)
    log.info("exported %s tokenizer %s (fingerprint %s) to %s", tok.kind, src, tok.fingerprint, out_dir)
    return out_dir
