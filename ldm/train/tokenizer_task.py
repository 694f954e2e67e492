"""Stage 1 as a `Task`: an autoencoder (KL or VQ) trained with reconstruction + LPIPS + PatchGAN losses, optionally
regularised by EQ-VAE (equivariance) and VA-VAE (vision-foundation alignment).

One step = a generator ("gen") phase then a discriminator ("disc") phase per micro-batch, as the two optimizers of
taming/LDM (Esser et al. 2021; Rombach et al. 2022). The generator loss is

  KL (latent-diffusion contperceptual.py):  L = NLL + kl_weight * KL + lambda * disc_factor * L_G [+ lambda_vf L_vf]
      NLL = sum_{c,h,w} (|x - x_rec| + w_p LPIPS) / exp(logvar) + logvar, averaged over the batch
  VQ  (taming vqperceptual.py, LlamaGen vq_loss.py):  L = mean(|x - x_rec| + w_p LPIPS) + codebook + commitment
      [+ entropy] + lambda * disc_factor * L_G

with lambda the adaptive weight (losses.adaptive_weight, Esser et al. 2021 Eq. 7) times disc_weight and
disc_factor = [step >= disc_start]. The discriminator loss is disc_factor * L_D(D(x), D(sg[x_rec])).

EQ-VAE (eq.py) changes what is reconstructed: in the equivariance mode the decoder sees tau(z) and the target is
tau(x), with every loss term unchanged. VA-VAE (va.py) adds the VF loss of the (sampled, untransformed) latent.
The reconstruction of each gen micro-batch is cached (detached) and reused by the disc phase, so both phases see the
same EQ draw (the reference draws twice, once per Lightning optimizer call). All randomness uses torch's global RNG,
which the loop reseeds every step.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn
from torchvision.utils import make_grid

from ldm.tokenizers.discriminator import NLayerDiscriminator
from ldm.tokenizers.eq import (
    EQ_MODES,
    EqTransform,
    eq_scales,
    prior_scale_image,
    sample_eq_transform,
    transform_latent_and_image,
)
from ldm.tokenizers.export import (
    build_tokenizer,
    is_run_or_checkpoint,
    model_downsample,
    run_checkpoint_state,
    save_tokenizer_arch,
)
from ldm.tokenizers.kl import decode_latent, decoder_last_layer, encode_posterior, encoder_last_layer
from ldm.tokenizers.losses import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    adopt_weight,
    build_lpips,
    kl_diagonal_gaussian,
    lpips_loss,
    nll_loss,
    reconstruction_loss,
)
from ldm.tokenizers.va import VFAligner, vf_loss
from ldm.tokenizers.vq import VQAutoencoder
from ldm.train.task import StepOutput, Task

log = logging.getLogger(__name__)
PLAIN = EqTransform("plain", (1.0, 1.0), 0)


class EqSettings(NamedTuple):
    """EQ-VAE draw parameters (eq.sample_eq_transform)."""
    scales: list[float]
    p_equivariance: float = 0.5
    p_prior_scale: float = 0.25
    anisotropic: bool = False
    rotate: bool = True


class VfSettings(NamedTuple):
    """VA-VAE VF-loss weights and margins (va.vf_loss)."""
    vf_weight: float = 0.1
    margin_cos: float = 0.5
    margin_dist: float = 0.25
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    adaptive: bool = True


class TokenizerTask(Task):
    phases = ("gen", "disc")

    def __init__(self, *, autoencoder: nn.Module, discriminator: nn.Module, lpips: nn.Module | None,
                 perceptual_weight: float = 1.0, rec_loss: str = "l1", kl_weight: float = 1e-6,
                 logvar_init: float = 0.0, learn_logvar: bool = False, disc_start: int = 0, disc_weight: float = 0.5,
                 disc_adaptive: bool = True, disc_loss: str = "hinge", eq: EqSettings | None = None,
                 va: VFAligner | None = None, vf: VfSettings = VfSettings()):
        super().__init__()
        if perceptual_weight > 0 and lpips is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS network (pass lpips=build_lpips(...))")
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.va = va
        self.is_vq = isinstance(autoencoder, VQAutoencoder)
        if not self.is_vq:  # LDM's scalar output log-variance (contperceptual.py L23)
            self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.frozen = {"lpips": lpips}  # a dict: not registered, so not in state_dict / DDP / EMA
        self.perceptual_weight, self.rec_loss, self.kl_weight = perceptual_weight, rec_loss, kl_weight
        self.disc_start, self.disc_weight, self.disc_adaptive = disc_start, disc_weight, disc_adaptive
        self.g_loss, self.d_loss = G_LOSSES[disc_loss], D_LOSSES[disc_loss]
        self.eq, self.vf = eq, vf
        self.downsample = model_downsample(autoencoder)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------ Task API
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        gen = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if not self.is_vq and self.logvar.requires_grad:
            gen.append(self.logvar)
        if self.va is not None:
            gen += list(self.va.proj.parameters())
        return {"gen": gen, "disc": list(self.discriminator.parameters())}

    def ema_module(self) -> nn.Module:
        return self.autoencoder

    def forward(self, batch: dict[str, torch.Tensor], *, step: int, phase: str, micro: int = 0) -> StepOutput:
        if phase == "gen":
            return self._generator_step(batch["image"], step, micro)
        if phase == "disc":
            return self._discriminator_step(step, micro)
        raise ValueError(f"phase={phase!r}; expected one of {self.phases}")

    # ------------------------------------------------------------------------------------------------ phases
    def _lpips(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        net = self.frozen["lpips"]
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        return lpips_loss(net, x, x_rec)  # (B,)

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with the discriminator's parameters detached: the gen phase must not leave gradients on them (the
        references toggle requires_grad per optimizer); gradients still flow to x, BatchNorm statistics update."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def _generator_step(self, x: torch.Tensor, step: int, micro: int) -> StepOutput:
        t = PLAIN
        if self.eq is not None:
            t = sample_eq_transform(scales=self.eq.scales, p_equivariance=self.eq.p_equivariance,
                                    p_prior_scale=self.eq.p_prior_scale, anisotropic=self.eq.anisotropic,
                                    rotate=self.eq.rotate)
        x_in = prior_scale_image(x, t, self.downsample) if t.mode == "prior_scale" else x  # (B, 3, H', W')
        ae = self.autoencoder
        logs: dict[str, torch.Tensor] = {}
        if self.is_vq:
            q = ae.encode(x_in)
            z = q.z_q  # (B, D, h, w), straight-through
            reg = (q.codebook_loss + q.commit_loss).mean() + q.entropy_loss
            logs.update(loss_codebook=q.codebook_loss.mean(), loss_commit=q.commit_loss.mean(),
                        loss_entropy=q.entropy_loss, vq_perplexity=q.perplexity, vq_usage=q.usage)
        else:
            post = encode_posterior(ae, x_in)
            z = post.sample()  # (B, C, h, w)
            kl = kl_diagonal_gaussian(post.mean.float(), post.logvar.float()).mean()  # fp32 sums under autocast
            reg = self.kl_weight * kl
            logs.update(loss_kl=kl, logvar=self.logvar)
        target, z_dec = x_in, z
        if t.mode == "equivariance":
            z_dec, target = transform_latent_and_image(z, x_in, t, self.downsample)
        x_rec = (ae.decode(z_dec) if self.is_vq else decode_latent(ae, z_dec)).float()  # (B, 3, H', W')

        rec = reconstruction_loss(target, x_rec, self.rec_loss)  # (B, 3, H', W')
        p = self._lpips(target, x_rec) if self.perceptual_weight > 0 else rec.new_zeros(rec.shape[0])  # (B,)
        rec_total = rec + self.perceptual_weight * p.view(-1, 1, 1, 1)
        nll = rec_total.mean() if self.is_vq else nll_loss(rec_total, self.logvar).mean()
        loss = nll + reg
        logs.update(loss_rec=rec.mean(), loss_lpips=p.mean(), loss_nll=nll)

        disc_factor = adopt_weight(1.0, step, self.disc_start)
        if disc_factor > 0 and self.disc_weight > 0:
            g = self.g_loss(self._frozen_discriminator(x_rec)).mean()
            d_weight = (adaptive_weight(nll, g, decoder_last_layer(ae)) if self.disc_adaptive
                        else torch.ones((), device=g.device)) * self.disc_weight
            loss = loss + d_weight * disc_factor * g
            logs.update(loss_g=g, d_weight=d_weight)
        if self.va is not None:
            z_proj, feats = self.va(x_in, z)  # (B, D, h, w) each
            v = self.vf
            lvf = vf_loss(z_proj.float(), feats, margin_cos=v.margin_cos, margin_dist=v.margin_dist,
                          cos_weight=v.cos_weight, distmat_weight=v.distmat_weight).mean()
            vf_w = (adaptive_weight(nll, lvf, encoder_last_layer(ae), max_weight=1e8) if v.adaptive
                    else torch.ones((), device=lvf.device)) * v.vf_weight
            loss = loss + vf_w * lvf
            logs.update(loss_vf=lvf, vf_weight=vf_w)
        self._cache[micro] = (target.detach(), x_rec.detach())
        logs.update(loss=loss, eq_mode=torch.tensor(float(EQ_MODES.index(t.mode))))
        return StepOutput(loss, {k: float(v.detach()) for k, v in logs.items()})

    def _discriminator_step(self, step: int, micro: int) -> StepOutput:
        if micro not in self._cache:
            raise RuntimeError(f"disc phase for micro-batch {micro} ran before its gen phase (phases must be "
                               f"{self.phases} in this order)")
        target, x_rec = self._cache.pop(micro)
        disc_factor = adopt_weight(1.0, step, self.disc_start)
        logits_real = self.discriminator(target)  # (B, 1, h', w')
        logits_fake = self.discriminator(x_rec)
        loss = disc_factor * self.d_loss(logits_real, logits_fake).mean()
        return StepOutput(loss, {"loss_d": float(loss.detach()), "logits_real": float(logits_real.detach().mean()),
                                 "logits_fake": float(logits_fake.detach().mean())})

    # ------------------------------------------------------------------------------------------------ outputs
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Deterministic reconstruction (posterior mean / quantised latent) with `model` (default: the live one)."""
        model = self.autoencoder if model is None else model
        was_training = model.training
        model.eval()
        try:
            if isinstance(model, VQAutoencoder):
                return model(x)[0].float()
            return decode_latent(model, encode_posterior(model, x).mean).float()
        finally:
            model.train(was_training)

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], ema: nn.Module | None) -> torch.Tensor:
        """(3, H, W) grid in [0, 1]: inputs in the first row, reconstructions (EMA weights if given) below."""
        x = batch["image"][:8]
        x_rec = self.reconstruct(x, ema)
        grid = make_grid(torch.cat([x.float(), x_rec]), nrow=x.shape[0], padding=2, pad_value=1.0)
        return ((grid + 1.0) / 2.0).clamp(0.0, 1.0)


def build_tokenizer_task(cfg) -> tuple[TokenizerTask, torch.utils.data.Dataset]:
    """The TokenizerTask and training dataset of a RunConfig (stage=tokenizer). Missing LPIPS / foundation-encoder
    weights fail here, before training starts. Records the architecture in <run_dir>/tokenizer_arch.json."""
    from ldm.data.images import build_dataset

    tok = cfg.tokenizer
    autoencoder = build_tokenizer(tok, cfg.data.image_size)
    lpips = None
    if tok.perceptual_weight > 0:
        lpips = build_lpips(tok.lpips_weights, random_backbone=tok.lpips_random_backbone)
    elif tok.lpips_random_backbone:
        log.warning("tokenizer.lpips_random_backbone=true has no effect: tokenizer.perceptual_weight=0")
    eq = None
    if tok.eq.enabled:
        eq = EqSettings(scales=eq_scales(tok.eq.scale_num_min, tok.eq.scale_num_max, tok.eq.scale_den),
                        p_equivariance=tok.eq.p_equivariance, p_prior_scale=tok.eq.p_prior_scale,
                        anisotropic=tok.eq.anisotropic, rotate=tok.eq.rotate)
    disc = NLayerDiscriminator(in_channels=3, filters=tok.disc_filters, layers=tok.disc_layers, norm=tok.disc_norm)
    va = None  # built last, so switching VA-VAE on leaves the autoencoder's and discriminator's init as they were
    if tok.va.enabled:
        from ldm.encoders import build_encoder

        encoder = build_encoder(tok.va.encoder, weights_path=tok.va.weights)
        latent_channels = autoencoder.latent_channels if isinstance(autoencoder, VQAutoencoder) \
            else autoencoder.config.latent_channels
        va = VFAligner(encoder=encoder, feature_dim=encoder.feature_dim, latent_channels=latent_channels)
    task = TokenizerTask(autoencoder=autoencoder, discriminator=disc, lpips=lpips,
                         perceptual_weight=tok.perceptual_weight, rec_loss=tok.rec_loss, kl_weight=tok.kl_weight,
                         logvar_init=tok.logvar_init, learn_logvar=tok.learn_logvar, disc_start=tok.disc_start,
                         disc_weight=tok.disc_weight, disc_adaptive=tok.disc_adaptive, disc_loss=tok.disc_loss,
                         eq=eq, va=va, vf=VfSettings(vf_weight=tok.va.vf_weight, margin_cos=tok.va.margin_cos,
                                                     margin_dist=tok.va.margin_dist, cos_weight=tok.va.cos_weight,
                                                     distmat_weight=tok.va.distmat_weight, adaptive=tok.va.adaptive))
    if tok.pretrained is not None and is_run_or_checkpoint(tok.pretrained):
        _continue_from_run(task, tok.pretrained)
    save_tokenizer_arch(autoencoder, cfg.run_dir)
    return task, build_dataset(cfg.data)


def _continue_from_run(task: TokenizerTask, path: str) -> None:
    """Fine-tuning from an ldm tokenizer run also restores its discriminator, and the VA-VAE projection and the
    NLL log-variance when present and of the same shape (the references load the whole LightningModule state)."""
    _, full, ckpt = run_checkpoint_state(path)
    own = task.state_dict()
    restored = {k: v for k, v in full.items() if not k.startswith("autoencoder.") and k in own
                and own[k].shape == v.shape}
    missing_disc = [k for k in own if k.startswith("discriminator.") and k not in restored]
    if missing_disc:
        log.warning("%s: discriminator weights do not match this config (e.g. %s): the discriminator starts fresh",
                    ckpt, missing_disc[0])
        restored = {k: v for k, v in restored.items() if not k.startswith("discriminator.")}
    task.load_state_dict(restored, strict=False)
    log.info("restored %s from %s", sorted({k.split(".")[0] for k in restored}), ckpt)
