"""UNet generator: an adapter over `diffusers.UNet2DModel` with the DiT forward interface.

The network is diffusers' ADM-style UNet (Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021,
arXiv:2105.05233): ResNet blocks with timestep-embedding injection, self-attention at the lower resolutions, skip
connections. Class conditioning uses its class embedding table, added to the timestep embedding; the table has
num_classes + 1 rows, the last (id num_classes) being the null label for classifier-free guidance; the label
convention (null label, dropout, checks) is `layers.condition_labels`, shared with ldm/models/dit.py.

Interface (shared with `DiT`): `forward(x, t, y, *, return_hidden=False, force_drop=None, generator=None)`, t (B,) in
[0, 1] in our convention (0 data, 1 noise). diffusers' sinusoidal timestep projection receives
`t_shift + t_scale * t` (default 1000 t, the DDPM step range diffusers UNets are built for). With
`return_hidden=True` the hidden tokens are the mid-block output flattened to (B, h*w, C_mid): a UNet has no block
index comparable to a transformer's, and the mid block is its most semantic representation (REPA's projector then
maps C_mid to the encoder width; repa_loss resizes the token grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from ldm.models.layers import GeneratorOutput, check_generator_inputs, check_label_settings, condition_labels


class UNetGenerator(nn.Module):
    """Class-conditional (num_classes > 0) or unconditional UNet on (B, C, H, W) latents."""

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 2,
        attention: Sequence[bool] | None = None,
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        t_scale: float = 1000.0,
        t_shift: float = 0.0,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        attention = [i > 0 for i in range(levels)] if attention is None else list(attention)
        if len(attention) != levels:
            raise ValueError(f"attention has {len(attention)} entries; expected one per level ({levels})")
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size={input_size} is not divisible by 2**(levels-1)={2 ** (levels - 1)}")
        if bad := [c for c in block_out_channels if c % norm_num_groups]:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        check_label_settings(num_classes, class_dropout_prob)
        self.input_size, self.in_channels, self.learn_sigma = input_size, in_channels, learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.t_scale, self.t_shift = t_scale, t_shift
        self.hidden_size = block_out_channels[-1]  # width of the tokens returned with return_hidden
        self.unet = UNet2DModel(
            sample_size=input_size,
            in_channels=in_channels,
            out_channels=self.out_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
        force_drop: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor | GeneratorOutput:
        """x (B, C, H, W), t (B,) or scalar in [0, 1] (0 data, 1 noise), y (B,) long or None (= null label)."""
        B = x.shape[0]
        t = check_generator_inputs(x, t, self.in_channels, self.input_size)  # (B,)
        y = condition_labels(y, batch=B, num_classes=self.num_classes, force_drop=force_drop,
                             dropout_prob=self.class_dropout_prob if self.training else 0.0, generator=generator,
                             device=x.device, net="UNet")  # (B,) or None

        captured = []
        hook = None
        if return_hidden:
            if self.unet.mid_block is None:
                raise ValueError("return_hidden=True needs the UNet's mid block")
            hook = self.unet.mid_block.register_forward_hook(lambda mod, args, out: captured.append(out))
        try:
            out = self.unet(x, self.t_shift + self.t_scale * t, class_labels=y, return_dict=False)[0]
            # out: (B, C_out, H, W)
        finally:
            if hook is not None:
                hook.remove()
        if not return_hidden:
            return out
        hidden = captured[0].flatten(2).transpose(1, 2)  # (B, C_mid, h, w) -> (B, h*w, C_mid)
        return GeneratorOutput(out, hidden)
