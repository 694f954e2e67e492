"""REPA-E as a `Task` (stage end_to_end): the tokenizer, its discriminator and the generator trained together.

Paper: Leng, Singh, Hou, Xing, Xie, Zheng 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion
Transformers" (arXiv:2504.10483), §3 and Algorithm 1. Reference: End2End-Diffusion/REPA-E train_repae.py (the step),
configs/l1_lpips_kl_gan.yaml + loss/losses.py (the tokenizer loss), models/sit.py (the batch norm, the interpolant,
the alignment loss). REPA-E's time convention is ours already (models/sit.py L290-295: alpha = 1 - t, sigma = t, data
at t = 0); its "v" prediction is the velocity d x_t / dt = eps - x0, ldm's diffusion.prediction=velocity.

One optimizer step = three phases on the same micro-batches (loop phases "tokenizer", "disc", "model"), then the EMA:

  (a) tokenizer (train_repae.py L357-398), generator and projector frozen and in eval mode (L371-374):
        z ~ q(z|x), x^ = D(z)
        L_tok = |x - x^|_1 / exp(logvar) + w_p LPIPS(x, x^) + w_kl KL(q || N(0, I))
                + w_gan [step >= disc_start] (-mean Disc(x^)) + lambda_tok L_REPA(z)
      L1 is the mean over pixels and LPIPS the batch mean (losses.py L306-315, L353), KL summed over latent elements
      and averaged over the batch (L355-356), the GAN weight fixed (d_weight = discriminator_weight, L320-328;
      tokenizer.disc_adaptive=true multiplies Esser et al.'s adaptive weight in, REPA-E's config has none).
      L_REPA(z) runs the frozen generator on BN_eval(z) with gradients flowing to z only (L378-389): x_t =
      alpha_t BN(z) + sigma_t eps, h = block-k tokens, L_REPA = -mean_n cos(y_n, h_phi(h_n)) (models/sit.py
      L372-379). The denoising loss never reaches the tokenizer (REPA-E §3.2: it would collapse the latent space):
      it is not part of L_tok, and the generator phase sees z detached.
  (b) discriminator (L400-407): L_D = [step >= disc_start] hinge(Disc(x), Disc(sg[x^])), x^ from phase (a).
  (c) generator (L413-432) on sg[z] from phase (a), BN in train mode (batch statistics, running ones updated),
      the same t and eps as phase (a) (L390-392), label dropout on:
        L_gen = || v_theta(x_t, t, y) - (eps - BN(sg[z])) ||^2 + lambda_gen L_REPA
  then the EMA of the generator (L434-437: SiT, projector and the batch norm's running statistics; ldm averages the
  generator network and the batch norm, not the projector, which sampling never uses). The tokenizer and the
  discriminator have no EMA in REPA-E, nor here.

Defaults as REPA-E (configs/imagenet256/repae_*.yaml set them): lambda_tok = e2e.tokenizer_align_weight 1.5
(--vae-align-proj-coeff), lambda_gen = diffusion.repa_weight 0.5 (--proj-coeff), w_kl 1e-6, w_gan 0.1 from step 0,
w_p 1, logvar 0 (fixed), AdamW lr 1e-4 for each of the three optimizers (e2e.tokenizer_lr, e2e.disc_lr, optim.lr),
betas (0.9, 0.999), no weight decay, each model's gradients clipped to norm 1 on their own (--max-grad-norm: the
loop clips every phase's group separately with optim.grad_clip).

Departures: LPIPS sees images in [-1, 1], its documented range (REPA-E's loss/lpips.py L92 maps [0, 1] to [-1, 1] but
train_repae.py L357 feeds it [-1, 1] images already); the alignment pass runs the whole network where REPA-E stops
after block k (`align_only`: same numbers, more compute); per-sample draws (below) instead of the global RNG.

Draws (STYLE.md §5): the posterior sample, t then eps, and the label dropout of each sample come from generators keyed
by its "sample_seed" (as the tokenizer and generator stages), the batch-norm statistics are those of the global batch
(ldm/models/latent_bn.py), so 1 process with batch B and N processes with B/N train the same models up to float
reduction order, except through the discriminator's own BatchNorm statistics (per process, as the tokenizer stage
documents) once the GAN term is on.
"""

from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn

from ldm.config import ConfigError, DiffusionCfg, RunConfig, SampleCfg, TokenizerCfg
from ldm.config.schema import E2eCfg
from ldm.data.sampler import sample_generators
from ldm.diffusion.objectives import training_loss
from ldm.diffusion.paths import get_path
from ldm.diffusion.repa import repa_loss
from ldm.frozen import HoldsFrozen
from ldm.models.latent_bn import LatentBatchNorm
from ldm.tokenizers.kinds import get_kind, kind_of
from ldm.tokenizers.losses import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    adopt_weight,
    build_lpips,
    lpips_loss,
    reconstruction_loss,
)
from ldm.tokenizers.stats import LatentNormalizer
from ldm.train.task import StepOutput, Task

log = logging.getLogger(__name__)

GENERATOR_PREFIX = "generator."  # the task attribute EMA'd (state_dict prefix), see LatentGenerator
BN_PREFIX = "bn."                # the latent batch norm inside it


class LatentGenerator(nn.Module):
    """The generator as REPA-E's SiT holds it (models/sit.py L218, L318): the latent batch norm `bn` applied to the
    clean latent, then the network `net` (ldm/models interface net(x_t, t, y)). The EMA averages both."""

    def __init__(self, net: nn.Module, bn: LatentBatchNorm):
        super().__init__()
        self.net, self.bn = net, bn

    def normalizer(self) -> LatentNormalizer:
        """The channel normaliser sampling de-normalises with: running mean and sqrt(running var) (latent_bn.py)."""
        mean, std = self.bn.latent_mean_std()
        return LatentNormalizer("channel", self.bn.channels, mean=mean, std=std).to(mean.device)


class _LiveDecoder(nn.Module):
    """decode() of the live autoencoder for the sample grids (ldm.eval.Generator's tokenizer slot), in eval mode and
    without gradients; the autoencoder's mode is restored afterwards."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder, self.kind = autoencoder, kind_of(autoencoder)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        was = self.autoencoder.training
        self.autoencoder.eval()
        try:
            return self.kind.decode(self.autoencoder, z.to(next(self.autoencoder.parameters()).dtype)).float()
        finally:
            self.autoencoder.train(was)


class EndToEndTask(HoldsFrozen, Task):
    """REPA-E's joint step (module docstring). Trainable: `autoencoder`, `discriminator`, `generator`
    (LatentGenerator: network + latent batch norm), `projector` (REPA's h_phi). Frozen (not in the state_dict): the
    vision `encoder` and `lpips`."""

    phases = ("tokenizer", "disc", "model")

    def __init__(self, *, autoencoder: nn.Module, discriminator: nn.Module, generator: LatentGenerator,
                 projector: nn.Module, encoder: nn.Module, lpips: nn.Module | None, tokenizer_cfg: TokenizerCfg,
                 e2e: E2eCfg, diffusion: DiffusionCfg, num_classes: int, latent_shape: tuple[int, int, int],
                 learned_sigma: bool = False, sample: SampleCfg | None = None):
        super().__init__()
        if tokenizer_cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("tokenizer.perceptual_weight > 0 needs an LPIPS network (pass lpips=build_lpips(...))")
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.generator, self.projector = generator, projector
        self.add_frozen("encoder", encoder)
        self.add_frozen("lpips", lpips)
        self.kind = kind_of(autoencoder)
        self.tok_cfg, self.e2e, self.diffusion = tokenizer_cfg, e2e, diffusion
        self.sample = sample if sample is not None else SampleCfg()
        self.num_classes, self.latent_shape, self.learned_sigma = num_classes, tuple(latent_shape), learned_sigma
        self.path = get_path(diffusion.path)
        self.g_loss, self.d_loss = G_LOSSES[tokenizer_cfg.disc_loss], D_LOSSES[tokenizer_cfg.disc_loss]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}  # micro-batch -> what phase (a) hands to (b) and (c)

    # ------------------------------------------------------------------------------------------------ Task API
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        def trainable(m: nn.Module) -> list[nn.Parameter]:  # the batch norm's statistics are frozen parameters
            return [p for p in m.parameters() if p.requires_grad]

        return {"tokenizer": trainable(self.autoencoder), "disc": trainable(self.discriminator),
                "model": trainable(self.generator) + trainable(self.projector)}

    def optimizer_settings(self, phase: str) -> dict:
        """REPA-E's three AdamW optimizers (train_repae.py L226-246): the tokenizer's and the discriminator's lr from
        e2e.*, the generator's optim.lr; the same betas / eps / weight decay (optim.*)."""
        lr = {"tokenizer": self.e2e.tokenizer_lr, "disc": self.e2e.disc_lr}.get(phase)
        return {"lr": lr} if lr else {}

    def ema_module(self) -> nn.Module:
        return self.generator

    def compile_modules(self, compile_fn) -> list[str]:
        """The autoencoder's encoder and decoder and the DiT's blocks (where the step spends its time)."""
        names = []
        for name in ("encoder", "decoder"):
            part = getattr(self.autoencoder, name, None)
            if isinstance(part, nn.Module):
                compile_fn(part)
                names.append(f"autoencoder.{name}")
        if hasattr(self.generator.net, "compile_blocks"):
            names += [f"generator.net.{n}" for n in self.generator.net.compile_blocks(compile_fn)]
        return names

    def describe(self) -> dict:
        return {"kind": "end_to_end", "tokenizer_kind": self.kind.name, "latent_shape": list(self.latent_shape),
                "num_classes": self.num_classes, "draws": "per_sample"}

    def forward(self, batch: dict[str, torch.Tensor], *, step: int, phase: str, micro: int = 0) -> StepOutput:
        if phase == "tokenizer":
            return self._tokenizer_step(batch, step, micro)
        if phase in ("disc", "model") and micro not in self._cache:
            raise RuntimeError(f"phase {phase} for micro-batch {micro} ran before its tokenizer phase (phases must be "
                               f"{self.phases} in this order)")
        if phase == "disc":
            return self._discriminator_step(step, micro)
        if phase == "model":
            return self._generator_step(micro)
        raise ValueError(f"phase={phase!r}; expected one of {self.phases}")

    # ------------------------------------------------------------------------------------------------ pieces
    def _draws(self, batch: dict[str, torch.Tensor], purpose: str, device) -> list[torch.Generator] | None:
        """Per-sample generators for one draw (None without "sample_seed": torch's global RNG)."""
        return sample_generators(batch["sample_seed"], purpose, device) if "sample_seed" in batch else None

    def _denoise(self, net_fn, x0: torch.Tensor, y: torch.Tensor | None, *, t=None, noise=None, draws=None,
                 labels: dict | None = None) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
        """ldm.diffusion.objectives.training_loss of `net_fn` (a callable like the network) on normalised latents
        x0: (per-sample loss (B,), its logs, the block-k hidden tokens (B, L, D), state {x_t, t, noise, out})."""
        d, hidden, state = self.diffusion, {}, {}

        def model_fn(x_t, tt):
            out = net_fn(x_t, tt, y, return_hidden=True, **(labels or {}))
            hidden["h"] = out.hidden  # (B, L, D)
            return out.output

        timesteps = None if d.path.startswith("ddpm") else d.t_sampler
        loss, logs = training_loss(model_fn, x0, path=self.path, prediction=d.prediction, t=t, noise=noise,
                                   generator=draws, timesteps=timesteps, logit_mean=d.t_mean, logit_std=d.t_std,
                                   shift=d.t_shift, weighting=None if d.weighting == "none" else d.weighting,
                                   min_snr_gamma=d.min_snr_gamma, cos_loss_weight=d.cos_loss_weight,
                                   learned_sigma=self.learned_sigma, state=state)
        return loss, logs, hidden["h"], state

    def frozen_alignment(self, z: torch.Tensor, y: torch.Tensor | None, feats: torch.Tensor,
                         draws=None) -> tuple[torch.Tensor, dict]:
        """L_REPA(z) through the frozen generator (phase (a), train_repae.py L371-392): generator and projector in
        eval mode (running batch-norm statistics, no label dropout) with their parameters detached, so the gradient
        reaches z only. Returns (the alignment loss, a 0-dim tensor; {t, noise} drawn here for phase (c))."""
        from torch.func import functional_call

        gen = self.generator
        was = gen.training, self.projector.training
        gen.eval()
        self.projector.eval()
        try:
            net_params = {n: p.detach() for n, p in gen.net.named_parameters()}
            proj_params = {n: p.detach() for n, p in self.projector.named_parameters()}

            def frozen_net(x_t, t, y_, **kw):
                return functional_call(gen.net, net_params, (x_t, t, y_), kw)

            x0 = gen.bn(z)  # (B, C, h, w), eval: (z - running_mean) / sqrt(running_var + eps)
            _, _, h, state = self._denoise(frozen_net, x0, y, draws=draws)
            proj = functional_call(self.projector, proj_params, (h,))  # (B, L, D_enc)
            align = repa_loss(proj, feats).mean()
        finally:
            gen.train(was[0])
            self.projector.train(was[1])
        return align, {"t": state["t"].detach(), "noise": state["noise"].detach()}

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """Disc(x) with the discriminator's parameters detached (REPA-E losses.py L322-326 switch requires_grad off):
        gradients reach x only; its BatchNorm statistics update as in the reference's train-mode call."""
        from torch.func import functional_call

        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (x,))

    # ------------------------------------------------------------------------------------------------ phases
    def _tokenizer_step(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> StepOutput:
        cfg, ae, x = self.tok_cfg, self.autoencoder, batch["image"]
        if micro == 0:
            self._cache.clear()
        y = batch["label"] if self.num_classes > 0 else None
        enc = self.kind.encode_train(ae, x, cfg=cfg, draws=self._draws(batch, "posterior", x.device))
        z = enc.z  # (B, C, h, w) posterior sample, attached to the encoder
        x_rec = self.kind.decode(ae, z).float()  # (B, 3, H, W)
        rec = reconstruction_loss(x, x_rec, cfg.rec_loss).mean() / math.exp(cfg.logvar_init)  # losses.py L306-312, L353
        lp = (lpips_loss(self.frozen("lpips"), x, x_rec).mean() if cfg.perceptual_weight > 0
              else rec.new_zeros(()))  # losses.py L315
        nll = rec + cfg.perceptual_weight * lp
        loss = nll + enc.loss  # + kl_weight * KL (losses.py L355-361)
        logs = {"loss_rec": rec, "loss_lpips": lp, **enc.logs}
        disc_factor = adopt_weight(1.0, step, cfg.disc_start)
        if disc_factor > 0 and cfg.disc_weight > 0:
            g = self.g_loss(self._frozen_discriminator(x_rec)).mean()  # -mean Disc(x^) (losses.py L325-326)
            d_weight = (adaptive_weight(nll, g, self.kind.decoder_last_layer(ae)) if cfg.disc_adaptive
                        else torch.ones((), device=g.device)) * cfg.disc_weight
            loss = loss + d_weight * disc_factor * g
            logs.update(loss_g=g, d_weight=d_weight)
        with torch.no_grad():
            feats = self.frozen("encoder")(x)  # (B, L_enc, D_enc), train_repae.py L343-351
        align, drawn = self.frozen_alignment(z, y, feats, draws=self._draws(batch, "diffusion", x.device))
        loss = loss + self.e2e.tokenizer_align_weight * align
        logs.update(align_tok=align, loss_tok=loss)
        self._cache[micro] = {"image": x, "x_rec": x_rec.detach(), "z": z.detach(), "feats": feats, **drawn,
                              **({"sample_seed": batch["sample_seed"]} if "sample_seed" in batch else {}),
                              **({"label": y} if y is not None else {})}
        return StepOutput(loss, {k: float(v.detach()) for k, v in logs.items()})

    def _discriminator_step(self, step: int, micro: int) -> StepOutput:
        c = self._cache[micro]
        disc_factor = adopt_weight(1.0, step, self.tok_cfg.disc_start)
        logits_real = self.discriminator(c["image"])  # (B, 1, h', w')
        logits_fake = self.discriminator(c["x_rec"])
        loss = disc_factor * self.d_loss(logits_real, logits_fake).mean()  # losses.py L244-254
        return StepOutput(loss, {"loss_d": float(loss.detach()), "logits_real": float(logits_real.detach().mean()),
                                 "logits_fake": float(logits_fake.detach().mean())})

    def _generator_step(self, micro: int) -> StepOutput:
        c = self._cache.pop(micro)
        z = c["z"]  # detached in phase (a): no gradient of this phase reaches the tokenizer (train_repae.py L418)
        x0 = self.generator.bn(z)  # train mode: global-batch statistics, running statistics updated
        labels = ({"generator": sample_generators(c["sample_seed"], "label_dropout", z.device)}
                  if "sample_seed" in c else {})
        loss, logs, h, _ = self._denoise(self.generator.net, x0, c.get("label"), t=c["t"], noise=c["noise"],
                                         labels=labels)
        align = repa_loss(self.projector(h), c["feats"]).mean()
        total = loss.mean() + self.diffusion.repa_weight * align  # train_repae.py L427
        logs.update(repa=align.detach())
        return StepOutput(total, {k: float(v) for k, v in logs.items()})

    # ------------------------------------------------------------------------------------------------ outputs
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-mean reconstruction with the live autoencoder (eval mode, restored afterwards)."""
        was = self.autoencoder.training
        self.autoencoder.eval()
        try:
            return self.kind.decode(self.autoencoder, self.kind.encode(self.autoencoder, x)).float()
        finally:
            self.autoencoder.train(was)

    def sampler(self, generator: LatentGenerator | None = None):
        """The inference Generator (ldm.eval.generator) of `generator` (the EMA copy; default the live one), decoding
        with the live autoencoder and de-normalising with that generator's batch-norm statistics."""
        from ldm.eval.generator import Generator

        g = self.generator if generator is None else generator
        return Generator(model=g.net, normalizer=g.normalizer(), tokenizer=_LiveDecoder(self.autoencoder),
                         path=self.path, prediction=self.diffusion.prediction, num_classes=self.num_classes,
                         latent_shape=self.latent_shape, learned_sigma=self.learned_sigma)

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], ema: nn.Module | None) -> torch.Tensor:
        """(3, H, W) grid in [0, 1]: up to 8 inputs, their reconstructions, then two rows of generator samples (EMA
        generator when there is one; one class per column)."""
        from ldm.io import make_grid

        x = batch["image"][:8]
        cols = x.shape[0]
        labels = (torch.arange(2 * cols, device=x.device) % self.num_classes) if self.num_classes else None
        samples = self.sampler(ema).generate(labels, list(range(2 * cols)), self.sample.seed, sample_cfg=self.sample)
        return make_grid(torch.cat([x.float(), self.reconstruct(x), samples.to(x.device)]), nrow=cols)


# ------------------------------------------------------------------------------------------------------ building
def check_end_to_end_config(cfg: RunConfig) -> None:
    """Config facts the joint stage needs, checked before anything is loaded or written (one line each)."""
    tok, d = cfg.tokenizer, cfg.diffusion
    if not d.repa:
        raise ConfigError("diffusion.repa=false: the end_to_end stage aligns the tokenizer through the generator's REPA "
                          "projector (REPA-E); set diffusion.repa=true")
    if cfg.model.arch != "dit":
        raise ConfigError(f"model.arch={cfg.model.arch!r}: the end_to_end stage aligns transformer hidden tokens "
                          f"(REPA); set model.arch=dit")
    if cfg.data.latents is not None:
        raise ConfigError("data.latents is set: the end_to_end stage trains the tokenizer, so it reads images; unset "
                          "data.latents")
    if cfg.text.encoder is not None:
        raise ConfigError("text.encoder is set: the end_to_end stage trains class-conditional or unconditional "
                          "generators; unset text.encoder")
    if cfg.text.embeddings is not None:
        raise ConfigError("text.embeddings is set: the end_to_end stage trains class-conditional or unconditional "
                          "generators; unset text.embeddings")
    kind = get_kind(tok.kind)
    if kind.family != "gaussian":
        raise ConfigError(f"tokenizer.kind={tok.kind!r} is a {kind.family} tokenizer: the end_to_end stage tunes "
                          f"gaussian (VAE) tokenizers as REPA-E does; set tokenizer.kind to one of "
                          f"{sorted(k for k in _gaussian_kinds())}")
    for name in ("eq", "va"):
        if getattr(tok, name).enabled:
            raise ConfigError(f"tokenizer.{name}.enabled=true: the end_to_end stage applies no tokenizer regulariser "
                              f"(its alignment is REPA-E's); set tokenizer.{name}.enabled=false")
    if tok.learn_logvar:
        raise ConfigError("tokenizer.learn_logvar=true: REPA-E keeps the log-variance fixed (losses.py L292, "
                          "requires_grad=False); set tokenizer.learn_logvar=false")


def _gaussian_kinds() -> list[str]:
    from ldm.tokenizers.kinds import KINDS

    return [name for name, k in KINDS.items() if k.family == "gaussian"]


def _initial_stats(cfg: RunConfig, autoencoder: nn.Module, dataset):
    """(mean, std) per channel the batch norm starts from (REPA-E loads the tokenizer's `-latents-stats.pt`,
    train_repae.py L203-208): the pretrained tokenizer's latent statistics (its latent_stats.json or diffusers
    latents_mean / latents_std), else the posterior-mean statistics of tokenizer.stats_num_images training images."""
    from ldm.tokenizers.export import fingerprint, load_tokenizer
    from ldm.tokenizers.stats import compute_latent_stats
    from ldm.train.generator_task import _stat_batches

    tok = cfg.tokenizer
    if tok.pretrained is not None:
        stats = load_tokenizer(tok.pretrained).stats
        if stats is not None:
            log.info("latent batch norm initialised from %s's statistics", tok.pretrained)
            return stats.mean, stats.std
    kind = kind_of(autoencoder)
    was = autoencoder.training
    autoencoder.eval()
    try:
        stats = compute_latent_stats(lambda x: kind.encode(autoencoder, x).float(),
                                     _stat_batches(dataset, tok.stats_num_images), num_images=tok.stats_num_images,
                                     channels=kind.latent_channels(autoencoder), fingerprint=fingerprint(autoencoder))
    finally:
        autoencoder.train(was)
    log.info("latent batch norm initialised from %d images: mean %s std %s", stats.num_images,
             [round(v, 4) for v in stats.mean], [round(v, 4) for v in stats.std])
    return stats.mean, stats.std


def build_end_to_end_task(cfg: RunConfig) -> tuple[EndToEndTask, torch.utils.data.Dataset]:
    """(EndToEndTask, image dataset) of a RunConfig (stage=end_to_end). Bad settings stop here with one line naming
    the key before anything is written; then <run_dir>/tokenizer_arch.json records the tokenizer's architecture and
    where its latent statistics live (ldm.tokenizers.export._load_joint_run), so `load_tokenizer(<run>)` and
    `ldm export <run>` read the tuned tokenizer."""
    from ldm.data.images import build_dataset
    from ldm.diffusion.repa import build_projector
    from ldm.encoders import build_encoder
    from ldm.io import atomic_write_text
    from ldm.models import build_generator_model
    from ldm.tokenizers.discriminator import NLayerDiscriminator
    from ldm.tokenizers.export import (
        ARCH_FILE,
        JOINT_KEY,
        build_tokenizer,
        is_run_or_checkpoint,
        tokenizer_arch,
    )
    from ldm.train.generator_task import _check_patch
    from ldm.train.tokenizer_task import _continue_from_run, train_only

    check_end_to_end_config(cfg)
    tok, d = cfg.tokenizer, cfg.diffusion
    try:  # a missing weights file stops here, naming the keys
        encoder = build_encoder(d.repa_encoder, weights_path=d.repa_weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"diffusion.repa_encoder={d.repa_encoder!r} (diffusion.repa_weights="
                                f"{d.repa_weights!r}): {str(err).splitlines()[0]}") from None
    autoencoder = build_tokenizer(tok, cfg.data.image_size)
    train_only(autoencoder, tok.train_only)
    kind = kind_of(autoencoder)
    f, channels = kind.downsample(autoencoder), kind.latent_channels(autoencoder)
    latent_shape = (channels, cfg.data.image_size // f, cfg.data.image_size // f)
    _check_patch(cfg.model, latent_shape[-1], f"data.image_size={cfg.data.image_size} at the tokenizer's "
                 f"downsampling {f}", downsample=f)
    lpips = None
    if tok.perceptual_weight > 0:
        lpips = build_lpips(tok.lpips_weights, random_backbone=tok.lpips_random_backbone)
    disc = NLayerDiscriminator(in_channels=3, filters=tok.disc_filters, layers=tok.disc_layers, norm=tok.disc_norm)
    dataset = build_dataset(cfg.data)
    num_classes = dataset.num_classes
    net = build_generator_model(cfg.model, latent_channels=channels, latent_size=latent_shape[1],
                                num_classes=num_classes, repa_depth=d.repa_depth)
    bn = LatentBatchNorm(channels, momentum=cfg.e2e.bn_momentum)
    bn.init_stats(*_initial_stats(cfg, autoencoder, dataset))
    projector = build_projector(net.hidden_size, encoder.feature_dim, hidden_dim=d.repa_proj_dim)
    task = EndToEndTask(autoencoder=autoencoder, discriminator=disc, generator=LatentGenerator(net, bn),
                        projector=projector, encoder=encoder, lpips=lpips, tokenizer_cfg=tok, e2e=cfg.e2e,
                        diffusion=d, num_classes=num_classes, latent_shape=latent_shape,
                        learned_sigma=cfg.model.learn_sigma, sample=cfg.sample)
    if tok.pretrained is not None and is_run_or_checkpoint(tok.pretrained):
        _continue_from_run(task, tok.pretrained)  # an ldm tokenizer run's discriminator (REPA-E --disc-pretrained-ckpt)
    arch = {**tokenizer_arch(autoencoder), JOINT_KEY: {"ema_module": GENERATOR_PREFIX, "latent_bn": BN_PREFIX}}
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / ARCH_FILE, json.dumps(arch, indent=2) + "\n")
    return task, dataset
