"""diffusers classes for exported ldm generators (written by ldm/eval/export_generator.py).

Two folder layouts:

* `DiTPipeline` (diffusers' own pipeline) for DDPM eps DiTs: transformer/ (DiT weights in DiTTransformer2DModel's
  layout, converted by `dit_to_diffusers`), vae/ (the tokenizer as AutoencoderKL, scaling_factor = the generator's
  scalar latent scale), scheduler/ (DDPMScheduler or DDIMScheduler), id2label in model_index.json.
  One departure from a stock folder: the transformer is `LdmDiTTransformer2DModel`, a DiTTransformer2DModel whose
  timestep features are DiT's. diffusers' CombinedTimestepLabelEmbeddings uses Timesteps(downscale_freq_shift=1), i.e.
  frequencies 10000^(-j / 127), j < 128, where DiT's TimestepEmbedder (facebookresearch/DiT models.py, and ours,
  ldm/models/layers.timestep_embedding) uses 10000^(-j / 128): no trained DiT, ours or the official one, gives the
  same output in a plain DiTTransformer2DModel. The subclass also maps the scheduler's DDPM index i to our network's
  timestep input t_shift + t_scale t at t = (i + 1) / T (paths.DiscretePath puts index i at t = (i + 1) / T).
  It adds no weights: `DiTTransformer2DModel.from_pretrained(folder/transformer)` loads the same tensors (with
  diffusers' frequencies).
* `LdmLatentPipeline` (a DiffusionPipeline shipped here) for every other generator: transformer/ (`LdmGeneratorModel`:
  the ldm network itself, rebuilt from its config), vae/ (AutoencoderKL), scheduler/ (a diffusers scheduler where one
  performs the run's sampler, else `LdmSamplerScheduler`, which runs the ldm sampler), and the latent normalisation,
  guidance defaults and id2label in model_index.json.

Loading: `LdmLatentPipeline.from_pretrained(folder)`, or `DiffusionPipeline.from_pretrained(folder)` after
`import ldm.eval.export_pipeline`. diffusers resolves a pipeline class named in model_index.json as an attribute of the
`diffusers` module, and a component class from an already imported module (pipeline_loading_utils
`_get_library_or_raise`), so importing this module registers `LdmLatentPipeline` there. The DiTPipeline folder also
needs this import (for its transformer class).

Time convention at the boundary (ours: t = 0 data, t = 1 noise, paths.py):
  FlowMatchEulerDiscreteScheduler  sigma = t (diffusers' flow matching puts noise at sigma = 1 too:
                                   x = (1 - sigma) x0 + sigma noise), model output = dx/dsigma = our velocity;
                                   the network gets t = scheduler.sigmas[i].
  DDPMScheduler / DDIMScheduler     integer index i <-> t = (i + 1) / T, model output eps (+ DiT's variance values).
"""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
    SchedulerMixin,
)
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ldm.config import ModelCfg, SampleCfg
from ldm.diffusion.paths import DiscretePath, Path, get_path, prediction_target
from ldm.diffusion.samplers import get_sampler
from ldm.eval.generator import guided_denoiser, initial_noise, sample_latents
from ldm.models.dit import DiT
from ldm.models.layers import GeluMlp, timestep_embedding
from ldm.tokenizers.stats import LatentNormalizer

PIPELINE_KINDS = ("dit", "ldm")  # DiTPipeline folder, LdmLatentPipeline folder
DIT_PIPELINE_NULL_ID = 1000  # DiTPipeline.__call__ hard-codes the null class id of guidance to 1000


# ------------------------------------------------------------------------------------------------------ DiT -> diffusers
class DiTTimestepFeatures(nn.Module):
    """DiT's sinusoidal features (layers.timestep_embedding, frequencies 10000^(-j / 128)) of scale * i + shift for the
    timestep i a diffusers pipeline passes; replaces diffusers' `Timesteps` in every block's embedder."""

    def __init__(self, scale: float, shift: float, dim: int = 256) -> None:
        super().__init__()
        self.scale, self.shift, self.dim = scale, shift, dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(self.shift + self.scale * timesteps.float(), self.dim)  # (B,) -> (B, dim)


class LdmDiTTransformer2DModel(DiTTransformer2DModel):
    """DiTTransformer2DModel with DiT's timestep features of `timestep_scale * i + timestep_shift` (module docstring)."""

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: int | None = None, num_layers: int = 28, dropout: float = 0.0, norm_num_groups: int = 32,
                 attention_bias: bool = True, sample_size: int = 32, patch_size: int = 2,
                 activation_fn: str = "gelu-approximate", num_embeds_ada_norm: int | None = 1000,
                 upcast_attention: bool = False, norm_type: str = "ada_norm_zero", norm_elementwise_affine: bool = False,
                 norm_eps: float = 1e-5, timestep_scale: float = 1.0, timestep_shift: float = 0.0):
        super().__init__(num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
                         in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
                         norm_num_groups=norm_num_groups, attention_bias=attention_bias, sample_size=sample_size,
                         patch_size=patch_size, activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm,
                         upcast_attention=upcast_attention, norm_type=norm_type,
                         norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps)
        for block in self.transformer_blocks:
            block.norm1.emb.time_proj = DiTTimestepFeatures(timestep_scale, timestep_shift)


def dit_pipeline_refusal(model: nn.Module, *, path: Path, prediction: str, normalizer: LatentNormalizer) -> str | None:
    """Why a generator cannot be a DiTPipeline folder (None when it can): DiTPipeline runs a class-conditional
    eps-prediction DiT with DiT's blocks (LayerNorm, GELU MLP of width 4 D, no RoPE / QK-norm) on a DDPM schedule,
    scales latents by one scalar, and guides with null id 1000."""
    if not isinstance(model, DiT):
        return f"the network is a {type(model).__name__}, not a DiT"
    if not isinstance(path, DiscretePath) or prediction != "eps":
        return f"DiTPipeline samples eps-prediction DDPM models; this one is path={path.name} prediction={prediction}"
    block = model.blocks[0]
    plain = (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.mlp, GeluMlp)
             and block.mlp.fc1.out_features == 4 * model.hidden_size and model.rope_cos is None
             and isinstance(block.attn.q_norm, nn.Identity))
    if not plain:
        return "the DiT uses LightningDiT switches (SwiGLU / RMSNorm / RoPE / QK-norm) or an MLP ratio other than 4"
    if not 1 <= model.num_classes <= DIT_PIPELINE_NULL_ID:
        return f"DiTPipeline needs 1 .. 1000 classes (null id 1000); this model has {model.num_classes}"
    if normalizer.kind == "channel":
        return "DiTPipeline scales latents by one factor; this generator normalises per channel (latent_norm=channel)"
    return None


def dit_to_diffusers(model: DiT, *, num_timesteps: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(LdmDiTTransformer2DModel config, state dict) of our DiT, for a DDPM of `num_timesteps` steps.

    Key map (ours -> diffusers; the per-block embedders of diffusers all get the one t / y embedder):
      patch_embed.*                   -> pos_embed.proj.*          pos_embed -> (dropped: diffusers' PatchEmbed
                                                                   recomputes the same 2-D sin-cos table, unsaved)
      t_embedder.mlp.{0,2}.*          -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}.*
      y_embedder.weight               -> transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight
                                         (rows padded to 1001: DiTPipeline's null id is 1000; the pad rows and row
                                         1000 hold our null row)
      blocks.{i}.ada_ln.*             -> transformer_blocks.{i}.norm1.linear.*   (same shift/scale/gate order)
      blocks.{i}.attn.qkv.*           -> transformer_blocks.{i}.attn1.to_{q,k,v}.*   (split in 3 along the rows)
      blocks.{i}.attn.proj.*          -> transformer_blocks.{i}.attn1.to_out.0.*
      blocks.{i}.mlp.fc{1,2}.*        -> transformer_blocks.{i}.ff.net.{0.proj,2}.*
      final_layer.ada_ln.*            -> proj_out_1.*              final_layer.linear.* -> proj_out_2.*
    Timestep: our network embeds t_shift + t_scale t with t = (i + 1) / T, i.e. (t_scale / T) i + t_shift + t_scale / T.
    """
    sd = model.state_dict()
    T = num_timesteps
    config = dict(num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
                  in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth,
                  sample_size=model.input_size, patch_size=model.patch_size, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=DIT_PIPELINE_NULL_ID, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                  norm_eps=1e-6, timestep_scale=model.t_scale / T, timestep_shift=model.t_shift + model.t_scale / T)
    table = sd["y_embedder.weight"]  # (num_classes + 1, D), null row last
    nc = model.num_classes
    padded = table[nc].expand(DIT_PIPELINE_NULL_ID + 1, -1).clone()
    padded[:nc] = table[:nc]
    out = {"pos_embed.proj.weight": sd["patch_embed.weight"], "pos_embed.proj.bias": sd["patch_embed.bias"],
           "proj_out_1.weight": sd["final_layer.ada_ln.weight"], "proj_out_1.bias": sd["final_layer.ada_ln.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(model.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        renames = {"ada_ln": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
                   "mlp.fc2": "ff.net.2"}
        for kind in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{kind}"] = sd[f"t_embedder.mlp.0.{kind}"]
            out[f"{emb}timestep_embedder.linear_2.{kind}"] = sd[f"t_embedder.mlp.2.{kind}"]
            for src, dst in renames.items():
                out[f"{theirs}{dst}.{kind}"] = sd[f"{ours}{src}.{kind}"]
            for name, part in zip("qkv", sd[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attn1.to_{name}.{kind}"] = part
        out[f"{emb}class_embedder.embedding_table.weight"] = padded
    return config, {k: v.detach().clone().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------ ldm components
NETWORK_BUILDERS = ("model_cfg", "dit_kwargs")


class LdmGeneratorModel(ModelMixin, ConfigMixin):
    """An ldm generator network (`net(x, t, y)`, OUR t) as a diffusers model, with what its output means.

    builder "model_cfg": models.build_generator_model(ModelCfg(**model_cfg), ...) (runs trained here);
    builder "dit_kwargs": DiT(**dit_kwargs) (official DiT / SiT / LightningDiT weights, converted to our time by
    models/checkpoints.py). path / prediction / learned_sigma say what the output is (ldm.diffusion.paths)."""

    @register_to_config
    def __init__(self, builder: str = "model_cfg", model_cfg: dict | None = None, dit_kwargs: dict | None = None,
                 latent_channels: int = 4, latent_size: int = 32, num_classes: int = 0, path: str = "linear",
                 prediction: str = "velocity", learned_sigma: bool = False):
        super().__init__()
        if builder == "model_cfg":
            from ldm.models import build_generator_model

            self.net = build_generator_model(ModelCfg(**(model_cfg or {})), latent_channels=latent_channels,
                                             latent_size=latent_size, num_classes=num_classes)
        elif builder == "dit_kwargs":
            self.net = DiT(**(dit_kwargs or {}))
        else:
            raise ValueError(f"LdmGeneratorModel builder={builder!r}; expected one of {NETWORK_BUILDERS}")

    def forward(self, sample: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, C, h, w) normalised latents, t (B,) in OUR time, class_labels (B,) or None -> network output."""
        return self.net(sample, t, class_labels)


class LdmSamplerScheduler(SchedulerMixin, ConfigMixin):
    """An ldm sampler (ldm.diffusion.samplers) as the pipeline's scheduler, for runs whose sampler no diffusers scheduler
    performs (heun, dopri5, euler_maruyama, dpm_solver++, ddim on a DDPM path, karras grids, ...). It holds the
    sampler's settings; `LdmLatentPipeline` runs `ldm.eval.generator.sample_latents` with them."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "euler", time_grid: str = "uniform", shift: float = 1.0, eta: float = 0.0):
        super().__init__()
        get_sampler(sampler)  # an unknown name fails at load time, with the list of samplers


def scheduler_for(path: Path, sample_cfg: SampleCfg, learned_sigma: bool) -> SchedulerMixin:
    """The diffusers scheduler that performs `sample_cfg`'s sampler on `path`, else an LdmSamplerScheduler:
      ddpm on a DDPM path     DDPMScheduler: DiT's respacing is timestep_spacing "linspace" (np.linspace(0, T - 1, K)
                              rounded = samplers.respaced_indices), each step to the next grid index, betas of the
                              path, no clipping, learned_range variance for DiT's learned sigma (IDDPM Eq. 15)
      euler on "linear"       FlowMatchEulerDiscreteScheduler with the grid's shift (SD3 Eq. 23, = paths.shift_time);
                              the pipeline passes the unshifted uniform sigmas 1, 1 - 1/n, ..., 1/n
    ddim on a DDPM path has no exact diffusers match: DDIMScheduler steps by T // K from a grid that is not DiT's
    respacing, so it is left to the ldm sampler."""
    if isinstance(path, DiscretePath) and sample_cfg.sampler == "ddpm":
        return DDPMScheduler(num_train_timesteps=path.num_timesteps, trained_betas=path.betas.tolist(),
                             variance_type="learned_range" if learned_sigma else "fixed_small", clip_sample=False,
                             prediction_type="epsilon", timestep_spacing="linspace")
    if path.name == "linear" and sample_cfg.sampler == "euler" and sample_cfg.time_grid in ("uniform", "shifted"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                               shift=sample_cfg.shift if sample_cfg.time_grid == "shifted" else 1.0)
    return LdmSamplerScheduler(sampler=sample_cfg.sampler, time_grid=sample_cfg.time_grid, shift=sample_cfg.shift,
                               eta=sample_cfg.eta)


def dit_pipeline_scheduler(path: DiscretePath, sampler: str) -> SchedulerMixin:
    """DiTPipeline's scheduler: DDPMScheduler for sampler ddpm (DiT's respacing, fixed_small variance: DiTPipeline
    drops learned-sigma channels before the step), else DDIMScheduler (eta 0; "leading" spacing, which equals DiT's
    respacing only at K = T steps)."""
    common = dict(num_train_timesteps=path.num_timesteps, trained_betas=path.betas.tolist(), clip_sample=False,
                  prediction_type="epsilon")
    if sampler == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", timestep_spacing="linspace", **common)
    return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", **common)


# ------------------------------------------------------------------------------------------------------ the pipeline
class LdmLatentPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) latent generation with an ldm generator, as `ldm sample` does.

    Components: transformer (LdmGeneratorModel), vae (AutoencoderKL), scheduler (DDPMScheduler,
    FlowMatchEulerDiscreteScheduler or LdmSamplerScheduler). Config: the latent normalisation (`latent_norm` channel:
    z_norm = (z - mean) / std; scalar: z * scale; none), the sampling defaults of the run (`sample`: steps, cfg_scale,
    interval, cfg_channels, guidance_rule) and id2label.

    With `generator` a list of one torch.Generator per image, the noise and every stochastic step of image b come from
    generator[b] alone; with ldm.seeding.index_generators(seed, indices) that is `ldm sample`'s noise for those indices.
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: LdmGeneratorModel, vae: AutoencoderKL, scheduler: SchedulerMixin,
                 latent_norm: str = "none", latent_mean: list | None = None, latent_std: list | None = None,
                 latent_scale: float = 1.0, sample: dict | None = None, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(latent_norm=latent_norm, latent_mean=latent_mean, latent_std=latent_std,
                                latent_scale=latent_scale, sample=sample or {}, id2label=id2label)
        c = transformer.config.latent_channels
        self.normalizer = LatentNormalizer(latent_norm, c, mean=latent_mean, std=latent_std, scale=latent_scale)
        self.labels = {str(v): int(k) for k, v in (id2label or {}).items()}

    def sample_cfg(self, num_inference_steps: int | None, guidance_scale: float | None) -> SampleCfg:
        """The run's sampling settings with this call's steps / guidance scale."""
        s = dict(self.config.sample)
        if num_inference_steps is not None:
            s["steps"] = num_inference_steps
        if guidance_scale is not None:
            s["cfg_scale"] = guidance_scale
        if isinstance(self.scheduler, LdmSamplerScheduler):
            s.update(dict(self.scheduler.config))
        s = {k: v for k, v in s.items() if not k.startswith("_")}
        s["precision"] = "fp32"  # the network runs in the pipeline's dtype (from_pretrained(torch_dtype=...))
        return SampleCfg(**s)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 batch_size: int | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images for `class_labels` (or `batch_size` unconditional ones): steps and guidance default to the run's;
        output_type "latent" returns the normalised latents before decoding, "pt" (B, 3, H, W) in [0, 1], "np", "pil"."""
        net = self.transformer
        cfg = net.config
        device = self._execution_device
        y = None
        if class_labels is not None:
            y = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            batch_size = y.shape[0]
        elif cfg.num_classes > 0:
            raise ValueError("this generator is class-conditional: pass class_labels")
        if batch_size is None:
            raise ValueError("pass batch_size for an unconditional generator")
        sample_cfg = self.sample_cfg(num_inference_steps, guidance_scale)
        path = get_path(cfg.path)
        shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if latents is None:
            if isinstance(generator, list):
                latents = initial_noise(shape, generator, device)  # ldm's per-sample draw
            else:
                latents = randn_tensor((batch_size, *shape), generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)

        def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return net(x, t, labels)

        if isinstance(self.scheduler, LdmSamplerScheduler):
            z = sample_latents(model, latents, y, path=path, prediction=cfg.prediction, sample_cfg=sample_cfg,
                               num_classes=cfg.num_classes, learned_sigma=cfg.learned_sigma, generators=generator)
        else:
            z = self._scheduler_loop(model, latents, y, path, sample_cfg, generator)
        if output_type == "latent":
            images = z
        else:
            images = (self.vae.decode(self.normalizer.to(device).denormalize(z)).sample.clamp(-1, 1) + 1) / 2
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _scheduler_loop(self, model, x: torch.Tensor, y: torch.Tensor | None, path: Path, sample_cfg: SampleCfg,
                        generator) -> torch.Tensor:
        """Integrate with the diffusers scheduler, converting its time and model-output conventions (module
        docstring); the network's output goes through the same guidance and prediction conversion as ldm's
        samplers (generator.guided_denoiser)."""
        cfg, sched = self.transformer.config, self.scheduler
        denoise = guided_denoiser(model, y, path=path, prediction=cfg.prediction, sample_cfg=sample_cfg,
                                  num_classes=cfg.num_classes, learned_sigma=cfg.learned_sigma)
        flow = isinstance(sched, FlowMatchEulerDiscreteScheduler)
        n = sample_cfg.steps
        if flow:
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1], device=x.device)
        else:
            sched.set_timesteps(n, device=x.device)
        for i, step_t in enumerate(self.progress_bar(sched.timesteps)):
            t_ours = float(sched.sigmas[i]) if flow else (int(step_t) + 1) / path.num_timesteps
            t = torch.full((x.shape[0],), t_ours, dtype=torch.float32, device=x.device)  # (B,)
            d = denoise(x, t)
            if flow:
                out = prediction_target("velocity", d.x0, d.eps, t, path)  # dx/dsigma
            else:
                out = d.eps if d.var_values is None else torch.cat([d.eps, d.var_values], dim=1)
            x = sched.step(out, step_t, x, generator=generator).prev_sample
        return x


# diffusers finds a pipeline class named in model_index.json as an attribute of the `diffusers` module (module docstring)
diffusers.LdmLatentPipeline = LdmLatentPipeline
