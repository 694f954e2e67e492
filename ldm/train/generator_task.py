"""Stage 2 as a `Task`: a DiT/UNet generator trained in a frozen tokenizer's latent space.

Latents come from the latent cache (`data.latents`) or are encoded on the fly from images (KL: posterior mean in both
cases, so the same batch gives the same loss either way). They are normalised by the tokenizer's `LatentNormalizer`
(ldm/tokenizers/stats.py: per-channel mean/std, a scalar scaling factor or nothing), whose statistics are buffers of
the task, so they are stored in every generator checkpoint and used unchanged at decode time.

The task holds the loss and the parameter groups. The loss is `ldm.diffusion.objectives.training_loss` (diffusion or
flow matching, t=0 data, t=1 noise), plus the auxiliary terms switched on (ldm/train/generator_terms.py: REPA's
alignment, the latent perceptual loss, the pixel-space loss). `train.init_from` starts from another run's weights
(ldm/train/init_from.py).

Per-sample draws (STYLE.md §5): each sample's time t and noise come from a generator keyed by its "sample_seed"
(ldm.data.sampler: hash of the run seed, the stream position and the global sample index), its CFG label dropout
from a second one; so one process with batch B and N processes with B/N draw the same numbers and train the same
weights, up to the order of float reductions. The networks draw nothing else in training (DiT has no dropout; the
UNet's `dropout` defaults to 0, above 0 it uses torch's global RNG, which the loop seeds per process). Runs begun
before per-sample draws (their checkpoints' task facts have no "draws") keep drawing from torch's global RNG when
resumed (`resume_facts`), so they continue as they began; so do batches without "sample_seed". Sampling (the sample
grid, periodic FID) goes through the inference `Generator` (ldm/eval/generator.py) built around the EMA or live
network, the same code `ldm sample` runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.config import ConfigError, DiffusionCfg, EvalCfg, RunConfig, SampleCfg
from ldm.data.embeddings import grid_rows
from ldm.data.latents import CacheMeta, LatentCacheDataset, read_cache_meta
from ldm.data.sampler import sample_generators
from ldm.diffusion.objectives import training_loss
from ldm.diffusion.paths import get_path
from ldm.eval.generator import CAPTION_DIMS, Generator, tokenizer_path
from ldm.frozen import HoldsFrozen
from ldm.models.text_cond import TextCondition
from ldm.tokenizers.stats import LatentNormalizer, normalizer_for
from ldm.train.generator_terms import (
    StepContext,
    build_generator_terms,
    check_decoder_terms,
)
from ldm.train.init_from import init_generator_from
from ldm.train.task import StepOutput, Task


class GeneratorTask(HoldsFrozen, Task):
    """The generator network (+ REPA projector) trained on normalised latents of a frozen tokenizer.

    Its own config sections: `diffusion` (path, prediction, time sampling, loss weighting, REPA), `sample` (grids
    and periodic FID samples), `eval_cfg` (periodic FID); `fid_reference` is what FID compares to and `image_size`
    the size of the images it extracts. The tokenizer and REPA's vision encoder are held frozen (ldm.frozen).
    """

    phases = ("model",)

    def __init__(self, model: nn.Module, tokenizer: nn.Module, normalizer: LatentNormalizer, *,
                 diffusion: DiffusionCfg, learned_sigma: bool, num_classes: int, latent_shape: tuple[int, int, int],
                 sample: SampleCfg, eval_cfg: EvalCfg, fid_reference: str | None, image_size: int,
                 projector: nn.Module | None = None, encoder: nn.Module | None = None, per_sample_draws: bool = True,
                 text_encoder: nn.Module | None = None, caption: dict | None = None, prompts=None):
        super().__init__()
        self.model = model
        self.normalizer = normalizer
        self.projector = projector
        self.add_frozen("tokenizer", tokenizer)
        self.add_frozen("encoder", encoder)
        self.add_frozen("text_encoder", text_encoder)  # text models: encodes the grid prompts (captions are cached)
        # the DiT's caption dims; prompts of the sample grids: texts for the text encoder, or (text.embeddings) the
        # first distinct training embeddings (ldm.data.embeddings.grid_rows)
        self.caption, self.prompts = caption, prompts
        self.diffusion, self.sample, self.eval_cfg = diffusion, sample, eval_cfg
        self.fid_reference, self.image_size = fid_reference, image_size
        self.learned_sigma = learned_sigma
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self.path, self.prediction = get_path(diffusion.path), diffusion.prediction
        self.per_sample_draws = per_sample_draws
        self.terms = build_generator_terms(diffusion, path=self.path, tokenizer=tokenizer, normalizer=normalizer,
                                           projector=projector, encoder=encoder)  # ldm/train/generator_terms.py

    @property
    def tokenizer(self) -> nn.Module:
        return self.frozen("tokenizer")

    def param_groups(self):
        params = list(self.model.parameters())
        if self.projector is not None:
            params += list(self.projector.parameters())
        return {"model": params}

    def ema_module(self) -> nn.Module:
        return self.model

    def compile_modules(self, compile_fn) -> list[str]:
        """DiT: each block (DiT.compile_blocks; the embedders and the final layer are small); the UNet adapter:
        diffusers' UNet2DModel inside it (the adapter's label and input checks stay eager); another network: all of
        it. The loss (ldm.diffusion.objectives) is a few element-wise operations on latents: nothing to gain."""
        from ldm.models.dit import DiT
        from ldm.models.unet import UNetGenerator

        if isinstance(self.model, DiT):
            return [f"model.{name}" for name in self.model.compile_blocks(compile_fn)]
        if isinstance(self.model, UNetGenerator):
            compile_fn(self.model.unet)
            return ["model.unet"]
        compile_fn(self.model)
        return ["model"]

    def describe(self) -> dict:
        tok = self.tokenizer
        return {"kind": "generator", "latent_shape": list(self.latent_shape), "num_classes": self.num_classes,
                "tokenizer_source": str(tok.source), "tokenizer_fingerprint": tok.fingerprint,
                "latent_norm": self.normalizer.kind, "draws": "per_sample" if self.per_sample_draws else "global",
                **({"text": self.caption} if self.caption is not None else {})}

    def resume_facts(self, saved: dict) -> None:
        """Continue a checkpoint as it was trained: one written before per-sample draws (no "draws" in its task
        facts) keeps torch's global-RNG draws."""
        self.per_sample_draws = saved.get("draws", "global") == "per_sample"

    def latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised latents of a batch (from the cache or encoded now)."""
        z = batch["latent"] if "latent" in batch else self.tokenizer.encode(batch["image"])
        return self.normalizer.normalize(z.float())

    def forward(self, batch, *, step: int, phase: str, micro: int = 0) -> StepOutput:
        d = self.diffusion
        x0 = self.latents(batch)  # (B, C, h, w)
        y = batch["label"] if self.num_classes > 0 else None
        if self.caption is not None:  # text models: the item's caption embeddings (ldm/data/captions.py)
            y = TextCondition(batch["text_tokens"], batch["text_mask"], batch["text_pooled"])
        hidden = {}
        draws, labels = None, {}  # torch's global RNG (see the module docstring)
        if self.per_sample_draws and "sample_seed" in batch:
            draws = sample_generators(batch["sample_seed"], "diffusion", x0.device)  # t, then the noise
            labels = {"generator": sample_generators(batch["sample_seed"], "label_dropout", x0.device)}

        def model_fn(x_t, t):
            if self.projector is None:
                return self.model(x_t, t, y, **labels)
            out = self.model(x_t, t, y, return_hidden=True, **labels)
            hidden["h"] = out.hidden
            return out.output

        timesteps = None if d.path.startswith("ddpm") else d.t_sampler
        state = {}  # x_t, t, noise, out
        loss, logs = training_loss(model_fn, x0, path=self.path, prediction=self.prediction, generator=draws,
                                   timesteps=timesteps, logit_mean=d.t_mean, logit_std=d.t_std, shift=d.t_shift,
                                   weighting=None if d.weighting == "none" else d.weighting,
                                   min_snr_gamma=d.min_snr_gamma, cos_loss_weight=d.cos_loss_weight,
                                   learned_sigma=self.learned_sigma, state=state)
        total = loss.mean()
        ctx = StepContext(batch=batch, step=step, x0=x0, hidden=hidden, **state)
        for term in self.terms:  # auxiliary losses: REPA, LPL, pixel loss (ldm/train/generator_terms.py)
            value, term_logs = term(ctx)
            total = total if value is None else total + value
            logs.update(term_logs)
        logs["loss"] = total.detach()  # what is optimised: the diffusion loss ("mse" etc.) plus the weighted terms
        return StepOutput(total, {k: float(v) for k, v in logs.items()})

    # -------------------------------------------------------------------------------------------------- sampling
    def generator(self, model: nn.Module | None = None) -> Generator:
        """The inference Generator around `model` (the EMA copy or the live network; default the live one)."""
        return Generator(model=self.model if model is None else model, normalizer=self.normalizer,
                         tokenizer=self.tokenizer, path=self.path, prediction=self.prediction,
                         num_classes=self.num_classes, latent_shape=self.latent_shape,
                         learned_sigma=self.learned_sigma, text_encoder=self.frozen("text_encoder"),
                         caption=self.caption)

    def _grid_prompts(self, gen: Generator) -> int:
        """Text models: give `gen` the grid prompts (at most 10); how many it got (0: none, so it samples from the null
        caption)."""
        if isinstance(self.prompts, list):  # texts, encoded by the run's text encoder
            if self.prompts and gen.text_encoder is not None:
                gen.set_prompts(self.prompts[:10])
        elif self.prompts is not None:  # text.embeddings: the first distinct training embeddings
            gen.set_prompt_embeddings(self.prompts)
        return gen.num_prompts

    @torch.no_grad()
    def generate(self, model: nn.Module, labels: torch.Tensor | None, indices: list[int], seed: int) -> torch.Tensor:
        """Images in [-1, 1] for sample indices (per-index seeds) with the run's sampler and guidance (`sample`)."""
        gen = self.generator(model)
        return gen.generate(labels, indices, seed, sample_cfg=self.sample)

    @torch.no_grad()
    def evaluate(self, ema, step: int) -> dict[str, float]:
        """Periodic FID (train.eval_every): eval.num_samples EMA samples (labels cycling through the classes), the
        same feature pass and Fréchet distance as `ldm eval fid`, against eval.reference (default: the data).
        Generation is sharded by whole batches over the processes; the features are gathered by evaluate_batches."""
        import numpy as np

        from ldm.eval.evaluate import evaluate_batches
        from ldm.eval.features import dist_info
        from ldm.eval.generate import labels_for, to_uint8

        e, gen = self.eval_cfg, self.generator(ema)
        rank, world = dist_info()
        classes = list(range(self.num_classes)) if self.num_classes else None
        if self._grid_prompts(gen):  # text models: the grid prompts take the place of classes
            classes = list(range(gen.num_prompts))
        seed = self.sample.seed + 1

        def batches():
            for b in range(rank, -(-e.num_samples // e.batch_size), world):
                idx = list(range(b * e.batch_size, min(e.num_samples, (b + 1) * e.batch_size)))
                labels = labels_for(idx, classes, seed=seed)
                labels = labels.to(gen.device) if labels is not None else None
                images = gen.generate(labels, idx, seed, sample_cfg=self.sample)
                yield to_uint8(images), np.asarray(idx)

        weights = e.inception_weights if e.extractor == "inception" else None
        result = evaluate_batches(batches(), self.fid_reference, extractor=e.extractor, extractor_weights=weights,
                                  metrics=("fd",), size=self.image_size, batch_size=e.batch_size, progress=False,
                                  total=e.num_samples)
        return {f"val/{k}": float(v) for k, v in result.items() if isinstance(v, float)}

    @torch.no_grad()
    def visualize(self, batch, ema):
        """A grid of EMA samples (live network without EMA): 4 rows, one class per column (up to 10 classes)."""
        from ldm.io import make_grid

        gen = self.generator(ema)
        cols = min(self.num_classes, 10) if self.num_classes else 8
        rows = 4
        labels = torch.arange(cols).repeat(rows).to(gen.device) if self.num_classes else None
        if self._grid_prompts(gen):  # text models: one prompt per column
            cols = gen.num_prompts
            labels = torch.arange(cols).repeat(rows).to(gen.device)
        images = gen.generate(labels, list(range(rows * cols)), self.sample.seed, sample_cfg=self.sample)
        return make_grid(images, nrow=cols)


# ------------------------------------------------------------------------------------------------------ building
def build_generator_task(cfg: RunConfig):
    """(GeneratorTask, dataset) for a generator config: images encoded on the fly, or the latent cache.

    With a latent cache, every config key that contradicts what the cache holds is refused (ConfigError, one line per
    key) before anything is loaded, so the config saved with the run describes what it trained on."""
    from ldm.data.images import build_dataset
    from ldm.models import build_generator_model
    from ldm.tokenizers.export import load_tokenizer

    d = cfg.diffusion
    check_decoder_terms(cfg)
    tok_path = tokenizer_path(cfg.tokenizer)
    if cfg.data.latents is not None:
        if d.repa:
            raise ConfigError("diffusion.repa needs the images for the frozen encoder: unset data.latents to encode "
                              "latents on the fly")
        _refuse_contradicting_keys(cfg, read_cache_meta(cfg.data.latents))
    tokenizer = load_tokenizer(tok_path)
    image_data = build_dataset(cfg.data) if cfg.data.latents is None or d.repa else None
    if cfg.data.latents is not None:
        dataset = LatentCacheDataset(cfg.data.latents, expected_fingerprint=tokenizer.fingerprint)
        num_classes = dataset.num_classes if cfg.data.class_cond else 0
        latent_shape = tuple(dataset[(0, 0)]["latent"].shape)
        _check_patch(cfg.model, latent_shape[-1], f"the cache's latents (data.latents={cfg.data.latents})")
        stats_images = None
    else:
        dataset = image_data
        num_classes = dataset.num_classes
        f = tokenizer.downsample
        if cfg.data.image_size % f:
            raise ConfigError(f"data.image_size={cfg.data.image_size} is not divisible by the tokenizer's "
                              f"downsampling factor {f}")
        latent_shape = (tokenizer.latent_channels, cfg.data.image_size // f, cfg.data.image_size // f)
        _check_patch(cfg.model, latent_shape[-1], f"data.image_size={cfg.data.image_size} at the tokenizer's "
                     f"downsampling {f}", downsample=f)
        stats_images = _stat_batches(dataset, cfg.tokenizer.stats_num_images)
    normalizer = normalizer_for(tokenizer, kind=d.latent_norm, scaling_factor=d.scaling_factor, images=stats_images,
                                num_images=cfg.tokenizer.stats_num_images)
    text_encoder = caption = prompts = None
    if cfg.text.encoder is not None or cfg.text.embeddings is not None:  # text-to-image: captions replace labels
        dataset, text_encoder, caption, prompts = _caption_dataset(cfg, dataset)
        num_classes = 0
    model = build_generator_model(cfg.model, latent_channels=latent_shape[0], latent_size=latent_shape[1],
                                  num_classes=num_classes, repa_depth=d.repa_depth if d.repa else None,
                                  caption=None if caption is None else {k: caption[k] for k in CAPTION_DIMS})
    projector = encoder = None
    if d.repa:
        from ldm.diffusion.repa import build_projector
        from ldm.encoders import build_encoder

        encoder = build_encoder(d.repa_encoder, weights_path=d.repa_weights)
        projector = build_projector(model.hidden_size, encoder.feature_dim, hidden_dim=d.repa_proj_dim)
    task = GeneratorTask(model, tokenizer, normalizer, diffusion=d, learned_sigma=cfg.model.learn_sigma,
                         num_classes=num_classes, latent_shape=latent_shape, sample=cfg.sample, eval_cfg=cfg.eval,
                         fid_reference=cfg.eval.reference or cfg.data.source, image_size=cfg.data.image_size,
                         projector=projector, encoder=encoder, text_encoder=text_encoder, caption=caption,
                         prompts=prompts)
    init_generator_from(task, cfg)  # train.init_from: another generator run's weights (ldm/train/init_from.py)
    return task, dataset


def _caption_dataset(cfg: RunConfig, dataset):
    """Text models: (the dataset with each item's caption embeddings, the frozen text encoder, the caption facts
    recorded with the checkpoint, the grid prompts). Caption embeddings come from the cache text.cache (default
    <data.latents>/captions; built by process 0 if missing, refused if another encoder made it) or, without a latent
    cache or text.cache, are computed in memory."""
    from pathlib import Path

    from accelerate import PartialState

    from ldm.data.captions import (CaptionedDataset, build_caption_cache, caption_set_for, encode_captions,
                                   read_caption_cache)
    from ldm.data.sources import open_source
    from ldm.encoders.text import load_text_encoder

    t = cfg.text
    if cfg.diffusion.repa:
        raise ConfigError("text.encoder and diffusion.repa are not combined; set diffusion.repa=false")
    if t.embeddings is not None:
        return _embedding_dataset(cfg, dataset)
    encoder = load_text_encoder(t.encoder, max_tokens=t.max_tokens)
    captions = caption_set_for(open_source(cfg.data.source, cfg.data.image_size), t.captions)
    cache = t.cache or (str(Path(cfg.data.latents) / "captions") if cfg.data.latents is not None else None)
    if cache is None:
        embeddings = encode_captions(encoder.encode, captions.texts, batch_size=t.batch_size, dtype=t.cache_dtype)
    else:
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.is_main_process:
            build_caption_cache(encoder, captions, cache, batch_size=t.batch_size, dtype=t.cache_dtype)
        state.wait_for_everyone()
        embeddings = read_caption_cache(cache, expected_fingerprint=encoder.fingerprint, captions=captions)
    caption = {"caption_dim": encoder.token_dim, "caption_tokens": t.max_tokens,
               "pooled_dim": encoder.pooled_dim if t.use_pooled else None,
               "encoder_source": encoder.source, "encoder_fingerprint": encoder.fingerprint}
    prompts: list[str] = []
    for i in range(len(captions)):  # the first caption of each image until 10 distinct ones: the digits 0..9
        first = captions.captions_of(i)[0]
        if first not in prompts:
            prompts.append(first)
        if len(prompts) == 10:
            break
    return CaptionedDataset(dataset, captions, embeddings), encoder, caption, prompts


def _embedding_dataset(cfg: RunConfig, dataset):
    """Text models on precomputed embeddings (text.embeddings, ldm/data/embeddings.py), _caption_dataset's tuple: no
    text encoder; the grid prompts (grids, periodic FID, guided by sample.cfg_scale) are the first distinct training
    embeddings (grid_rows); the checkpoint records the embeddings' fingerprint where an encoder's would be,
    "precomputed": true and whether their pooled embeddings were given ("pooled_given"; `ldm sample
    --prompt-embeddings` asks the same of its prompts)."""
    from ldm.data.captions import CaptionedDataset
    from ldm.data.embeddings import load_embeddings
    from ldm.data.sources import open_source

    t = cfg.text
    given = [f"{key}={value!r}" for key, value in (("text.encoder", t.encoder), ("text.cache", t.cache))
             if value is not None] + ([f"text.captions={t.captions!r}"] if t.captions != "auto" else [])
    if given:
        raise ConfigError(f"text.embeddings={t.embeddings!r} gives the caption embeddings, so {', '.join(given)} "
                          f"would not be used: leave {'them' if len(given) > 1 else 'it'} out (or unset "
                          f"text.embeddings to encode captions with text.encoder)")
    pre = load_embeddings(open_source(cfg.data.source, cfg.data.image_size), t.embeddings, max_tokens=t.max_tokens)
    caption = {"caption_dim": pre.token_dim, "caption_tokens": pre.max_tokens,
               "pooled_dim": pre.pooled_dim if t.use_pooled else None, "encoder_source": pre.source,
               "encoder_fingerprint": pre.fingerprint, "precomputed": True, "pooled_given": pre.pooled_given}
    return CaptionedDataset(dataset, pre.captions, pre.embeddings), None, caption, grid_rows(pre)


def _check_patch(model_cfg, latent_size: int, origin: str, downsample: int | None = None) -> None:
    """ConfigError naming model.preset and where the latent size comes from (`origin`) when the DiT preset's patch
    does not tile the latents; checked here, where the config keys are known, before latent statistics are computed
    (DiT itself can only name its input_size). `downsample`: latents encoded from data.image_size, which may change."""
    from ldm.models.dit import DIT_PRESETS

    if model_cfg.arch != "dit" or model_cfg.preset not in DIT_PRESETS:
        return  # the UNet has no patches; an unknown preset fails in build_dit with the list of presets
    patch = DIT_PRESETS[model_cfg.preset].keywords["patch_size"]
    if latent_size % patch:
        patches = {preset.keywords["patch_size"] for preset in DIT_PRESETS.values()}
        fits = sorted(p for p in patches if latent_size % p == 0)
        fix = f", or data.image_size a multiple of {patch * downsample}" if downsample else ""
        raise ConfigError(f"model.preset={model_cfg.preset!r} has patch size {patch}, which does not divide the "
                          f"{latent_size}x{latent_size} latents of {origin}: choose a preset with patch size in "
                          f"{fits}{fix}")


def _refuse_contradicting_keys(cfg: RunConfig, meta: CacheMeta) -> None:
    """ConfigError, one line per key, when the config says something else than the latent cache records.

    A generator trained from a cache sees the cache's images, crop and latents whatever the config says, while the
    config is saved with the run and its checkpoints, and periodic FID takes its image size (data.image_size) and
    default reference (data.source) from it: a contradiction is refused rather than recorded. Nothing is derived:
    the saved config is the config as given, and a key left at its default cannot be told from one set to it.
    The tokenizer's fingerprint is checked by LatentCacheDataset; data.hflip=false with stored flips is no
    contradiction (stored flips are used, as data.latents documents)."""
    lines = [f"{key}={mine!r} but the cache holds {what}: set {key}={theirs}"
             f"{' or leave it out' if _default(key) == theirs else ''}"
             for key, mine, theirs, what in _cache_facts(cfg, meta) if mine != theirs]
    if cfg.data.hflip and not meta.flips:
        lines.append("data.hflip=True but the cache stores no flipped latents: set data.hflip=false or leave it out, "
                     "or rebuild the cache with flips (`ldm cache-latents --flip`)")
    if cfg.data.source != meta.data_source and not _same_data(cfg.data.source, meta):
        lines.append(f"data.source={cfg.data.source!r} but the cache was encoded from {meta.data_source!r} (not "
                     f"the same files): set data.source={meta.data_source}"
                     f"{' or leave it out' if _default('data.source') == meta.data_source else ''}")
    if lines:
        raise ConfigError(f"data.latents={cfg.data.latents} contradicts the config (the cache decides these):\n  "
                          + ";\n  ".join(lines))


def _cache_facts(cfg: RunConfig, meta: CacheMeta) -> list[tuple[str, object, object, str]]:
    """(config key, the config's value, the cache's value, what the cache holds) for each key a cache fixes."""
    from ldm.tokenizers.kinds import get_kind

    # the key of the cache's kind that sets the generator's channels (kl: latent_channels, vq: vq.code_dim, fsq:
    # fsq.levels, one channel per level); a list-valued key agrees when its length does
    channels_key, value, count = get_kind(meta.tokenizer_kind).configured_latent_channels(cfg.tokenizer)
    c = meta.latent_shape[0]
    cached = value if count == c else (c if isinstance(value, int) else f"a list of {c}")
    return [("data.image_size", cfg.data.image_size, meta.image_size, f"{meta.image_size} px images"),
            ("data.crop", cfg.data.crop, meta.crop, f"{meta.crop} crops"),
            ("tokenizer.kind", cfg.tokenizer.kind, meta.tokenizer_kind,
             f"latents of a {meta.tokenizer_kind} tokenizer"),
            (channels_key, value, cached, f"{c}-channel latents")]


def _same_data(source: str, meta: CacheMeta) -> bool:
    """Whether `source` holds the files the cache was encoded from (e.g. a moved folder): the same data fingerprint."""
    from ldm.data.sources import open_source

    try:
        return open_source(source, meta.image_size).fingerprint() == meta.data_fingerprint
    except (OSError, ValueError):  # missing or unreadable: not the cached data
        return False


def _default(key: str):
    """The schema default of a dotted config key."""
    node = RunConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _stat_batches(dataset, num_images: int, batch_size: int = 64):
    """Deterministic image batches of the first `num_images` items for latent statistics: under torch.distributed
    this process's contiguous share of them (compute_latent_stats all-reduces the sums), so the statistics are those
    of the same images for any process count."""
    from ldm.eval.features import dist_info

    rank, world = dist_info()
    n = min(num_images, len(dataset))
    share = -(-n // world)
    first, end = rank * share, min(n, (rank + 1) * share)
    for start in range(first, end, batch_size):
        yield torch.stack([dataset[(i, 0)]["image"] for i in range(start, min(end, start + batch_size))])
