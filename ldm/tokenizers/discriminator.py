"""NLayer PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", arXiv:1611.07004), as used by VQGAN / LDM / VA-VAE / EQ-VAE.

Matches CompVis/taming-transformers taming/modules/discriminator/model.py (NLayerDiscriminator + weights_init):
4x4 convs, stride 2 for the first `layers` convs and stride 1 for the last two, filters 64·min(2^n, 8), LeakyReLU 0.2,
no bias before a BatchNorm, conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02) with zero bias.
ActNorm (Kingma & Dhariwal 2018, Glow, arXiv:1807.03039 §3.1) follows taming/modules/util.py: a per-channel affine
initialised from the first training batch so that its output has zero mean and unit variance.
"""

from __future__ import annotations

import torch
from torch import nn

DISC_NORMS = ("batch", "act")


class ActNorm(nn.Module):
    """y = scale * (x + loc), with loc = -mean and scale = 1 / (std + 1e-6) of the first training batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1)  # (C, B*H*W)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1.0 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized) == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, 3, H, W) images in [-1, 1] -> (B, 1, H', W') real/fake logits, one per receptive-field patch."""

    def __init__(self, *, in_channels: int = 3, filters: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in DISC_NORMS:
            raise ValueError(f"discriminator norm={norm!r}; expected one of {DISC_NORMS}")
        if layers < 1:
            raise ValueError(f"discriminator layers={layers}; expected >= 1")
        norm_layer = nn.BatchNorm2d if norm == "batch" else ActNorm
        use_bias = norm != "batch"  # BatchNorm has its own affine shift
        seq: list[nn.Module] = [nn.Conv2d(in_channels, filters, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(filters * prev, filters * mult, 4, stride=stride, padding=1, bias=use_bias),
                    norm_layer(filters * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(filters * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """pix2pix / taming weights_init: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W')
