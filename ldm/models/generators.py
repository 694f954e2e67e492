"""The generator networks by name: `GENERATORS` maps `model.arch` to a factory that builds the network from the
model's own config section (ModelCfg), the latent shape and the number of classes.

Adding a network: write it beside dit.py / unet.py with the shared interface (ldm/models/__init__.py) and add one
entry here; `ModelCfg.arch` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ldm.config import ModelCfg


def build_dit_generator(model_cfg: ModelCfg, *, latent_channels: int, latent_size: int, num_classes: int,
                        repa_depth: int | None = None, caption: dict | None = None) -> nn.Module:
    """A DiT preset (model.preset) with the LightningDiT switches and the attention kernel of ModelCfg
    (model.attention=xformers without the package fails here, naming the install command); `caption` (caption_dim,
    caption_tokens, pooled_dim) makes it text-conditioned (ldm/models/text_cond.py)."""
    from ldm.models.dit import build_dit

    return build_dit(model_cfg.preset, input_size=latent_size, in_channels=latent_channels,
                     num_classes=num_classes, class_dropout_prob=model_cfg.class_dropout,
                     learn_sigma=model_cfg.learn_sigma, use_swiglu=model_cfg.use_swiglu,
                     use_rmsnorm=model_cfg.use_rmsnorm, use_rope=model_cfg.use_rope,
                     use_qknorm=model_cfg.use_qknorm, repa_depth=repa_depth, attn_backend=model_cfg.attention,
                     grad_checkpointing=model_cfg.grad_checkpointing, **(caption or {}))


def build_unet_generator(model_cfg: ModelCfg, *, latent_channels: int, latent_size: int, num_classes: int,
                         repa_depth: int | None = None, caption: dict | None = None) -> nn.Module:
    """The diffusers UNet adapter with ModelCfg's unet_* widths and depth (group norm over min(32, width) groups)."""
    from ldm.models.unet import UNetGenerator

    if repa_depth is not None:
        raise ValueError("diffusion.repa needs model.arch=dit (REPA aligns transformer hidden states)")
    if model_cfg.attention != "sdpa":  # refused rather than ignored: diffusers picks the UNet's attention processor
        raise ValueError(f"model.attention={model_cfg.attention!r} applies to model.arch=dit; the UNet uses "
                         f"diffusers' attention (leave model.attention=sdpa)")
    widths = tuple(model_cfg.unet_block_out_channels)
    if caption is not None:  # text: diffusers' UNet2DConditionModel (ldm/models/text_cond.py)
        from ldm.models.text_cond import TextUNetGenerator

        return TextUNetGenerator(input_size=latent_size, in_channels=latent_channels, **caption,
                                 class_dropout_prob=model_cfg.class_dropout, learn_sigma=model_cfg.learn_sigma,
                                 block_out_channels=widths, layers_per_block=model_cfg.unet_layers_per_block,
                                 norm_num_groups=min(32, *widths))
    return UNetGenerator(input_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
                         block_out_channels=widths, layers_per_block=model_cfg.unet_layers_per_block,
                         learn_sigma=model_cfg.learn_sigma, class_dropout_prob=model_cfg.class_dropout,
                         norm_num_groups=min(32, *widths))


GENERATORS: dict[str, Callable[..., nn.Module]] = {"dit": build_dit_generator, "unet": build_unet_generator}


def build_generator_model(model_cfg: ModelCfg, *, latent_channels: int, latent_size: int, num_classes: int,
                          repa_depth: int | None = None, caption: dict | None = None) -> nn.Module:
    """The network `model_cfg.arch` names, for latents (latent_channels, latent_size, latent_size); repa_depth asks
    for the hidden tokens of that block (REPA); `caption` {caption_dim, caption_tokens, pooled_dim} for text
    conditioning."""
    if model_cfg.arch not in GENERATORS:
        raise ValueError(f"model.arch={model_cfg.arch!r}; expected one of {sorted(GENERATORS)}")
    return GENERATORS[model_cfg.arch](model_cfg, latent_channels=latent_channels, latent_size=latent_size,
                                      num_classes=num_classes, repa_depth=repa_depth, caption=caption)
