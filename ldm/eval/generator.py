"""The inference `Generator`: a generator network with the latent contract around it, and its loaders.

A `Generator` holds what turns noise into images and nothing about training: the network `model(x, t, y)` (OUR time:
t=0 data, t=1 noise), the `LatentNormalizer` it was trained with, the frozen tokenizer that decodes, the noising
path and prediction type, the number of classes, the latent shape and whether the network also predicts a variance.
Where it came from (checkpoint, EMA or not, the run config) rides along for sample folders and messages.

`sample_latents` is the one place that turns a network into a sampler call: CFG wrapper (guidance.py) -> prediction
conversion (samplers.make_denoiser) -> time grid -> sampler. Noise comes from one torch.Generator per sample index
(edm2's StackedRandomGenerator idea), so sample i is the same for any batch size or process count.

Precision: sample.precision (auto = bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere; ldm.precision)
puts each network call and the tokenizer's decode under bf16 autocast, their outputs cast back to fp32; the sampler's
state and updates stay fp32 (as the training loop's autocast covers the forward only). The choice and its reason are
logged once per process. Whoever extracts FID features does so outside this scope, in fp32.

Three ways to get one, all sampling through the same code:
    load_generator(run_or_checkpoint)              a generator or joint (end_to_end) run trained here (EMA weights by
                                                   default)
    load_official_generator(kind, weights, ...)    released DiT / SiT / LightningDiT weights, sampled by default as
                                                   their own sample scripts do (OFFICIAL_SETUPS)
    GeneratorTask.generator(network)               the network being trained (periodic FID, sample grids)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ldm.config import RunConfig, SampleCfg, TokenizerCfg, config_from_dict
from ldm.diffusion.guidance import classifier_free_guidance, interval_from_sit_time
from ldm.diffusion.paths import Path, get_path
from ldm.diffusion.samplers import get_sampler, make_denoiser, randn_like, sampler_options, sampler_times
from ldm.precision import inference_autocast, resolve_inference_precision
from ldm.seeding import index_generators
from ldm.tokenizers.stats import LatentNormalizer, normalizer_for

if TYPE_CHECKING:
    from ldm.data.embeddings import PrecomputedEmbeddings

log = logging.getLogger(__name__)
_ANNOUNCED: set[tuple[str, str]] = set()  # (precision, why) already logged by this process


# ------------------------------------------------------------------------------------------------------ precision
def sampling_precision(setting: str, device: torch.device | str) -> str:
    """"bf16" | "fp32": what sample.precision=`setting` means on `device`; logged with its reason the first time
    this process meets that choice (the header line of `ldm sample`, and of a training run's first grid or FID)."""
    mode, why = resolve_inference_precision(setting, torch.device(device).type, "sample.precision")
    if (mode, why) not in _ANNOUNCED:
        _ANNOUNCED.add((mode, why))
        log.info("sampling precision %s (%s): the generator network and the tokenizer's decoder%s", mode, why,
                 " run under bf16 autocast; the sampler's state and FID features stay fp32" if mode == "bf16" else
                 " run in fp32")
    return mode


def _in_precision(model: Callable, mode: str, device_type: str) -> Callable:
    """`model(x, t, y)` under bf16 autocast with an fp32 output when mode is "bf16"; `model` itself for fp32."""
    if mode == "fp32":
        return model

    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with inference_autocast(mode, device_type):
            out = model(x, t, y)
        return out.float()

    return run


# ------------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_latents(model: Callable, noise: torch.Tensor, y: torch.Tensor | None, *, path: Path, prediction: str,
                   sample_cfg: SampleCfg, num_classes: int, learned_sigma: bool = False,
                   generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Integrate from `noise` (B, C, H, W) at t=1 to latents at t=0 with sample_cfg's sampler, steps and guidance.

    `model(x, t, y)` is the generator; y (B,) class ids (None for unconditional). Guidance applies when
    sample_cfg.cfg_scale != 1 on class-conditional models; stochastic samplers draw from `generators`. The network
    runs in sample_cfg.precision (`sampling_precision`), the integration in fp32.
    """
    model = _in_precision(model, sampling_precision(sample_cfg.precision, noise.device), noise.device.type)
    denoise = guided_denoiser(model, y, path=path, prediction=prediction, sample_cfg=sample_cfg,
                              num_classes=num_classes, learned_sigma=learned_sigma)
    sampler = get_sampler(sample_cfg.sampler)
    return sampler(denoise, noise, sampler_times(sample_cfg, path), path=path, generator=generators,
                   **sampler_options(sample_cfg, learned_sigma))


def guided_denoiser(model: Callable, y: torch.Tensor | None, *, path: Path, prediction: str, sample_cfg: SampleCfg,
                    num_classes: int, learned_sigma: bool = False) -> Callable:
    """The denoiser every sampler integrates: `model(x, t, y)` under sample_cfg's classifier-free guidance (when
    cfg_scale != 1), its output converted from `prediction` (samplers.make_denoiser)."""
    guided = sample_cfg.cfg_scale != 1.0
    if guided:
        if num_classes < 1 or y is None:
            raise ValueError(f"sample.cfg_scale={sample_cfg.cfg_scale} needs a class-conditional model; this model "
                             f"is unconditional (use sample.cfg_scale=1)")
        model_fn = classifier_free_guidance(model, y, num_classes=num_classes, scale=sample_cfg.cfg_scale,
                                            interval=tuple(sample_cfg.interval), channels=sample_cfg.cfg_channels,
                                            learned_sigma=learned_sigma, rule=sample_cfg.guidance_rule)
    else:
        def model_fn(x, t):
            return model(x, t, y)
    return make_denoiser(model_fn, path=path, prediction=prediction, learned_sigma=learned_sigma,
                         step_aware=guided)  # the guidance wrapper reads the step start (sample.guidance_rule)


def initial_noise(shape: Sequence[int], generators: list[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """x_T ~ N(0, I), one draw per sample from its own generator."""
    return randn_like(torch.empty(len(generators), *shape, device=device), generators)


# ------------------------------------------------------------------------------------------------------ the generator
@dataclass(eq=False, repr=False)
class Generator:
    """A generator network ready to sample, with the latent contract it was trained under."""

    model: nn.Module                      # net(x, t, y) -> prediction (ldm/models interface)
    normalizer: LatentNormalizer          # the training normalisation; denormalize() before decoding
    tokenizer: nn.Module                  # frozen ldm.tokenizers.export.Tokenizer: decode(), fingerprint
    path: Path                            # noising path (ldm/diffusion/paths.py)
    prediction: str                       # what the network predicts: velocity | eps | v | x0
    num_classes: int                      # 0 = unconditional
    latent_shape: tuple[int, int, int]    # (C, h, w)
    learned_sigma: bool = False           # output holds a variance half (DiT learn_sigma)
    checkpoint: FsPath | None = None      # where the weights came from (run checkpoint or weights file)
    used_ema: bool = False
    cfg: RunConfig | None = None          # the run config it was trained with (loaded generators; sample defaults)
    text_encoder: nn.Module | None = None  # text models: the frozen ldm.encoders.text.TextEncoder of the prompts
    caption: dict | None = None           # text models: the checkpoint's caption facts (GeneratorTask.describe "text")
    prompts: list[str] | None = None      # text models: set_prompts() / set_prompt_embeddings(); labels = prompt ids
    prompt_fingerprint: str | None = None  # set_prompt_embeddings(): the rows' fingerprint (sample-folder identity)
    _prompt_table: Any = None
    _prompt_rows: Any = None              # set_prompt_embeddings(): the TextCondition of the prompts, as given

    @property
    def precomputed(self) -> bool:
        """Trained on precomputed caption embeddings (text.embeddings): prompts are embeddings, there is no encoder."""
        return bool(self.caption and self.caption.get("precomputed"))

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompts is None else len(self.prompts)

    def set_prompts(self, prompts: Sequence[str]) -> Generator:
        """Text models: encode `prompts`; from now on labels are prompt ids (0 .. P-1) and guidance treats the
        prompts as classes (models/text_cond.PromptTable)."""
        from ldm.models.text_cond import PromptTable, TextCondition

        if self.precomputed:
            raise ValueError(f"--prompt / --prompts: {self.checkpoint} was trained on precomputed embeddings "
                             f"(text.embeddings) and has no text encoder to embed text; pass --prompt-embeddings FILE "
                             f"(.npy / .npz, one embedding per prompt)")
        if self.text_encoder is None:
            raise ValueError(f"--prompt needs a text-conditioned generator; {self.checkpoint} was trained without "
                             f"text.encoder (use --classes for class-conditional models)")
        prompts = [str(p) for p in prompts]
        if not prompts or not all(p.strip() for p in prompts):
            raise ValueError("--prompt / --prompts: give at least one non-empty prompt")
        emb = self.text_encoder.encode(prompts)  # (P, L, D), (P, L), (P, Dp)
        self.prompts, self._prompt_rows, self.prompt_fingerprint = prompts, None, None
        self._prompt_table = PromptTable(self.model, TextCondition(*(x.to(self.device) for x in emb)))
        return self

    def load_prompt_embeddings(self, path: str | FsPath) -> Generator:
        """Models trained on precomputed embeddings: set_prompt_embeddings() with the rows of an --prompt-embeddings
        file, read and checked against this generator's caption shape by ldm.data.embeddings.read_prompt_embeddings."""
        from ldm.data.embeddings import read_prompt_embeddings

        self._check_embedding_prompts()
        c = self.caption
        return self.set_prompt_embeddings(read_prompt_embeddings(
            path, token_dim=c["caption_dim"], max_tokens=c["caption_tokens"], pooled_dim=c["pooled_dim"],
            pooled_given=c.get("pooled_given")))

    def set_prompt_embeddings(self, prompts: PrecomputedEmbeddings) -> Generator:
        """Models trained on precomputed embeddings: from now on labels are ids (0 .. P-1) of the P rows of `prompts`
        (`read_prompt_embeddings` of an --prompt-embeddings file, or a run's `grid_rows`; ldm/data/embeddings.py),
        given to the network as they are, and guidance treats them as classes (PromptTable)."""
        from ldm.models.text_cond import TextCondition

        self._check_embedding_prompts()
        tokens, mask, pooled = prompts.embeddings.rows(range(len(prompts.captions)))  # (P, L, D), (P, L), (P, Dp)
        want = (self.caption["caption_tokens"], self.caption["caption_dim"])
        if tuple(tokens.shape[1:]) != want:
            raise ValueError(f"{prompts.source}: embeddings of shape {tuple(tokens.shape[1:])} per prompt; "
                             f"{self.checkpoint} takes {want}")
        self.prompts, self.prompt_fingerprint = list(prompts.captions.texts), prompts.fingerprint
        self._prompt_rows = TextCondition(tokens, mask, pooled)
        self._build_prompt_table()
        return self

    def _check_embedding_prompts(self) -> None:
        if self.caption is None:
            raise ValueError(f"--prompt-embeddings needs a text-conditioned generator; {self.checkpoint} was trained "
                             f"without text conditioning (use --classes for class-conditional models)")
        if not self.precomputed:
            raise ValueError(f"--prompt-embeddings: {self.checkpoint} was trained with text encoder "
                             f"{self.caption.get('encoder_source')!r}: give its prompts as text (--prompt / --prompts)")

    def _build_prompt_table(self) -> None:
        from ldm.models.text_cond import PromptTable, TextCondition

        rows = TextCondition(*(None if x is None else x.to(self.device) for x in self._prompt_rows))
        self._prompt_table = PromptTable(self.model, rows)

    @property
    def device(self) -> torch.device:
        return self.normalizer.mean.device

    def to(self, device: str | torch.device) -> Generator:
        for module in (self.model, self.normalizer, self.tokenizer, self.text_encoder):
            if module is not None:
                module.to(device)
        if self._prompt_rows is not None:  # embedding prompts move with the network
            self._build_prompt_table()
        elif self.prompts is not None:  # text prompts are encoded again where the encoder now is
            self.set_prompts(self.prompts)
        return self

    def decode(self, z: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> fp32 images (B, 3, H, W), roughly in [-1, 1]; the tokenizer decodes
        under bf16 autocast when `precision` (a sample.precision setting) resolves to bf16 on this device."""
        mode = sampling_precision(precision, self.device)
        with inference_autocast(mode, self.device.type):
            images = self.tokenizer.decode(self.normalizer.denormalize(z))
        return images.float()

    def sample_latents(self, noise: torch.Tensor, labels: torch.Tensor | None, *, sample_cfg: SampleCfg,
                       generators: list[torch.Generator]) -> torch.Tensor:
        """`sample_latents` with this generator's network, path, prediction, classes and variance head."""
        model, num_classes = self.model, self.num_classes
        if self._prompt_table is not None:  # text models: labels are prompt ids, the prompts act as classes
            model, num_classes = self._prompt_table, self.num_prompts
        return sample_latents(model, noise, labels, path=self.path, prediction=self.prediction,
                              sample_cfg=sample_cfg, num_classes=num_classes, learned_sigma=self.learned_sigma,
                              generators=generators)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None, indices: Sequence[int], seed: int, *,
                 sample_cfg: SampleCfg | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] of the global sample `indices` (per-index seeds), labels (B,) or None.

        The network runs in eval mode and is put back in the mode it was in (the training task's generator wraps
        its live network or EMA copy). sample_cfg defaults to the run's `cfg.sample`.
        """
        if sample_cfg is None:
            if self.cfg is None:
                raise ValueError("Generator.generate needs sample_cfg: this generator carries no run config")
            sample_cfg = self.cfg.sample
        gens = index_generators(seed, indices)
        noise = initial_noise(self.latent_shape, gens, self.device)  # (B, C, h, w)
        was_training = self.model.training
        self.model.eval()
        z = self.sample_latents(noise, labels, sample_cfg=sample_cfg, generators=gens)
        self.model.train(was_training)
        return self.decode(z, precision=sample_cfg.precision).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------ loaders
def tokenizer_path(tokenizer_cfg: TokenizerCfg) -> str:
    """The frozen tokenizer a generator run names: tokenizer.checkpoint, else tokenizer.pretrained."""
    path = tokenizer_cfg.checkpoint or tokenizer_cfg.pretrained
    if path is None:
        raise ValueError("the generator stage needs a frozen tokenizer: set tokenizer.checkpoint=<tokenizer run dir "
                         "or export folder> or tokenizer.pretrained=<diffusers AutoencoderKL folder>")
    return path


def load_generator(path: str | FsPath, *, use_ema: bool = True, device: str | torch.device = "cpu",
                   tokenizer: str | None = None, overrides: dict[str, Any] | None = None) -> Generator:
    """Load a generator run directory or checkpoint directory for sampling.

    The tokenizer is the one recorded in the run's config (or `tokenizer`, checked against the recorded fingerprint).
    use_ema=True loads the EMA weights and fails clearly when the checkpoint has none. `overrides` replace top-level
    sections of the recorded config. A joint run (stage end_to_end, REPA-E) gives its own generator, decoded by its
    own tuned tokenizer (`_load_joint_generator`).
    """
    from ldm.models import build_generator_model
    from ldm.runs import load_checkpoint, load_state_strict
    from ldm.tokenizers.export import load_tokenizer

    ckpt_dir = _checkpoint_dir(path)
    ckpt = load_checkpoint(ckpt_dir)
    meta = ckpt["state"].get("task", {})
    cfg = config_from_dict(ckpt["state"]["config"])
    if overrides:
        cfg = config_from_dict({**ckpt["state"]["config"], **overrides})
    if meta.get("kind") == "end_to_end":
        return _load_joint_generator(ckpt_dir, ckpt, cfg, use_ema=use_ema, tokenizer=tokenizer).to(device)
    if meta.get("kind") != "generator":
        raise ValueError(f"{ckpt_dir} is not a generator checkpoint (it was written by a "
                         f"{meta.get('kind', 'tokenizer')!r} run; sampling takes generator and end_to_end runs)")
    tok = load_tokenizer(tokenizer or tokenizer_path(cfg.tokenizer))
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(f"tokenizer {tok.source!r} (fingerprint {tok.fingerprint}) is not the one generator "
                         f"{ckpt_dir} was trained with (fingerprint {meta['tokenizer_fingerprint']}, from "
                         f"{meta['tokenizer_source']!r})")
    latent_shape = tuple(meta["latent_shape"])
    text = meta.get("text")  # text models: caption dims and the encoder's identity (GeneratorTask.describe); runs on
    # precomputed embeddings ("precomputed": true) have no encoder: their prompts are embeddings (set_prompt_embeddings)
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=meta["num_classes"],
                                  caption=None if text is None else {k: text[k] for k in CAPTION_DIMS})
    text_encoder = None if text is None or text.get("precomputed") else _load_text_encoder(cfg, text, ckpt_dir)
    normalizer = LatentNormalizer(meta["latent_norm"], latent_shape[0])
    # model.safetensors holds the training task's state: "model.*", the normaliser's buffers and (REPA) the
    # projector, which sampling does not need
    weights = nn.ModuleDict({"model": model, "normalizer": normalizer})
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projector.")}
    load_state_strict(weights, state, f"{ckpt_dir}/model.safetensors")
    if use_ema:
        if ckpt["ema"] is None:
            raise ValueError(f"{ckpt_dir} has no EMA weights (the run had train.ema=false); sample with --no-ema")
        load_state_strict(model, ckpt["ema"], f"{ckpt_dir}/ema.safetensors")
    model.eval()
    gen = Generator(model=model, normalizer=normalizer, tokenizer=tok, path=get_path(cfg.diffusion.path),
                    prediction=cfg.diffusion.prediction, num_classes=meta["num_classes"], latent_shape=latent_shape,
                    learned_sigma=cfg.model.learn_sigma, checkpoint=ckpt_dir, used_ema=use_ema, cfg=cfg,
                    text_encoder=text_encoder, caption=text)
    return gen.to(device)


def _checkpoint_dir(path: str | FsPath) -> FsPath:
    """The checkpoint directory of a run or checkpoint directory (or an hf:// reference to one); a run directory
    that has not written a checkpoint yet is one line saying so."""
    from ldm.hub import resolve_path
    from ldm.runs import resolve_checkpoint

    local = FsPath(resolve_path(path))
    if (local / "config.yaml").is_file() and not (local / "latest").is_file() and not (local / "state.pt").is_file():
        raise FileNotFoundError(f"run {str(local)!r} has no checkpoint yet: sample it once training has written one "
                                f"(every train.ckpt_every steps and at the end)")
    return resolve_checkpoint(local)


# LatentGenerator's parts (ldm/train/end_to_end_task.py): the EMA file holds the module itself ("net.*", "bn.*"),
# model.safetensors holds it under the task attribute "generator." beside the autoencoder, discriminator, projector
JOINT_GENERATOR, JOINT_NET, JOINT_BN = "generator.", "net", "bn"


def _load_joint_generator(ckpt_dir: FsPath, ckpt: dict, cfg: RunConfig, *, use_ema: bool,
                          tokenizer: str | None) -> Generator:
    """The generator of a joint run (stage end_to_end, REPA-E; ldm/train/end_to_end_task.py), sampled as its
    training grids sample it (EndToEndTask.sampler): the network and its latent batch norm from the EMA weights
    (ema.safetensors, as REPA-E's generate.py samples ckpt["ema"]) or, use_ema=False, the live ones; the sampled
    latents de-normalised with that batch norm's running mean and sqrt(running var) (REPA-E train_repae.py L514-519,
    without eps; LatentBatchNorm.latent_mean_std) and decoded by the run's tuned tokenizer of the same checkpoint
    (its "autoencoder.*" weights: REPA-E keeps no EMA of the VAE). `tokenizer` may name another copy of that
    tokenizer (e.g. its `ldm export` folder): refused unless its fingerprint is the run's."""
    from ldm.models import build_generator_model
    from ldm.models.latent_bn import LatentBatchNorm
    from ldm.runs import load_state_strict
    from ldm.tokenizers.export import load_tokenizer

    meta = ckpt["state"]["task"]
    own = load_tokenizer(ckpt_dir, use_ema=use_ema)
    tok = own
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok.fingerprint != own.fingerprint:
            raise ValueError(f"--tokenizer {tokenizer} (fingerprint {tok.fingerprint}) is not the tokenizer joint run "
                             f"{ckpt_dir} tuned (fingerprint {own.fingerprint}); leave --tokenizer out to decode with "
                             f"the run's own")
    latent_shape = tuple(meta["latent_shape"])
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=meta["num_classes"])
    parts = nn.ModuleDict({JOINT_NET: model, JOINT_BN: LatentBatchNorm(latent_shape[0])})
    if use_ema:
        if ckpt["ema"] is None:
            raise ValueError(f"{ckpt_dir} has no EMA weights (the run had train.ema=false); sample with --no-ema")
        load_state_strict(parts, ckpt["ema"], f"{ckpt_dir}/ema.safetensors")
    else:
        state = {k[len(JOINT_GENERATOR):]: v for k, v in ckpt["model"].items() if k.startswith(JOINT_GENERATOR)}
        load_state_strict(parts, state, f"{ckpt_dir}/model.safetensors ('{JOINT_GENERATOR}*')")
    mean, std = parts[JOINT_BN].latent_mean_std()
    normalizer = LatentNormalizer("channel", latent_shape[0], mean=mean, std=std)
    return Generator(model=model.eval(), normalizer=normalizer, tokenizer=tok, path=get_path(cfg.diffusion.path),
                     prediction=cfg.diffusion.prediction, num_classes=meta["num_classes"], latent_shape=latent_shape,
                     learned_sigma=cfg.model.learn_sigma, checkpoint=ckpt_dir, used_ema=use_ema, cfg=cfg)


CAPTION_DIMS = ("caption_dim", "caption_tokens", "pooled_dim")  # the DiT's text kwargs in a checkpoint's task facts


def _load_text_encoder(cfg: RunConfig, text: dict, ckpt_dir) -> nn.Module:
    """The frozen text encoder a text generator was trained with (text.encoder of its config), refused when its
    fingerprint is not the recorded one."""
    from ldm.encoders.text import load_text_encoder

    enc = load_text_encoder(cfg.text.encoder, max_tokens=cfg.text.max_tokens)
    if enc.fingerprint != text["encoder_fingerprint"]:
        raise ValueError(f"text encoder {enc.source!r} (fingerprint {enc.fingerprint}) is not the one generator "
                         f"{ckpt_dir} was trained with (fingerprint {text['encoder_fingerprint']}, from "
                         f"{text['encoder_source']!r})")
    return enc


# How each official family was trained (ldm/models/checkpoints.py converts its network to OUR time) and the sampler
# of its own sample script, converted to our time (t = 0 data, t = 1 noise):
#   dit           DiT sample.py: DDPM, 250 respaced steps, eps + learned sigma, latents x 0.18215.
#   sit           SiT sample.py: SDE, 250 steps, velocity.
#   lightningdit  LightningDiT inference.py with configs/lightningdit_xl_vavae_f16d32.yaml: torchdiffeq's fixed-grid
#                 Euler on num_sampling_steps = 250 grid POINTS, linspace(0, 1, 250) in its time (data at 1), i.e.
#                 249 steps; timestep_shift 0.3 maps each point to 0.3 t / (1 - 0.7 t), which is our shifted grid
#                 with shift 1 / 0.3 (paths.shift_time); forward_with_cfg guides iff t_SiT >= cfg_interval_start
#                 0.11, our interval [0, 0.89], and only output channels 0-2. Latents: its VA-VAE's per-channel
#                 mean / std with latent_multiplier 1. The guidance scale stays the user's (--cfg): that config pairs
#                 10.0 with this interval, its 800-epoch reproduction 6.7 with cfg_interval_start 0.125.
OFFICIAL_SETUPS = {
    "dit": {"diffusion": dict(path="ddpm_linear", prediction="eps", latent_norm="scalar"),
            "sample": dict(sampler="ddpm", steps=250)},
    "sit": {"diffusion": dict(path="linear", prediction="velocity", latent_norm="scalar"),
            "sample": dict(sampler="euler_maruyama", steps=250)},
    "lightningdit": {"diffusion": dict(path="linear", prediction="velocity", latent_norm="channel"),
                     "sample": dict(sampler="euler", steps=249, time_grid="shifted", shift=1 / 0.3,
                                    interval=list(interval_from_sit_time(0.11)), cfg_channels="first3")},
}


def official_run_config(kind: str, *, tokenizer: str | FsPath | None = None) -> RunConfig:
    """The run config an official family's weights sample under: its path, prediction and latent normalisation, and
    its sample script's sampler (OFFICIAL_SETUPS) as the `sample` defaults."""
    from ldm.config import DiffusionCfg

    if kind not in OFFICIAL_SETUPS:
        raise ValueError(f"--official={kind!r}; expected one of {sorted(OFFICIAL_SETUPS)}")
    setup = OFFICIAL_SETUPS[kind]
    pretrained = None if tokenizer is None else str(tokenizer)
    return RunConfig(name=f"official-{kind}", tokenizer=TokenizerCfg(pretrained=pretrained),
                     diffusion=DiffusionCfg(**setup["diffusion"]), sample=SampleCfg(**setup["sample"]))


def load_official_generator(kind: str, weights: str | FsPath, *, tokenizer: str | FsPath | None,
                            device: str | torch.device = "cpu") -> Generator:
    """A Generator from an official DiT / SiT / LightningDiT weights file and the tokenizer it was trained with
    (a diffusers AutoencoderKL folder: sd-vae-ft-ema for DiT/SiT, whose config gives the 0.18215 factor; a VA-VAE
    export with its latent statistics for LightningDiT). The released files hold EMA weights (training checkpoints:
    their "ema" entry), so used_ema is True. Its `cfg` is official_run_config(kind)."""
    from ldm.models.checkpoints import load_official
    from ldm.tokenizers.export import load_tokenizer

    cfg = official_run_config(kind, tokenizer=tokenizer)  # an unknown kind fails here, before any file is read
    if tokenizer is None:
        raise ValueError(f"--official {kind} needs --tokenizer FOLDER: the VAE its latents come from (diffusers "
                         f"AutoencoderKL folder or ldm tokenizer export)")
    from ldm.hub import resolve_path

    weights = resolve_path(weights)  # a file, or an hf://org/name[@rev]/file reference
    model = load_official(weights, kind)
    tok = load_tokenizer(tokenizer)
    if tok.latent_channels != model.in_channels:
        raise ValueError(f"--tokenizer {tokenizer} has {tok.latent_channels} latent channels; the {kind} weights "
                         f"{weights} take {model.in_channels}")
    cfg.model.learn_sigma = model.learn_sigma  # what the weights hold (DiT's released files: learned sigma)
    d = cfg.diffusion
    normalizer = normalizer_for(tok, kind=d.latent_norm, scaling_factor=d.scaling_factor)
    gen = Generator(model=model.eval(), normalizer=normalizer, tokenizer=tok, path=get_path(d.path),
                    prediction=d.prediction, num_classes=model.num_classes,
                    latent_shape=(model.in_channels, model.input_size, model.input_size),
                    learned_sigma=cfg.model.learn_sigma, checkpoint=FsPath(weights), used_ema=True, cfg=cfg)
    return gen.to(device)
