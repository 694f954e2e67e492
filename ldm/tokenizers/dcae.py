"""DC-AE tokenizer: a `diffusers.AutoencoderDC` (Chen et al., "Deep Compression Autoencoder for Efficient
High-Resolution Diffusion Models", arXiv:2410.10733).

The network *is* diffusers' AutoencoderDC, a port of the reference mit-han-lab/efficientvit
`efficientvit/models/efficientvit/dc_ae.py`, so the released DC-AE diffusers folders (dc-ae-f32c32-in-1.0-diffusers,
dc-ae-f64c128-in-1.0-diffusers, the SANA autoencoder, ...) load from a local path with `from_pretrained` and ldm's
own DC-AE runs export back with `save_pretrained`.

Residual autoencoding (paper Sec. 3.2, Fig. 4): every downsampling block adds a non-parametric shortcut to its conv
path, space-to-channel (pixel-unshuffle by 2: C -> 4C channels) followed by averaging groups of 4C / C_out
consecutive channels; every upsampling block adds channel duplication (each channel repeated 4 C_out / C_in times)
followed by channel-to-space (pixel-shuffle by 2). The encoder output and the decoder input carry the same kind of
shortcut between the last width and the latent channels (averaging resp. duplicating). Stages hold ResBlocks
(conv 3x3 - act - conv 3x3 - norm, residual) or EfficientViTBlocks (ReLU linear attention with optional multi-scale
token aggregation, then a GLU MBConv; Cai et al. 2023). Name mapping to the reference: EfficientViTBlock with
qkv_multiscales [] = EViT_GLU, [5] = EViTS5_GLU; downsample "pixel_unshuffle" = ConvPixelUnshuffle, "conv" = Conv;
upsample "pixel_shuffle" = ConvPixelShuffle, "interpolate" = InterpolateConv; a first stage of depth 0 is the
reference's factor-2 project-in/out (depth_list [0, ...]).

Config: the shared keys `tokenizer.block_out_channels` (one width per stage, full resolution first, used by encoder
and decoder as in every released model; downsampling 2**(stages-1)) and `tokenizer.latent_channels`, plus the
DC-specific section `tokenizer.dc` (block types, depths, norms, activations, attention settings, up/down-sampling
blocks; one value for every stage or one per stage).

Training objective. DC-AE is a plain autoencoder, z = E(x), no posterior and no KL term (family "deterministic"). The
paper trains it in three decoupled phases (Sec. 3.3, "Decoupled High-Resolution Adaptation"): (1) low-resolution
full training with the reconstruction loss only, no GAN loss; (2) high-resolution latent adaptation and (3)
low-resolution local refinement, which tune only parts of the network (phase 3: the decoder's head layers, the only
phase with a GAN loss). ldm runs phase 1 in kind (all layers, `tokenizer.disc_weight=0`: mean |x - x_rec| +
perceptual_weight * LPIPS, ldm.train.tokenizer_task) and, when the GAN is switched on (`disc_weight > 0` from
`disc_start`), its PatchGAN with the adaptive weight of Esser et al. 2021 Eq. 7 at the decoder's output conv, on ALL
layers. Departures: phases 2 and 3 freeze parts of the network that neither the paper's text available to us nor
the reference code delimit exactly (the reference repository ships no autoencoder training code), so ldm offers no
layer-freezing options for them; the paper's loss weights, discriminator and optimizer settings are not published
with code either, so ldm's defaults apply.
EQ-VAE and VA-VAE act on the latent (EQ-VAE resizes and rotates it at the downsampling factor; VA-VAE projects it to
a frozen encoder's features and reads its adaptive weight at the encoder's output conv), so both apply.

Export: the config's `scaling_factor` (AutoencoderDC's own field, read by diffusers' SANA pipelines) carries the
latent statistics' scalar factor; the per-channel mean/std go to `latent_stats.json` beside it
(ldm.tokenizers.export), because AutoencoderDC has no latents_mean / latents_std fields and diffusers warns about
every unknown config key on loading.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC
from torch import nn

from ldm.config import ConfigError
from ldm.tokenizers.base import DIFFUSERS_WEIGHT_FILES, Encoded, TokenizerKind, load_diffusers_strict

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACT_FNS = ("silu", "relu")
# diffusers config keys that define the network (scaling_factor is inference metadata)
DC_ARCH_KEYS = ("in_channels", "latent_channels", "attention_head_dim", "encoder_block_types", "decoder_block_types",
                "encoder_block_out_channels", "decoder_block_out_channels", "encoder_layers_per_block",
                "decoder_layers_per_block", "encoder_qkv_multiscales", "decoder_qkv_multiscales",
                "upsample_block_type", "downsample_block_type", "decoder_norm_types", "decoder_act_fns",
                "encoder_out_shortcut", "decoder_in_shortcut", "decoder_conv_act_fn")


# ----------------------------------------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    """Tuples (diffusers' config values) as lists, recursively, so records built here and read from JSON compare."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _per_stage(key: str, values: list, n_stages: int, allowed: tuple | None = None) -> list:
    """One value for every stage, or one per stage; each in `allowed` when given."""
    values = list(values)
    if len(values) not in (1, n_stages):
        raise ConfigError(f"tokenizer.dc.{key}={values!r} has {len(values)} entries; expected 1 (every stage) or "
                          f"{n_stages} (one per entry of tokenizer.block_out_channels)")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"tokenizer.dc.{key}={values!r}: {bad} not allowed; expected names from {list(allowed)}")
    return values * n_stages if len(values) == 1 else values


def _check_depths(key: str, depths: list) -> None:
    bad = [d for d in depths if not isinstance(d, int) or d < 0]
    if bad or 0 in depths[1:]:
        raise ConfigError(f"tokenizer.dc.{key}={depths!r}: expected integers >= 1, except 0 for the first stage "
                          f"(a factor-2 space-to-channel input, as the released f32/f64 models' [0, ...])")


def _check_widths(widths: list, latent_channels: int, pixel_unshuffle: bool) -> None:
    """The shortcuts' channel arithmetic (module docstring): averaging / duplicating needs whole channel groups, and
    a pixel-unshuffle downsampler convolves to a quarter of its output width first."""
    for w_in, w_out in pairwise(widths):
        if (4 * w_in) % w_out:
            raise ConfigError(f"tokenizer.block_out_channels={widths!r}: the residual shortcut from width {w_in} to "
                              f"{w_out} averages groups of the 4*{w_in} space-to-channel features, so 4*{w_in} must be "
                              f"a multiple of {w_out}")
        if pixel_unshuffle and w_out % 4:
            raise ConfigError(f"tokenizer.block_out_channels={widths!r}: width {w_out} must be a multiple of 4 with "
                              f"tokenizer.dc.downsample_block_type=pixel_unshuffle")
    if widths[-1] % latent_channels:
        raise ConfigError(f"tokenizer.latent_channels={latent_channels} must divide the last width "
                          f"{widths[-1]} of tokenizer.block_out_channels (DC-AE averages / duplicates channel groups "
                          f"between them)")


def dc_autoencoder_kwargs(tok) -> dict[str, Any]:
    """AutoencoderDC constructor arguments from a TokenizerCfg (kind=dc), checked; raises ConfigError naming the key."""
    dc, widths = tok.dc, list(tok.block_out_channels)
    n = len(widths)
    enc_types = _per_stage("encoder_block_types", dc.encoder_block_types, n, BLOCK_TYPES)
    dec_types = _per_stage("decoder_block_types", dc.decoder_block_types, n, BLOCK_TYPES)
    enc_depths = _per_stage("encoder_layers_per_block", dc.encoder_layers_per_block, n)
    dec_depths = _per_stage("decoder_layers_per_block", dc.decoder_layers_per_block, n)
    _check_depths("encoder_layers_per_block", enc_depths)
    _check_depths("decoder_layers_per_block", dec_depths)
    _check_widths(widths, tok.latent_channels, dc.downsample_block_type == "pixel_unshuffle")
    for types, depths in ((enc_types, enc_depths), (dec_types, dec_depths)):
        for width, block, depth in zip(widths, types, depths):
            if block == "EfficientViTBlock" and depth and width % dc.attention_head_dim:
                raise ConfigError(f"tokenizer.dc.attention_head_dim={dc.attention_head_dim} must divide the width "
                                  f"{width} of every stage with EfficientViTBlocks")
    scales = [int(k) for k in dc.qkv_multiscales]
    return {"in_channels": 3, "latent_channels": tok.latent_channels, "attention_head_dim": dc.attention_head_dim,
            "encoder_block_types": enc_types, "decoder_block_types": dec_types,
            "encoder_block_out_channels": widths, "decoder_block_out_channels": widths,
            "encoder_layers_per_block": enc_depths, "decoder_layers_per_block": dec_depths,
            "encoder_qkv_multiscales": [scales] * n, "decoder_qkv_multiscales": [scales] * n,
            "upsample_block_type": dc.upsample_block_type, "downsample_block_type": dc.downsample_block_type,
            "decoder_norm_types": _per_stage("decoder_norm_types", dc.decoder_norm_types, n, NORM_TYPES),
            "decoder_act_fns": _per_stage("decoder_act_fns", dc.decoder_act_fns, n, ACT_FNS)}


def load_autoencoder_dc(folder: str | Path) -> AutoencoderDC:
    """AutoencoderDC.from_pretrained(folder) from local files only. A folder of another class, without weights or
    with weights that do not fill the network raises one line naming the file (diffusers itself would initialise
    missing tensors at random with a warning)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no diffusers AutoencoderDC at {str(folder)!r}: expected {str(config)!r} and "
                                f"{DIFFUSERS_WEIGHT_FILES[0]}")
    cls_name = json.loads(config.read_text()).get("_class_name")
    if cls_name != "AutoencoderDC":
        raise ValueError(f"{config}: _class_name is {cls_name!r}, not 'AutoencoderDC'")
    return load_diffusers_strict(AutoencoderDC, folder, example_repo="mit-han-lab/dc-ae-f32c32-in-1.0-diffusers")


# ----------------------------------------------------------------------------------------------------------- the kind
class DCKind(TokenizerKind):
    """`tokenizer.kind: dc`: a diffusers AutoencoderDC, z = E(x) (no posterior, no own loss term); exports as a
    diffusers folder."""

    name, family, module_type = "dc", "deterministic", AutoencoderDC
    regularisers = ("eq", "va")

    def build(self, cfg, image_size: int) -> nn.Module:
        return AutoencoderDC(**dc_autoencoder_kwargs(cfg))

    def arch(self, model: nn.Module) -> dict[str, Any]:
        return {k: _jsonable(model.config[k]) for k in DC_ARCH_KEYS if k in model.config}

    def from_arch(self, config: dict[str, Any]) -> nn.Module:
        return AutoencoderDC(**config)

    def downsample(self, model: nn.Module) -> int:
        return model.spatial_compression_ratio

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.latent_channels

    # the encoder / decoder directly: AutoencoderDC.encode / decode wrap them in output classes and tiling switches
    def encode_train(self, model, x, *, cfg, draws) -> Encoded:
        z = model.encoder(x)  # (B, C, H/f, W/f)
        return Encoded(z, z.new_zeros(()), {})

    def encode(self, model, x, *, sample=False, generator=None) -> torch.Tensor:
        return model.encoder(x)

    def decode(self, model, z) -> torch.Tensor:
        return model.decoder(z)  # (B, 3, H, W)

    def decoder_last_layer(self, model: nn.Module) -> torch.Tensor:
        """The output conv; with a depth-0 first stage it is the conv inside the factor-2 pixel-shuffle block."""
        conv_out = model.decoder.conv_out
        return (conv_out if isinstance(conv_out, nn.Conv2d) else conv_out.conv).weight

    def is_folder(self, folder: Path) -> bool:
        config = folder / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderDC"

    def save_folder(self, model, out_dir: Path, *, stats, scaling_factor: float | None) -> None:
        """save_pretrained with the statistics' scalar factor (else `scaling_factor`) as the config's
        scaling_factor; the per-channel statistics travel as latent_stats.json (module docstring)."""
        factor = stats.scaling_factor if stats is not None else scaling_factor
        if factor is not None:
            model.register_to_config(scaling_factor=float(factor))
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load_folder(self, folder: Path):
        model = load_autoencoder_dc(folder)
        return model, None, float(model.config.scaling_factor)
