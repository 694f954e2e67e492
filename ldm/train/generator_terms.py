"""Auxiliary loss terms of the generator: the seam GeneratorTask.forward adds them through.

Each term is built from its own config section and called once per micro-batch with the step's `StepContext` (the
batch, the optimizer step, the normalised clean latents x0, the draws and the network's prediction from
ldm.diffusion.objectives.training_loss, the hidden tokens a term asked the network for); it returns its weighted
contribution to the loss (a 0-dim tensor, or None when it has nothing to add at this step) and detached scalars to
log. The task sums them onto the diffusion loss in the order of `build_generator_terms`.

    repa         REPA's alignment of the DiT's hidden tokens with a frozen encoder (Yu et al. 2024, arXiv:2410.06940;
                 the maths in ldm/diffusion/repa.py); numbers identical to the inline code it replaces
    lpl          latent perceptual loss through the frozen decoder's features (Berrada et al. 2025, arXiv:2411.04873;
                 ldm/diffusion/lpl.py)
    pixel_loss   pixel-space loss through the frozen decoder (Zhang et al. 2024, arXiv:2409.17565;
                 ldm/diffusion/pixel_loss.py)

The terms through the decoder form the model's clean-latent estimate by one code path for every prediction type,
ldm.diffusion.paths.x0_eps_from_prediction (eps, v, velocity, x0, score), and de-normalise it (and the true latent)
to the tokenizer's latent space with the task's LatentNormalizer before decoding. They are per-sample (B,) losses
averaged over the whole micro-batch, samples outside a term's time range contributing 0, so a batch split over
processes trains the same weights. The frozen networks stay held by the task (ldm.frozen.HoldsFrozen: outside its
state_dict, parameters, optimizers and DDP); terms only keep references, and a term is no nn.Module, so checkpoints
keep exactly their keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.config import ConfigError, DiffusionCfg
from ldm.config.schema import LplCfg, PixelLossCfg
from ldm.diffusion.paths import Path, x0_eps_from_prediction
from ldm.tokenizers.stats import LatentNormalizer

TermResult = tuple[Tensor | None, dict[str, Tensor]]


@dataclass
class StepContext:
    """What a term may read at one micro-batch of one optimizer step (shapes: B samples, latents (B, C, h, w))."""

    batch: dict[str, Tensor]
    step: int
    x0: Tensor                      # normalised true clean latents
    x_t: Tensor                     # the noised latents the network saw
    t: Tensor                       # (B,) times, t = 0 data, t = 1 noise
    noise: Tensor                   # the noise eps of x_t = alpha x0 + sigma eps
    out: Tensor                     # the network's prediction (first C channels with learned sigma)
    hidden: dict[str, Tensor] = field(default_factory=dict)  # hidden tokens (REPA)


# ------------------------------------------------------------------------------------------------------ shared parts
@dataclass
class _Estimate:
    """The clean-latent estimate of the selected samples, through the path's conversion, in the tokenizer's space."""

    path: Path
    prediction: str
    normalizer: LatentNormalizer

    def __call__(self, ctx: StepContext, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(z^_0 with gradients to the network, z_0 without) for samples `idx`, both de-normalised."""
        out, x_t = ctx.out[idx].float(), ctx.x_t[idx].float()
        x0_hat, _ = x0_eps_from_prediction(self.prediction, out, x_t, ctx.t[idx], self.path)
        return self.normalizer.denormalize(x0_hat), self.normalizer.denormalize(ctx.x0[idx].float()).detach()


def _batch_mean(per_sample: Tensor, idx: Tensor, batch: int) -> Tensor:
    """Mean over the whole batch of a per-sample loss known for samples `idx` (the others count 0)."""
    return per_sample.sum() / batch if idx.numel() else per_sample.new_zeros(())


# ------------------------------------------------------------------------------------------------------ REPA
@dataclass
class RepaTerm:
    projector: nn.Module
    encoder: nn.Module
    weight: float
    name: str = "repa"

    def __call__(self, ctx: StepContext) -> TermResult:
        from ldm.diffusion.repa import repa_loss

        with torch.no_grad():
            feats = self.encoder(ctx.batch["image"])  # (B, L_enc, D_enc)
        proj = repa_loss(self.projector(ctx.hidden["h"]), feats)  # (B,)
        return self.weight * proj.mean(), {"repa": proj.detach().mean()}


# ------------------------------------------------------------------------------------------------------ LPL
@dataclass
class LplTerm:
    cfg: LplCfg
    tokenizer: nn.Module            # the frozen ldm.tokenizers.export.Tokenizer
    estimate: _Estimate
    blocks: list[int]
    name: str = "lpl"

    def __call__(self, ctx: StepContext) -> TermResult:
        from ldm.diffusion.lpl import depth_weights, lpl_distance, lpl_gate
        from ldm.tokenizers.decoder_features import decoder_features

        c = self.cfg
        if ctx.step < c.start_step:
            return None, {}
        a, s = self.estimate.path.alpha_sigma(ctx.t.double())
        gate = lpl_gate((a / s) ** 2, c.snr_min)  # (B,)
        idx = gate.nonzero().flatten()
        per = ctx.x0.new_zeros(0)
        if idx.numel():
            z_hat, z = self.estimate(ctx, idx)
            model = self.tokenizer.model
            with torch.no_grad():
                target = decoder_features(model, z, self.blocks)
            est = decoder_features(model, z_hat, self.blocks, checkpoint=c.grad_checkpointing)
            shapes = [f.shape for f in est]
            weights = c.block_weights or depth_weights(shapes, z.shape[-2])
            image_side = z.shape[-2] * self.tokenizer.downsample
            per = lpl_distance(est, target, weights=weights, downsamples=[image_side / sh[-2] for sh in shapes],
                               mask_outliers=c.outlier_mask)  # (n,)
        value = _batch_mean(per, idx, ctx.x0.shape[0])
        return c.weight * value, {"lpl": value.detach(), "lpl_frac": gate.float().mean()}


# ------------------------------------------------------------------------------------------------------ pixel loss
@dataclass
class PixelTerm:
    cfg: PixelLossCfg
    tokenizer: nn.Module
    estimate: _Estimate
    name: str = "pixel"

    def __call__(self, ctx: StepContext) -> TermResult:
        from ldm.diffusion.pixel_loss import pixel_distance, time_window
        from ldm.tokenizers.decoder_features import decode

        c = self.cfg
        idx = time_window(ctx.t, c.t_min, c.t_max).nonzero().flatten()
        per = ctx.x0.new_zeros(0)
        if idx.numel():
            z_hat, z = self.estimate(ctx, idx)
            model = self.tokenizer.model
            with torch.no_grad():
                target = ctx.batch["image"][idx] if c.target == "image" else decode(model, z)
            decoded = decode(model, z_hat, checkpoint=c.grad_checkpointing)  # (n, 3, H, W)
            per = pixel_distance(decoded, target, c.distance)
        value = _batch_mean(per, idx, ctx.x0.shape[0])
        return c.weight * value, {"pixel": value.detach()}


# ------------------------------------------------------------------------------------------------------ building
def check_decoder_terms(cfg) -> None:
    """Config facts of the decoder terms checked before anything is loaded (a RunConfig): they need a tokenizer
    (whose decoder they run; a latent cache alone has none) and the pixel loss's image target needs the images."""
    d = cfg.diffusion
    for key, on in (("diffusion.lpl", d.lpl.enabled), ("diffusion.pixel_loss", d.pixel_loss.enabled)):
        if on and cfg.tokenizer.checkpoint is None and cfg.tokenizer.pretrained is None:
            raise ConfigError(f"{key}.enabled=true needs the tokenizer's decoder: set tokenizer.checkpoint=<the "
                              f"tokenizer run or export{' the latent cache was made with' if cfg.data.latents else ''}"
                              f"> (or tokenizer.pretrained=<diffusers AutoencoderKL folder>)")
    if d.pixel_loss.enabled and d.pixel_loss.target == "image" and cfg.data.latents is not None:
        raise ConfigError("diffusion.pixel_loss.target=image needs the training images, and data.latents is set: use "
                          "diffusion.pixel_loss.target=decoded (the tokenizer's reconstruction of the cached latent) "
                          "or unset data.latents")


def build_generator_terms(d: DiffusionCfg, *, path: Path, tokenizer: nn.Module, normalizer: LatentNormalizer,
                          projector: nn.Module | None = None, encoder: nn.Module | None = None
                          ) -> list[Callable[[StepContext], TermResult]]:
    """The auxiliary terms a DiffusionCfg switches on, in a fixed order (REPA, LPL, pixel loss). Bad settings are
    one-line ValueErrors naming the key: a decoder without named feature blocks, block indices out of range, block
    weights of another length, an empty time range."""
    from ldm.tokenizers.decoder_features import check_blocks, num_feature_blocks

    terms: list = []
    if projector is not None:
        terms.append(RepaTerm(projector, encoder, d.repa_weight))
    estimate = _Estimate(path, d.prediction, normalizer)
    if d.lpl.enabled:
        n = num_feature_blocks(tokenizer.model, "diffusion.lpl.blocks")
        blocks = check_blocks(tokenizer.model, d.lpl.blocks or list(range(n)), "diffusion.lpl.blocks")
        if d.lpl.block_weights and len(d.lpl.block_weights) != len(blocks):
            raise ConfigError(f"diffusion.lpl.block_weights={list(d.lpl.block_weights)!r} has "
                              f"{len(d.lpl.block_weights)} entries for the {len(blocks)} blocks {blocks}; give one "
                              f"per block (in ascending block order) or [] for the depth weights")
        terms.append(LplTerm(d.lpl, tokenizer, estimate, blocks))
    if d.pixel_loss.enabled:
        if d.pixel_loss.t_min > d.pixel_loss.t_max:
            raise ConfigError(f"diffusion.pixel_loss.t_min={d.pixel_loss.t_min} > t_max={d.pixel_loss.t_max}; "
                              f"expected t_min <= t_max")
        num_feature_blocks(tokenizer.model, "diffusion.pixel_loss")  # a decoder this module can run with gradients
        terms.append(PixelTerm(d.pixel_loss, tokenizer, estimate))
    return terms
