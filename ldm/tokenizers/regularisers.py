"""Tokenizer regularisers: one interface, one module each, one config section each.

A regulariser changes the tokenizer's generator ("gen") loss; the discriminator phase never sees it. Today:

    "eq"  EQ-VAE (eq.py, tokenizer.eq: EqCfg): decode a scaled/rotated latent and compare it with the image
          transformed the same way, or reconstruct a downscaled input (Kouzelis et al. 2025, arXiv:2502.09509)
    "va"  VA-VAE (va.py, tokenizer.va: VaCfg): align a projection of the latent with a frozen vision encoder's
          features, with an adaptive weight (Yao et al. 2025, arXiv:2501.01423)

`ldm.train.tokenizer_task.TokenizerTask` runs the enabled ones, in the order of `REGULARISERS`, at fixed points of
its gen step (x the batch, ae the autoencoder):

    x_in = r.prepare(x_in)                     the input the autoencoder encodes (EQ: prior-mode downscaling)
    z = ae.encode(x_in)                        the sampled (KL) or quantised (VQ) latent
    z_dec, target = r.transform(z_dec, target) what is decoded and what it is compared with (EQ: tau(z), tau(x))
    nll, GAN term                              unchanged: losses.py
    term, logs = r.loss(x_in=x_in, z=z, nll=nll, autoencoder=ae)
                                               a loss term added to the gen loss, or None, plus logged scalars
                                               (VA: the VF loss times its adaptive weight; EQ: the mode drawn)

`r.gen_parameters()` join the gen optimizer; the task registers each regulariser as a sub-module under `r.name`, so
its trainable weights are checkpointed as "<name>.*" (VA: "va.proj.weight"); `r.instant_logs` name scalars logged
as their value at the logging step rather than averaged. Per-batch draws in `prepare` come from torch's RNG, which
the TokenizerTask seeds by (seed, step, micro-batch) for that call, so every process draws the same and resumed runs
repeat the draws.

Adding a regulariser "foo": write ldm/tokenizers/foo.py with an nn.Module implementing `Regulariser` and
`build_foo(cfg: FooCfg, *, autoencoder) -> Regulariser`; add `FooCfg` (with `enabled: bool = False`) to
ldm/config.py as the section `TokenizerCfg.foo`; add the line `"foo": build_foo` to `REGULARISERS` below. Nothing
else changes: the task, the loop and the checkpoints pick it up. Regularisers are built after the autoencoder and
the discriminator, so switching one on leaves their initial weights as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ldm.config import TokenizerCfg
from ldm.tokenizers.eq import build_eq
from ldm.tokenizers.kinds import KINDS, kind_of
from ldm.tokenizers.va import build_va


class Regulariser(Protocol):
    """The hooks the TokenizerTask calls (see the module docstring); implementations are nn.Modules."""

    name: str                        # its config section (TokenizerCfg.<name>) and its state_dict prefix
    instant_logs: tuple[str, ...]    # log keys that are settings drawn per step, not losses to average

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The image the autoencoder encodes, from the batch (B, 3, H, W) -> (B, 3, H', W')."""

    def transform(self, z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent to decode, image to compare the decoding with) from the encoded latent and the prepared input."""

    def loss(self, *, x_in: torch.Tensor, z: torch.Tensor, nll: torch.Tensor,
             autoencoder: nn.Module) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(term added to the gen loss or None, scalars to log) from the prepared input, the latent as encoded and
        the reconstruction NLL (for an adaptive weight)."""

    def gen_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the gen optimizer updates with the autoencoder."""


# name -> builder(section, *, autoencoder); the section is TokenizerCfg.<name>, built when section.enabled
REGULARISERS: dict[str, Callable[..., Regulariser]] = {
    "eq": build_eq,
    "va": build_va,
}


def build_regularisers(cfg: TokenizerCfg, *, autoencoder: nn.Module) -> list[Regulariser]:
    """The enabled regularisers of a tokenizer config, in `REGULARISERS` order; a ValueError naming the key when the
    autoencoder's kind does not support one (`TokenizerKind.regularisers`)."""
    kind = kind_of(autoencoder)
    built = []
    for name, build in REGULARISERS.items():
        section = getattr(cfg, name)
        if section.enabled and name not in kind.regularisers:
            applies = sorted(k.name for k in KINDS.values() if name in k.regularisers)
            raise ValueError(f"tokenizer.{name}.enabled=true: the {name} regulariser does not apply to {kind.name} "
                             f"tokenizers (it applies to tokenizer.kind in {applies}); set tokenizer.{name}.enabled="
                             f"false")
        if section.enabled:
            built.append(build(section, autoencoder=autoencoder))
    return built
