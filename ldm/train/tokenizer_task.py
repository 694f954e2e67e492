"""Stage 1 as a `Task`: an autoencoder (any kind of ldm.tokenizers.kinds) trained with reconstruction + LPIPS + PatchGAN losses, optionally
regularised by EQ-VAE (equivariance), VA-VAE (vision-foundation alignment) or any regulariser of
ldm.tokenizers.regularisers.

One step = a generator ("gen") phase then a discriminator ("disc") phase per micro-batch, as the two optimizers of
taming/LDM (Esser et al. 2021; Rombach et al. 2022). The generator loss is

  gaussian kinds, e.g. KL (latent-diffusion contperceptual.py):
      L = NLL + kl_weight * KL + lambda * disc_factor * L_G [+ regularisers]
      NLL = sum_{c,h,w} (|x - x_rec| + w_p LPIPS) / exp(logvar) + logvar, averaged over the batch
  other kinds, e.g. VQ (taming vqperceptual.py, LlamaGen vq_loss.py):
      L = mean(|x - x_rec| + w_p LPIPS) + own term (VQ: codebook + commitment [+ entropy]) + lambda * disc_factor * L_G

with lambda the adaptive weight (losses.adaptive_weight, Esser et al. 2021 Eq. 7) times disc_weight and
disc_factor = [step >= disc_start]. The discriminator loss is disc_factor * L_D(D(x), D(sg[x_rec])). L_G and L_D
are the pair tokenizer.disc_loss names (losses.G_LOSSES / D_LOSSES: hinge and vanilla share taming's
L_G = -mean D(x_rec); non_saturating uses mean softplus(-D(x_rec))).

Regularisers (ldm.tokenizers.regularisers: EQ-VAE in eq.py, VA-VAE in va.py, each built from its own config
section) hook into the gen step: they may change what is encoded, decoded and compared (EQ-VAE: tau(z) against
tau(x)), add a loss term (VA-VAE: the VF loss of the sampled, untransformed latent) and trainable parameters.
The reconstruction of each gen micro-batch is cached (detached) and reused by the disc phase, so both phases see the
same EQ draw (the reference draws twice, once per Lightning optimizer call).

Draws (STYLE.md §5): the KL posterior sample of each image comes from a generator keyed by its "sample_seed"
(ldm.data.sampler: hash of the run seed, the stream position and the global sample index), and the regularisers'
per-batch draws (the EQ-VAE transform) from torch's RNG seeded by hash(seed, step, micro-batch) for the `prepare`
calls only, the same on every process; so with the GAN off one process with batch B and N processes with B/N
train the same autoencoder, up to the order of float reductions. What stays per process: the discriminator's
BatchNorm statistics (each process normalises its own B/N images; DDP broadcasts rank 0's running statistics), so
with the GAN on, L_G, L_D and the adaptive weight (computed from each process's own gradients) differ with the
process count; VQ's entropy loss and dead-code restarts (torch's global RNG, seeded per process by the loop) are
batch statistics too. Runs begun before these draws (their checkpoints' task facts have no "draws") keep torch's
global RNG when resumed (`resume_facts`), as do batches without "sample_seed".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.utils import make_grid

from ldm.config import ConfigError, TokenizerCfg
from ldm.data.sampler import sample_generators
from ldm.frozen import HoldsFrozen
from ldm.seeding import derive_seed
from ldm.tokenizers.discriminator import NLayerDiscriminator
from ldm.tokenizers.export import (
    build_tokenizer,
    is_run_or_checkpoint,
    run_checkpoint_state,
    save_tokenizer_arch,
)
from ldm.tokenizers.kinds import kind_of
from ldm.tokenizers.losses import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    adopt_weight,
    build_lpips,
    lpips_loss,
    nll_loss,
    reconstruction_loss,
)
from ldm.tokenizers.regularisers import Regulariser, build_regularisers
from ldm.train.task import StepOutput, Task

log = logging.getLogger(__name__)


class TokenizerTask(HoldsFrozen, Task):
    """The autoencoder, its discriminator and regularisers, trained from the config section `cfg` (the loss
    weights, disc_* and logvar settings; the architecture is the caller's). `lpips` is held frozen (not in the
    state_dict); `disc_lr` / `disc_betas` override optim.lr / optim.betas for the discriminator's optimizer (None:
    the same as the autoencoder's). `seed` keys the per-batch draws; `per_sample_draws=False` draws everything from
    torch's global RNG (runs begun before per-sample draws)."""

    phases = ("gen", "disc")

    def __init__(self, cfg: TokenizerCfg, *, autoencoder: nn.Module, discriminator: nn.Module,
                 lpips: nn.Module | None, regularisers: Sequence[Regulariser] = (), disc_lr: float | None = None,
                 disc_betas: Sequence[float] | None = None, seed: int = 0, per_sample_draws: bool = True):
        super().__init__()
        if cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS network (pass lpips=build_lpips(...))")
        self.cfg = cfg
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.regularisers = list(regularisers)
        for r in self.regularisers:  # registered under their names: trainable weights saved as "<name>.*"
            self.add_module(r.name, r)
        self.kind = kind_of(autoencoder)
        self.gaussian = self.kind.family == "gaussian"
        if self.gaussian:  # LDM's scalar output log-variance (contperceptual.py L23)
            self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self.add_frozen("lpips", lpips)
        self.g_loss, self.d_loss = G_LOSSES[cfg.disc_loss], D_LOSSES[cfg.disc_loss]
        self.disc_lr, self.disc_betas = disc_lr, disc_betas
        self.instant_logs = tuple(k for r in self.regularisers for k in r.instant_logs)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seed, self.per_sample_draws = seed, per_sample_draws

    # ------------------------------------------------------------------------------------------------ Task API
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        gen = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if self.gaussian and self.logvar.requires_grad:
            gen.append(self.logvar)
        for r in self.regularisers:
            gen += r.gen_parameters()
        return {"gen": gen, "disc": list(self.discriminator.parameters())}

    def optimizer_settings(self, phase: str) -> dict:
        if phase != "disc":
            return {}
        settings: dict = {} if self.disc_betas is None else {"betas": tuple(self.disc_betas)}
        if self.disc_lr:  # None (or 0) keeps optim.lr
            settings["lr"] = self.disc_lr
        return settings

    def ema_module(self) -> nn.Module:
        return self.autoencoder

    def compile_modules(self, compile_fn) -> list[str]:
        """The autoencoder's encoder and decoder, and the frozen LPIPS network of the perceptual loss when there
        is one (where the loss spends its time); not the discriminator, whose frozen-parameter call in the gen phase
        (torch.func.functional_call) and BatchNorm statistics gain little from compiling."""
        names = []
        for name in ("encoder", "decoder"):
            part = getattr(self.autoencoder, name, None)
            if isinstance(part, nn.Module):
                compile_fn(part)
                names.append(f"autoencoder.{name}")
        if self.frozen("lpips") is not None:
            compile_fn(self.frozen("lpips"))
            names.append("lpips")
        return names

    def describe(self) -> dict:
        return {"draws": "per_sample" if self.per_sample_draws else "global"}

    def resume_facts(self, saved: dict) -> None:
        """Continue a checkpoint as it was trained: one written before per-sample draws (no "draws" in its task
        facts) keeps torch's global-RNG draws."""
        self.per_sample_draws = saved.get("draws", "global") == "per_sample"

    def forward(self, batch: dict[str, torch.Tensor], *, step: int, phase: str, micro: int = 0) -> StepOutput:
        if phase == "gen":
            keyed = self.per_sample_draws and "sample_seed" in batch
            return self._generator_step(batch["image"], step, micro, batch["sample_seed"] if keyed else None)
        if phase == "disc":
            return self._discriminator_step(step, micro)
        raise ValueError(f"phase={phase!r}; expected one of {self.phases}")

    # ------------------------------------------------------------------------------------------------ phases
    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with the discriminator's parameters detached: the gen phase must not leave gradients on them (the
        references toggle requires_grad per optimizer); gradients still flow to x, BatchNorm statistics update."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def _encode(self, x: torch.Tensor, logs: dict[str, torch.Tensor],
                sample_seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent to decode (B, C, h, w), the kind's weighted own term: KL, VQ codebook terms, ...) of the input x;
        any noise the kind adds (the KL posterior sample) is drawn per sample from `sample_seeds` (None: torch's
        global RNG)."""
        draws = None if sample_seeds is None else sample_generators(sample_seeds, "posterior", x.device)
        enc = self.kind.encode_train(self.autoencoder, x, cfg=self.cfg, draws=draws)
        logs.update(enc.logs)
        if self.gaussian:
            logs["logvar"] = self.logvar
        return enc.z, enc.loss

    def _nll(self, target: torch.Tensor, x_rec: torch.Tensor, logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reconstruction NLL: L1/L2 + LPIPS, through the learned log-variance for KL (see the module docstring)."""
        cfg = self.cfg
        rec = reconstruction_loss(target, x_rec, cfg.rec_loss)  # (B, 3, H', W')
        p = (lpips_loss(self.frozen("lpips"), target, x_rec) if cfg.perceptual_weight > 0
             else rec.new_zeros(rec.shape[0]))  # (B,)
        rec_total = rec + cfg.perceptual_weight * p.view(-1, 1, 1, 1)
        nll = nll_loss(rec_total, self.logvar).mean() if self.gaussian else rec_total.mean()
        logs.update(loss_rec=rec.mean(), loss_lpips=p.mean(), loss_nll=nll)
        return nll

    def _prepare(self, x: torch.Tensor, step: int, micro: int, keyed: bool) -> torch.Tensor:
        """The regularisers' `prepare` (B, 3, H, W) -> (B, 3, H', W'). Their per-batch draws (the EQ-VAE transform)
        come, when `keyed`, from torch's RNG seeded by (seed, step, micro) (the same on every process; the global
        stream outside is left as it was), else from the global stream as it stands."""
        with torch.random.fork_rng(devices=[], enabled=keyed):
            if keyed:
                torch.manual_seed(derive_seed(self.seed, "batch", step, micro))
            for r in self.regularisers:
                x = r.prepare(x)
        return x

    def _generator_step(self, x: torch.Tensor, step: int, micro: int, sample_seeds: torch.Tensor | None) -> StepOutput:
        cfg, ae = self.cfg, self.autoencoder
        logs: dict[str, torch.Tensor] = {}
        x_in = self._prepare(x, step, micro, keyed=sample_seeds is not None)  # (B, 3, H', W')
        # unkeyed, the posterior sample comes after the regularisers' draws (the EQ-VAE mode) from the global RNG
        z, reg = self._encode(x_in, logs, sample_seeds)  # (B, C, h, w)
        z_dec, target = z, x_in
        for r in self.regularisers:
            z_dec, target = r.transform(z_dec, target)
        x_rec = self.kind.decode(ae, z_dec).float()  # (B, 3, H', W')
        nll = self._nll(target, x_rec, logs)
        loss = nll + reg

        disc_factor = adopt_weight(1.0, step, cfg.disc_start)
        if disc_factor > 0 and cfg.disc_weight > 0:
            g = self.g_loss(self._frozen_discriminator(x_rec)).mean()
            d_weight = (adaptive_weight(nll, g, self.kind.decoder_last_layer(ae)) if cfg.disc_adaptive
                        else torch.ones((), device=g.device)) * cfg.disc_weight
            loss = loss + d_weight * disc_factor * g
            logs.update(loss_g=g, d_weight=d_weight)
        for r in self.regularisers:
            term, r_logs = r.loss(x_in=x_in, z=z, nll=nll, autoencoder=ae)
            if term is not None:
                loss = loss + term
            logs.update(r_logs)
        self._cache[micro] = (target.detach(), x_rec.detach())
        logs["loss"] = loss
        return StepOutput(loss, {k: float(v.detach()) for k, v in logs.items()})

    def _discriminator_step(self, step: int, micro: int) -> StepOutput:
        if micro not in self._cache:
            raise RuntimeError(f"disc phase for micro-batch {micro} ran before its gen phase (phases must be "
                               f"{self.phases} in this order)")
        target, x_rec = self._cache.pop(micro)
        disc_factor = adopt_weight(1.0, step, self.cfg.disc_start)
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
            return self.kind.decode(model, self.kind.encode(model, x)).float()
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
    train_only(autoencoder, tok.train_only)
    lpips = None
    if tok.perceptual_weight > 0:
        lpips = build_lpips(tok.lpips_weights, random_backbone=tok.lpips_random_backbone)
    elif tok.lpips_random_backbone:
        log.warning("tokenizer.lpips_random_backbone=true has no effect: tokenizer.perceptual_weight=0")
    disc = NLayerDiscriminator(in_channels=3, filters=tok.disc_filters, layers=tok.disc_layers, norm=tok.disc_norm)
    # built last, so switching a regulariser on leaves the autoencoder's and discriminator's init as they were
    regularisers = build_regularisers(tok, autoencoder=autoencoder)
    task = TokenizerTask(tok, autoencoder=autoencoder, discriminator=disc, lpips=lpips, regularisers=regularisers,
                         disc_lr=cfg.optim.disc_lr, disc_betas=cfg.optim.disc_betas, seed=cfg.seed)
    if tok.pretrained is not None and is_run_or_checkpoint(tok.pretrained):
        _continue_from_run(task, tok.pretrained)
    save_tokenizer_arch(autoencoder, cfg.run_dir)
    return task, build_dataset(cfg.data)


def train_only(autoencoder: nn.Module, names: Sequence[str]) -> None:
    """tokenizer.train_only: only the autoencoder parameters named by `names` (a full name, or a prefix ending at a
    module boundary: "decoder.up_blocks.0" takes decoder.up_blocks.0.*, not decoder.up_blocks.01) keep
    requires_grad; the optimizer then holds only those (param_groups), the rest keeps its initial values. Buffers are
    untouched: BatchNorm layers of frozen parts still normalise with batch statistics and update their running
    statistics, as plain requires_grad_(False) fine-tuning does. A name matching no parameter is a ConfigError."""
    if not names:
        return
    params = dict(autoencoder.named_parameters())

    def named(key: str, name: str) -> bool:
        return key == name or key.startswith(f"{name}.")

    unmatched = [n for n in names if not any(named(k, n) for k in params)]
    if unmatched:
        top = sorted({".".join(k.split(".")[:2]) for k in params})
        raise ConfigError(f"tokenizer.train_only: {unmatched} name no parameter of this {kind_of(autoencoder).name} "
                          f"autoencoder; give parameter names or prefixes, e.g. one of {top}")
    for key, p in params.items():
        p.requires_grad_(any(named(key, n) for n in names))
    log.info("tokenizer.train_only: %d of %d autoencoder parameters train (%s)",
             sum(p.numel() for p in params.values() if p.requires_grad), sum(p.numel() for p in params.values()),
             ", ".join(names))


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
