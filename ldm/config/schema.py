"""The run configuration's schema: one dataclass per section, every default and help text defined once here.

Every field may carry validation metadata (`choices`, `min`, `max`, `min_exclusive`) that ldm.config.validation
checks. Names that pick a registered implementation (sampler, DiT preset, FID extractor, vision encoder, tokenizer
kind) take their choices from the torch-free tuples of ldm/names.py, so a typo fails at load time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ldm.names import ENCODER_NAMES, EXTRACTOR_NAMES, SAMPLER_NAMES, TOKENIZER_KINDS


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it and says what is allowed."""


def choice(default: Any, choices: tuple, help: str) -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def bounded(default: Any, *, min: float | None = None, max: float | None = None, min_exclusive: bool = False,
            help: str) -> Any:
    return field(default=default, metadata={"min": min, "max": max, "min_exclusive": min_exclusive, "help": help})


def listed(default: list, help: str) -> Any:
    return field(default_factory=lambda: list(default), metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------- sections
# Every field carries a help text (what it is, its unit, what its values mean, its source where it follows a paper or
# a peer); `ldm train --help` prints them and tests/test_config.py checks that none is empty.
@dataclass
class DataCfg:
    source: str = field(default="digits", metadata={"help": "'digits' (scikit-learn's 1,797 8x8 handwritten digits, "
                                                            "10 classes, upsampled bicubically) or a path: an image "
                                                            "folder (searched recursively; sub-folders of the root = "
                                                            "classes), a .zip/.tar archive (same rules; a compressed "
                                                            "tar is refused: convert it with `ldm make-shards`), an "
                                                            "ADM .npz (arr_0 uint8 NHWC images, optional arr_1 labels) "
                                                            "or WebDataset tar shards by a brace pattern, "
                                                            "shards/train-{000000..000127}.tar (docs/data.md)"})
    image_size: int = bounded(32, min=8, help="side of the square training images in pixels; the generator's latent "
                                              "side is image_size / the tokenizer's downsampling factor")
    crop: str = choice("center", ("center", "random", "resize"),
                       "center: ADM centre crop (box-halve, bicubic resize of the shorter side, centre square); "
                       "random: a uniformly placed image_size square (smaller images upscaled first); resize: bicubic "
                       "resize to a square (aspect ratio not kept). A latent cache takes center or resize")
    crops_per_image: int = bounded(1, min=1, help="crop=random only: items per image per epoch, each its own random "
                                                  "crop (an epoch is this many times longer)")
    hflip: bool = field(default=False, metadata={"help": "random horizontal flip with p = 0.5, drawn from the item's "
                                                         "seed (a resumed run repeats it); a latent cache built from "
                                                         "this config also stores flipped latents"})
    on_error: str = choice("skip", ("skip", "raise"), "undecodable, truncated, zero-byte or too-small image files: "
                                                      "skip (the next good image takes the place, with a counted "
                                                      "warning) or raise naming the file")
    min_size: int = bounded(8, min=1, help="minimum shorter side in pixels; smaller images are bad files "
                                           "(data.on_error)")
    num_workers: int = bounded(0, min=0, help="DataLoader worker processes (0 = load in the training process); "
                                              "batches do not depend on it, except with shards, where each worker "
                                              "reads its own shards (a resume then keeps the count)")
    shuffle_buffer: int = bounded(1000, min=0, help="shards only: items in the shuffle buffer each loader worker "
                                                    "passes its shards' items through (tf.data / WebDataset rule; "
                                                    "0 or 1 = shard order); shards themselves are shuffled every "
                                                    "epoch")
    class_cond: bool = field(default=True, metadata={"help": "class-conditional generator: labels from class "
                                                             "sub-folders / npz arr_1 / digits (a source without "
                                                             "labels trains unconditionally; the tokenizer ignores "
                                                             "labels)"})
    latents: Optional[str] = field(default=None, metadata={"help": "generator stage: a latent cache directory "
                                                                   "written by `ldm cache-latents` (its tokenizer "
                                                                   "fingerprint must match; flipped latents are used "
                                                                   "when stored); null = encode images on the fly"})


@dataclass
class OptimCfg:
    name: str = choice("adamw", ("adam", "adamw"), "optimizer: adamw (decoupled weight decay, Loshchilov & Hutter "
                                                   "2019) or adam (weight decay added to the gradient as L2)")
    lr: float = bounded(1e-4, min=0.0, min_exclusive=True, help="peak learning rate, times the warm-up / schedule "
                                                                "factor (the tokenizer's discriminator: optim.disc_lr "
                                                                "when set)")
    betas: list = listed([0.9, 0.999], "Adam (beta1, beta2): decay rates of the gradient's first and second moment "
                                       "estimates")
    weight_decay: float = bounded(0.0, min=0.0, help="weight decay coefficient, applied to every trained parameter "
                                                     "(0 = none)")
    eps: float = bounded(1e-8, min=0.0, min_exclusive=True, help="Adam epsilon added to sqrt(v_hat) in the update's "
                                                                 "denominator")
    warmup_steps: int = bounded(0, min=0, help="optimizer steps of linear lr warm-up: factor (step + 1) / "
                                               "warmup_steps, then the schedule (0 = none)")
    schedule: str = choice("constant", ("constant", "cosine", "linear"),
                           "lr factor after warm-up, p = fraction of (train.max_steps - warmup_steps) done: constant "
                           "1; cosine min_lr_ratio + (1 - min_lr_ratio)(1 + cos(pi p)) / 2; linear 1 - (1 - "
                           "min_lr_ratio) p")
    min_lr_ratio: float = bounded(0.0, min=0.0, max=1.0, help="lr at train.max_steps / peak lr, for the cosine and "
                                                              "linear schedules")
    grad_clip: float = bounded(1.0, min=0.0, help="maximum global L2 norm of each optimizer's gradients (per phase); "
                                                  "0 = no clipping (the norm is logged either way)")
    disc_lr: Optional[float] = field(default=None, metadata={"help": "tokenizer: learning rate of the discriminator "
                                                                     "optimizer; null = optim.lr"})
    disc_betas: list = listed([0.5, 0.9], "tokenizer: Adam betas of the discriminator optimizer (taming/LDM: 0.5, 0.9)")


@dataclass
class TrainCfg:
    batch_size: int = bounded(32, min=1, help="global batch size in samples per optimizer step, summed over "
                                              "processes and accumulation micro-batches; must be divisible by "
                                              "processes x grad_accum_steps")
    grad_accum_steps: int = bounded(1, min=1, help="micro-batches accumulated per optimizer step (each holds "
                                                   "batch_size / (processes x grad_accum_steps) samples)")
    max_steps: int = bounded(1000, min=1, help="train until this many optimizer steps in total (a resumed run "
                                               "continues to it); also where the lr schedule ends")
    max_epochs: Optional[int] = field(default=None, metadata={"help": "also stop after this many passes over the "
                                                                      "dataset; null = max_steps alone"})
    mixed_precision: str = choice("auto", ("auto", "no", "bf16", "fp16"),
                                  "autocast precision (accelerate): auto = bf16 on CUDA and on CPUs with native bf16 "
                                  "matmul (AVX512-BF16 / AMX / Arm BF16), fp32 elsewhere (the run header says which "
                                  "and why); a resumed run keeps its checkpoint's precision; no = fp32; fp16 adds a "
                                  "gradient scaler")
    ema: bool = field(default=True, metadata={"help": "keep an exponential moving average of the trained network "
                                                      "(autoencoder or generator; not the discriminator or "
                                                      "projectors); grids, periodic FID, sampling and exports use it"})
    ema_decay: float = bounded(0.9999, min=0.0, max=1.0, help="EMA decay d per optimizer step: e <- d e + (1 - d) w "
                                                              "(DiT: 0.9999)")
    ema_warmup_steps: int = bounded(0, min=0, help="for steps s below this the decay is min(ema_decay, (1 + s) / "
                                                   "(10 + s)) (TF ExponentialMovingAverage num_updates); 0 = "
                                                   "ema_decay throughout")
    log_every: int = bounded(10, min=1, help="optimizer steps between metric logs (TensorBoard, metrics.jsonl, "
                                             "progress bar); losses are averaged over the steps since the last log")
    ckpt_every: int = bounded(500, min=1, help="optimizer steps between checkpoints (one is also written at the end "
                                               "and on preemption)")
    keep_last: int = bounded(3, min=1, help="newest checkpoints kept on disk; older ones are deleted after each save (a "
                               "checkpoint written on a preemption signal is kept besides them until the next save)")
    sample_every: int = bounded(0, min=0, help="optimizer steps between sample grids (generator) or reconstruction "
                                               "grids (tokenizer) in samples/ and TensorBoard; 0 = at the end only")
    eval_every: int = bounded(0, min=0, help="optimizer steps between periodic evaluations (generator: FID of "
                                             "eval.num_samples EMA samples, see eval.*; the tokenizer has none); "
                                             "0 = off")
    resume: str = field(default="auto", metadata={"help": "auto: continue from <run_root>/<name>/latest if present; "
                                                          "never: refuse to reuse a run directory that holds "
                                                          "checkpoints; or a run / checkpoint directory to start from"})
    max_nan_skips: int = bounded(0, min=0, help="steps with a non-finite loss or gradient norm skipped (the step is "
                                                "retried on the next batch) before the run stops; 0 = stop at the "
                                                "first")
    deterministic: bool = field(default=False, metadata={"help": "torch.use_deterministic_algorithms on, TF32 off: "
                                                                 "reproducible kernels for tests and bisection "
                                                                 "(slower)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile what pays, in place (checkpoints "
                                                           "unchanged): the DiT blocks / the UNet, the tokenizer's "
                                                           "encoder, decoder and LPIPS; compiled in the first step, "
                                                           "timed apart ('compile + first step'); if compiling fails, "
                                                           "one warning and the run trains eagerly"})
    run_root: str = field(default="runs", metadata={"help": "runs are written to <run_root>/<name>/"})
    trackers: list[str] = listed(["tensorboard"], "where metrics (and sample / reconstruction grids, where the tracker "
                                                  "takes images) go besides metrics.jsonl: tensorboard (<run>/tb), "
                                                  "wandb, mlflow (accelerate's trackers; optional extras, e.g. pip "
                                                  "install 'ldm[wandb]'); [] = metrics.jsonl only")
    tracker_project: str = field(default="ldm", metadata={"help": "W&B project / MLflow experiment the run logs to "
                                                                  "(the run is named after `name`)"})
    init_from: Optional[str] = field(default=None, metadata={"help": "generator stage: start from another generator "
                                                                     "run's (or checkpoint's) weights, with a fresh "
                                                                     "optimizer, step 0 and its latent normalisation; "
                                                                     "refused for another architecture or tokenizer; "
                                                                     "needs train.init_weights"})
    init_weights: Optional[str] = choice(None, (None, "ema", "raw"), "which weights train.init_from loads: ema (the "
                                                                     "EMA copy) or raw (the trained network); must be "
                                                                     "given with train.init_from")
    allow_changes: list[str] = listed([], "config keys (or patterns such as model.*) that may differ from the "
                                          "checkpoint's config when resuming although they change the experiment "
                                          "(see ldm.config.RESUME_MAY_CHANGE for those that always may)")


@dataclass
class EqCfg:
    enabled: bool = field(default=False, metadata={"help": "EQ-VAE (Kouzelis et al. 2025, arXiv:2502.09509): decode "
                                                           "scaled / rotated latents against the image transformed "
                                                           "the same way"})
    p_equivariance: float = bounded(0.5, min=0.0, max=1.0, help="probability per batch of the equivariance mode "
                                                                "(reference p_prior = 0.5)")
    p_prior_scale: float = bounded(0.25, min=0.0, max=1.0, help="otherwise (prior-preservation mode): probability of "
                                                                "reconstructing a downscaled input rather than the "
                                                                "plain image (reference 0.25)")
    scale_num_min: int = bounded(8, min=1, help="scales s = k / scale_den for k = scale_num_min .. scale_num_max "
                                                "(reference 8/32 .. 31/32)")
    scale_num_max: int = bounded(31, min=1, help="largest numerator k of the scale set (< scale_den)")
    scale_den: int = bounded(32, min=1, help="denominator of the scale set")
    anisotropic: bool = field(default=False, metadata={"help": "draw the x and y scales independently (false: one "
                                                               "scale for both axes)"})
    rotate: bool = field(default=True, metadata={"help": "equivariance mode also rotates latent and image by k x 90 "
                                                         "degrees, k uniform in {1, 2, 3}"})


@dataclass
class VaCfg:
    enabled: bool = field(default=False, metadata={"help": "VA-VAE (Yao et al. 2025, arXiv:2501.01423 Sec. 3.2): the "
                                                           "VF loss between a 1x1 projection of the latent and a "
                                                           "frozen vision encoder's features"})
    encoder: str = choice("dinov2_vitl14", ENCODER_NAMES, "frozen vision encoder: a name of ldm.encoders.ENCODERS "
                                                          "(local weights) or digits (shipped, offline)")
    weights: Optional[str] = field(default=None, metadata={"help": "weights file of the encoder; null = torch hub's "
                                                                   "cache, then timm's files in the Hugging Face cache "
                                                                   "(digits: the shipped classifier)"})
    preprocess: str = choice("repa", ("repa", "lightningdit"), "how the encoder sees the [-1, 1] image: repa = "
                                                               "[0, 1], ImageNet mean/std, bicubic resize (REPA "
                                                               "preprocess_raw_image); lightningdit = as it is, "
                                                               "bilinear resize, no normalisation (LightningDiT "
                                                               "VA-VAE); digits ignores it (ldm.encoders."
                                                               "PREPROCESSING)")
    vf_weight: float = bounded(0.1, min=0.0, help="weight of the VF loss, times the adaptive weight when adaptive")
    margin_cos: float = bounded(0.5, min=0.0, max=2.0, help="m1 of the marginal cosine loss (Eq. 2): relu(1 - m1 - "
                                                            "cos) per position (released model: 0.5)")
    margin_dist: float = bounded(0.25, min=0.0, max=2.0, help="m2 of the marginal distance-matrix loss (Eq. 3): "
                                                              "relu(|cos diff| - m2) per pair (released model: 0.25)")
    distmat_weight: float = bounded(1.0, min=0.0, help="weight of the distance-matrix term within the VF loss")
    cos_weight: float = bounded(1.0, min=0.0, help="weight of the cosine term within the VF loss")
    adaptive: bool = field(default=True, metadata={"help": "scale the VF loss by ||grad L_rec|| / ||grad L_vf|| at "
                                                           "the encoder's last conv (Eq. 4, clamped to [0, 1e8]); "
                                                           "false: vf_weight alone"})


@dataclass
class VqCfg:
    codebook_size: int = bounded(1024, min=1, help="number K of code vectors")
    code_dim: int = bounded(8, min=1, help="dimension of each code = the latent channels a VQ tokenizer gives the "
                                           "generator (LlamaGen: 8)")
    beta: float = bounded(0.25, min=0.0, help="commitment weight of VQ-VAE Eq. 3 (van den Oord et al. 2017: 0.25)")
    l2_norm: bool = field(default=True, metadata={"help": "l2-normalise latents and codes, so the nearest code is the "
                                                          "most cosine-similar (Yu et al. 2022; LlamaGen)"})
    ema: bool = field(default=False, metadata={"help": "update the codebook by moving averages of its assigned "
                                                       "latents (VQ-VAE App. A.1) instead of the codebook loss"})
    ema_decay: float = bounded(0.99, min=0.0, max=1.0, help="decay of the EMA codebook statistics (vq.ema) and of "
                                                            "the per-code usage counts that dead-code restarts read")
    dead_code_threshold: float = bounded(0.0, min=0.0, help="restart a code whose moving-average usage (assignments "
                                                            "per step) falls below this with a random encoder output "
                                                            "of the batch (Jukebox); 0 = never")
    entropy_weight: float = bounded(0.0, min=0.0, help="weight of LlamaGen's entropy loss (mean per-sample code "
                                                       "entropy minus the entropy of the batch-mean code "
                                                       "distribution); 0 = off")
    entropy_temperature: float = bounded(0.01, min=0.0, min_exclusive=True,
                                         help="softmax temperature over -distances in the entropy loss (LlamaGen: "
                                              "0.01)")


@dataclass
class FsqCfg:
    levels: list = listed([8, 5, 5, 5], "FSQ levels L_i, one latent channel each (integers >= 2); codebook size = "
                                        "prod(levels). The paper's (Mentzer et al. 2024, arXiv:2309.15505) "
                                        "recommendation per codebook size: 2^8 [8,6,5], 2^10 [8,5,5,5] (1000 codes), "
                                        "2^12 [7,5,5,5,5], 2^14 [8,8,8,6,5], 2^16 [8,8,8,5,5,5]")


@dataclass
class SigmaVaeCfg:
    enabled: bool = field(default=False, metadata={"help": "sigma-VAE (LatentLM, Sun et al. 2024, arXiv:2412.08635): "
                                                           "the KL tokenizer trains on z = mean + sigma * eps with "
                                                           "sigma ~ N(0, c_sigma^2) drawn per image, not the encoder's "
                                                           "variance, and the KL term keeps only its mean part "
                                                           "kl_weight * 0.5 * sum mean^2; kind=kl only"})
    c_sigma: float = bounded(0.9375, min=0.0, min_exclusive=True,
                             help="C_sigma, the standard deviation of the per-image noise scale sigma (released "
                                  "LatentLM code: std / 0.8 with std = 0.75)")


@dataclass
class LiteVaeCfg:
    # kind=litevae: the encoder is the wavelet network below; tokenizer.block_out_channels, layers_per_block,
    # norm_num_groups, mid_block_attention and attn_levels size its (diffusers) decoder, and the Haar levels are
    # len(block_out_channels) - 1 (3 -> f8). Paper sizes (Sadat et al. 2024, arXiv:2405.14477): S 16 [1,2,2], B 32
    # [1,2,3], M 64 [1,2,4] / aggregator 32 [1,2,3], L 64 [1,2,4], 2 blocks each
    # (ldm.tokenizers.litevae.ENCODER_PRESETS)
    extractor_channels: int = bounded(16, min=1, help="base width C of each wavelet level's feature-extraction UNet "
                                                      "F_l (LiteVAE-S 16, B 32, M and L 64)")
    extractor_mult: list = listed([1, 2, 2], "width multipliers of F_l's levels (widths C * m, the resolution never "
                                             "changes; LiteVAE-S [1,2,2], B [1,2,3], M and L [1,2,4])")
    extractor_blocks: int = bounded(2, min=1, help="ResBlocks per multiplier in F_l, on each side of the UNet")
    feature_channels: int = bounded(12, min=1, help="output channels of each F_l; the aggregator reads levels x this "
                                                    "(the paper: 12, the 4 Haar sub-bands of RGB)")
    aggregator_channels: int = bounded(16, min=1, help="base width of the feature-aggregation UNet F_agg, which maps "
                                                       "the pooled features to the posterior mean and log-variance "
                                                       "(LiteVAE-S 16, B and M 32, L 64)")
    aggregator_mult: list = listed([1, 2, 2], "width multipliers of F_agg (LiteVAE-S [1,2,2], B and M [1,2,3], L "
                                              "[1,2,4])")
    aggregator_blocks: int = bounded(2, min=1, help="ResBlocks per multiplier in F_agg, on each side of the UNet")
    norm_num_groups: int = bounded(8, min=1, help="GroupNorm groups in F_l and F_agg (the paper does not say; 8 "
                                                  "divides every width of its four sizes)")
    smc: bool = field(default=False, metadata={"help": "self-modulated convolutions (the paper's SMC) in the "
                                                       "decoder: every GroupNorm -> SiLU -> conv of its ResNet blocks "
                                                       "and output head becomes SiLU -> a StyleGAN2 modulated + "
                                                       "demodulated conv with a learned per-channel style"})


@dataclass
class DcCfg:
    # widths and latent channels are the shared tokenizer.block_out_channels / tokenizer.latent_channels; every list
    # below holds one value for every stage or one per stage (entry of tokenizer.block_out_channels)
    encoder_block_types: list = listed(["ResBlock"], "DC-AE encoder block per stage: ResBlock (conv-act-conv-norm, "
                                                     "residual) or EfficientViTBlock (ReLU linear attention + GLU "
                                                     "MBConv); dc-ae-f32c32-in-1.0: ResBlock x3, EfficientViTBlock "
                                                     "x3")
    decoder_block_types: list = listed(["ResBlock"], "DC-AE decoder block per stage (choices as "
                                                     "encoder_block_types)")
    encoder_layers_per_block: list = listed([1], "DC-AE encoder blocks per stage; 0 only for the first stage (a "
                                                 "factor-2 space-to-channel input; dc-ae-f32c32-in-1.0: [0, 4, 8, 2, "
                                                 "2, 2])")
    decoder_layers_per_block: list = listed([1], "DC-AE decoder blocks per stage; 0 only for the first stage "
                                                 "(dc-ae-f32c32-in-1.0: [0, 5, 10, 2, 2, 2])")
    decoder_norm_types: list = listed(["rms_norm"], "normalisation in each decoder stage: rms_norm or batch_norm "
                                                    "(dc-ae-*-in-1.0: batch_norm x3 then rms_norm); the encoder "
                                                    "uses rms_norm")
    decoder_act_fns: list = listed(["silu"], "activation of each decoder stage's ResBlocks: silu or relu "
                                             "(dc-ae-*-in-1.0: relu x3 then silu); the encoder uses silu")
    qkv_multiscales: list = listed([], "kernel sizes of the multi-scale query/key/value aggregation in every "
                                       "EfficientViTBlock: [] = none (dc-ae-*-in-1.0, EViT_GLU), [5] = the SANA "
                                       "autoencoder's EViTS5_GLU")
    attention_head_dim: int = bounded(32, min=1, help="channels per linear-attention head of EfficientViTBlocks "
                                                      "(released models: 32); must divide their stages' widths")
    downsample_block_type: str = choice("pixel_unshuffle", ("pixel_unshuffle", "conv"),
                                        "DC-AE downsampling conv path: pixel_unshuffle = 3x3 conv to a quarter of "
                                        "the width, then space-to-channel (dc-ae-*-in-1.0); conv = 3x3 stride-2 "
                                        "conv (SANA's autoencoder); both add the space-to-channel averaging shortcut")
    upsample_block_type: str = choice("pixel_shuffle", ("pixel_shuffle", "interpolate"),
                                      "DC-AE upsampling conv path: pixel_shuffle = 3x3 conv to 4x the width, then "
                                      "channel-to-space (dc-ae-*-in-1.0); interpolate = nearest 2x then 3x3 conv "
                                      "(SANA's autoencoder); both add the channel-duplicating shortcut")


@dataclass
class TokenizerCfg:
    kind: str = choice("kl", TOKENIZER_KINDS, "kl: KL autoencoder (a diffusers AutoencoderKL); vq: VQ autoencoder "
                                              "(diffusers Encoder / Decoder around a vector quantizer); fsq: the "
                                              "same around finite scalar quantization (tokenizer.fsq); litevae: "
                                              "Haar wavelet encoder + diffusers Decoder (tokenizer.litevae); dc: "
                                              "DC-AE, a diffusers AutoencoderDC (tokenizer.dc)")
    pretrained: Optional[str] = field(default=None, metadata={"help": "tokenizer stage: initial weights (and "
                                                                      "architecture) from a diffusers AutoencoderKL "
                                                                      "folder or an ldm tokenizer run; generator "
                                                                      "stage: the frozen tokenizer when "
                                                                      "tokenizer.checkpoint is unset (either may be "
                                                                      "hf://org/name[@rev][/path], ldm.hub)"})
    checkpoint: Optional[str] = field(default=None, metadata={"help": "generator stage: the frozen tokenizer, an ldm "
                                                                      "tokenizer run / checkpoint directory or export "
                                                                      "folder, or an hf:// Hub reference to one; its "
                                                                      "fingerprint is recorded in every generator "
                                                                      "checkpoint"})
    latent_channels: int = bounded(4, min=1, help="KL: latent channels; VQ: encoder output channels before the 1x1 "
                                                  "projection to vq.code_dim (FSQ: to len(fsq.levels)); DC: latent "
                                                  "channels")
    block_out_channels: list = listed([32, 64], "encoder widths per level, full resolution first (the decoder "
                                                "mirrors them; DC: the stage widths); downsampling factor = "
                                                "2**(len-1)")
    layers_per_block: int = bounded(1, min=1, help="ResNet blocks per encoder level (diffusers' decoder has one more "
                                                   "per level)")
    norm_num_groups: int = bounded(32, min=1, help="GroupNorm groups in encoder and decoder; every width must be "
                                                   "divisible by it")
    mid_block_attention: bool = field(default=True, metadata={"help": "self-attention in the middle block of encoder "
                                                                      "and decoder (SD-VAE has it)"})
    use_quant_conv: bool = field(default=True, metadata={"help": "KL: 1x1 convs around the latent (SD-VAE has them, "
                                                                 "FLUX's VAE does not)"})
    attn_levels: list = listed([], "encoder levels (0 = full resolution) whose blocks add self-attention; the decoder "
                                   "mirrors them (LDM attn_resolutions [16] at 256 px with 5 levels = [4])")
    learn_logvar: bool = field(default=False, metadata={"help": "train the NLL log-variance (LDM registers it as a "
                                                                "parameter but never optimises it: False matches)"})
    rec_loss: str = choice("l1", ("l1", "l2"), "pixel reconstruction loss: l1 = |x - x_rec| (taming/LDM), "
                                               "l2 = (x - x_rec)^2")
    perceptual_weight: float = bounded(1.0, min=0.0, help="weight of the LPIPS-VGG distance added to the pixel loss "
                                                          "(0 = off: no VGG weights needed)")
    lpips_weights: Optional[str] = field(default=None, metadata={"help": "torchvision vgg16 state-dict file "
                                                                         "(vgg16-397923af.pth) for LPIPS; null = "
                                                                         "<torch hub dir>/checkpoints/"})
    lpips_random_backbone: bool = field(default=False, metadata={"help": "TESTS/SMOKE RUNS ONLY: LPIPS on a random "
                                                                         "VGG (values meaningless, no file needed)"})
    kl_weight: float = bounded(1e-6, min=0.0, help="KL tokenizer: weight of KL(q(z|x) || N(0, I)), summed over latent "
                                                   "elements (LDM kl-f8: 1e-6)")
    logvar_init: float = field(default=0.0, metadata={"help": "KL tokenizer: initial scalar log-variance of the LDM "
                                                              "NLL, rec / exp(logvar) + logvar (fixed unless "
                                                              "learn_logvar)"})
    disc_start: int = bounded(0, min=0, help="optimizer step from which the GAN losses (generator term and "
                                             "discriminator) are on")
    disc_weight: float = bounded(0.5, min=0.0, help="weight of the GAN term in the autoencoder loss, times the "
                                                    "adaptive weight when disc_adaptive (0 = no GAN term; the "
                                                    "discriminator still trains)")
    disc_adaptive: bool = field(default=True, metadata={"help": "scale the GAN loss by the adaptive weight of Esser "
                                                                "et al. 2021 Eq. 7 (else by disc_weight alone)"})
    disc_loss: str = choice("hinge", ("hinge", "vanilla", "non_saturating"),
                            "GAN losses: hinge (taming/LDM: hinge D loss, G loss -mean D(x_rec)), vanilla (taming/"
                            "LDM: softplus D loss, the same G loss -mean D(x_rec)) or non_saturating (softplus D "
                            "loss and G loss mean softplus(-D(x_rec)), Goodfellow et al. 2014)")
    disc_layers: int = bounded(3, min=1, help="stride-2 convolutions of the PatchGAN discriminator (taming n_layers); "
                                              "images must be at least 3 * 2**disc_layers px")
    disc_filters: int = bounded(64, min=1, help="channels of the discriminator's first conv (doubled per layer, at "
                                                "most 8x)")
    disc_norm: str = choice("batch", ("batch", "act"), "discriminator normalisation: BatchNorm (taming default) or "
                                                       "ActNorm (initialised from the first batch)")
    eq: EqCfg = field(default_factory=EqCfg, metadata={"help": "EQ-VAE regulariser"})
    va: VaCfg = field(default_factory=VaCfg, metadata={"help": "VA-VAE regulariser"})
    vq: VqCfg = field(default_factory=VqCfg, metadata={"help": "vector quantizer (kind=vq)"})
    fsq: FsqCfg = field(default_factory=FsqCfg, metadata={"help": "finite scalar quantizer (kind=fsq)"})
    sigma_vae: SigmaVaeCfg = field(default_factory=SigmaVaeCfg, metadata={"help": "sigma-VAE training of a KL "
                                                                                  "tokenizer (kind=kl)"})
    litevae: LiteVaeCfg = field(default_factory=LiteVaeCfg, metadata={"help": "LiteVAE's wavelet encoder and "
                                                                              "decoder options (kind=litevae)"})
    dc: DcCfg = field(default_factory=DcCfg, metadata={"help": "DC-AE blocks, depths and resampling (kind=dc)"})
    train_only: list[str] = listed([], "tokenizer and end_to_end stages: names (or name prefixes, e.g. "
                                       "decoder.up_blocks.0) of the autoencoder's parameters that train; every other "
                                       "autoencoder weight stays fixed (BatchNorm statistics still update); [] = all. "
                                       "DC-AE's decoupled high-resolution adaptation trains subsets this way "
                                       "(configs/tokenizer/tiny_dc_f8_*.yaml, docs/tokenizers.md)")
    stats_num_images: int = bounded(1024, min=1, help="the first N images of data.source give the latent per-channel "
                                                      "mean / std: after tokenizer training in `ldm pipeline`, and at "
                                                      "generator start when the tokenizer has none stored")


@dataclass
class TextCfg:
    encoder: Optional[str] = field(default=None, metadata={"help": "text-to-image: a frozen transformers text encoder "
                                                                   "(CLIP text or T5 encoder), a local folder or a "
                                                                   "Hub id already in the local cache (never "
                                                                   "downloaded); the DiT then cross-attends to its "
                                                                   "caption tokens (PixArt-alpha; model.arch=unet: "
                                                                   "diffusers' UNet2DConditionModel; docs/"
                                                                   "conditioning.md); null = no text conditioning "
                                                                   "(unless text.embeddings)"})
    captions: str = field(default="auto", metadata={"help": "where the captions come from: auto = the digits' "
                                                            "templated captions, a folder's captions.jsonl, else "
                                                            "<image>.txt / <image>.json sidecar files; or a .jsonl "
                                                            "manifest path ({\"file\"|\"index\", \"caption\"} per "
                                                            "line)"})
    max_tokens: int = bounded(77, min=1, help="caption tokens: captions are padded / truncated to this many (CLIP: "
                                              "77 at most; PixArt-alpha's T5: 120)")
    use_pooled: bool = field(default=True, metadata={"help": "add the pooled caption embedding (CLIP's pooled "
                                                             "output, T5's mean token) to the adaLN condition, as "
                                                             "SD3; false = cross-attention only, as PixArt-alpha"})
    cache: Optional[str] = field(default=None, metadata={"help": "caption-embedding cache directory (refused when "
                                                                 "another encoder made it); null = <data.latents>/"
                                                                 "captions with a latent cache, else the embeddings "
                                                                 "are computed in memory at start"})
    cache_dtype: str = choice("float32", ("float32", "float16"), "dtype of the cached caption embeddings (float16 "
                                                                 "halves the disk of T5-XXL's 4096-wide tokens)")
    batch_size: int = bounded(64, min=1, help="captions per text-encoder call when the embeddings are computed")
    embeddings: Optional[str] = field(default=None, metadata={"help": "precomputed caption embeddings instead of "
                                                                      "text.encoder: 'sidecar' (<image>.npy / .npz "
                                                                      "beside every image of a folder) or a .npy / "
                                                                      ".npz with one row per image; (D,) pooled or "
                                                                      "(L, D) per-token (docs/conditioning.md); null "
                                                                      "= none"})


@dataclass
class ModelCfg:
    arch: str = choice("dit", ("dit", "unet"), "generator network: dit (DiT / LightningDiT presets) or unet (diffusers "
                                               "UNet2DModel adapter, sized by unet_*)")
    preset: str = field(default="DiT-S/2", metadata={"help": "DiT preset name (model.arch=dit; ldm.names."
                                                             "DIT_PRESET_NAMES = ldm.models.dit.DIT_PRESETS)"})
    learn_sigma: bool = field(default=False, metadata={"help": "DiT's learned variance: 2C output channels trained "
                                                               "with L_simple + L_vlb (Nichol & Dhariwal 2021); needs "
                                                               "a ddpm_* path; the ddpm sampler then uses it"})
    class_dropout: float = bounded(0.1, min=0.0, max=1.0, help="probability of replacing a training label by the "
                                                               "null class, for classifier-free guidance (DiT: 0.1); "
                                                               "text models (text.encoder): the caption by the "
                                                               "learned null caption (PixArt-alpha: 0.1)")
    use_swiglu: bool = field(default=False, metadata={"help": "SwiGLU feed-forward instead of the GELU MLP "
                                                              "(LightningDiT); given to every preset, so "
                                                              "LightningDiT-* presets need true here"})
    use_rmsnorm: bool = field(default=False, metadata={"help": "RMSNorm instead of LayerNorm in the blocks, final "
                                                               "layer and QK-norm (LightningDiT); given to every "
                                                               "preset, as use_swiglu"})
    use_rope: bool = field(default=False, metadata={"help": "2-D rotary embedding of queries and keys on top of the "
                                                            "sin-cos position embedding (LightningDiT); given to "
                                                            "every preset, as use_swiglu"})
    use_qknorm: bool = field(default=False, metadata={"help": "normalise queries and keys per head before attention "
                                                              "(stabilises training; LightningDiT's recipe: off)"})
    attention: str = choice("sdpa", ("sdpa", "xformers", "math"),
                            "DiT attention kernel, the same maths: sdpa (torch scaled_dot_product_attention, picks "
                            "flash / memory-efficient kernels where it can), xformers (memory_efficient_attention; "
                            "optional extra: pip install 'ldm[xformers]'), math (softmax(Q K^T / sqrt(d)) V in plain "
                            "torch ops, a reference)")
    grad_checkpointing: bool = field(default=False, metadata={"help": "DiT: recompute each block in the backward pass "
                                                                      "instead of storing its activations (less "
                                                                      "memory, more compute, same gradients)"})
    unet_block_out_channels: list = listed([64, 128], "model.arch=unet: widths per resolution level (levels after the "
                                                      "first add self-attention)")
    unet_layers_per_block: int = bounded(2, min=1, help="model.arch=unet: ResNet blocks per resolution level")


@dataclass
class LplCfg:
    enabled: bool = field(default=False, metadata={"help": "latent perceptual loss (Berrada et al. 2025, arXiv:"
                                                           "2411.04873): distance between the frozen decoder's "
                                                           "features of the true clean latent and of the model's "
                                                           "estimate of it (docs/generators.md)"})
    weight: float = bounded(1.0, min=0.0, help="w_LPL in L = L_diffusion + w_LPL L_LPL (the authors' reference code: "
                                               "1.0)")
    blocks: list = listed([], "decoder feature blocks: 0 = mid block, b = up block b-1 (SD-VAE: 0 .. 4); [] = all of "
                              "them (the reference's mid block + 4 up blocks on SD-VAE)")
    block_weights: list = listed([], "one weight per entry of blocks; [] = the inverse of each block's upscaling over "
                                     "the mid block (the reference's 2^-min(l, 3) on SD-VAE)")
    snr_min: float = bounded(3.0, min=0.0, help="apply the loss only to samples with SNR(t) = (alpha / sigma)^2 >= "
                                                "snr_min (the reference's timesteps < 200 of SD's 1000-step "
                                                "schedule: SNR >= 3.09)")
    start_step: int = bounded(0, min=0, help="optimizer step from which the loss is on (the reference's lpl_start; "
                                             "0 = from the start)")
    outlier_mask: bool = field(default=True, metadata={"help": "mask the target features' outliers (2 %/98 % "
                                                               "quantiles +- 2 std, morphological clean-up) on maps at "
                                                               "1/2 of the output resolution or finer"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block in the backward "
                                                                      "pass (less memory, more compute, same "
                                                                      "gradients)"})


@dataclass
class PixelLossCfg:
    enabled: bool = field(default=False, metadata={"help": "pixel-space objective (Zhang et al. 2024, arXiv:"
                                                           "2409.17565, supervised variant): decode the model's clean-"
                                                           "latent estimate with the frozen decoder and compare it "
                                                           "with the target image; usually with train.init_from "
                                                           "(post-training)"})
    weight: float = bounded(1.0, min=0.0, help="lambda in L = L_latent + lambda L_pixel")
    distance: str = choice("l2", ("l2", "l1"), "per-pixel distance: l2 = squared error (the paper's), l1 = absolute "
                                               "error; mean over channels and pixels")
    target: str = choice("image", ("image", "decoded"), "image: the training image x (needs images, data.latents "
                                                        "unset); decoded: the tokenizer's reconstruction D(z_0) of the "
                                                        "true latent (works with a latent cache)")
    t_min: float = bounded(0.0, min=0.0, max=1.0, help="the loss applies to samples with t_min <= t <= t_max (t=0 "
                                                       "data, t=1 noise)")
    t_max: float = bounded(1.0, min=0.0, max=1.0, help="upper end of the time range (see t_min)")
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block in the backward "
                                                                      "pass (less memory, more compute, same "
                                                                      "gradients)"})


@dataclass
class DiffusionCfg:
    path: str = choice("linear", ("linear", "gvp", "vp", "ddpm_linear", "ddpm_cosine"),
                       "noising path x_t = alpha(t) x0 + sigma(t) eps, t=0 data, t=1 noise: linear (flow matching, "
                       "alpha = 1 - t, sigma = t), gvp (cos / sin), vp (SiT's VP SDE), ddpm_linear / ddpm_cosine "
                       "(T = 1000 DDPM betas, Ho et al. 2020 / Nichol & Dhariwal 2021)")
    prediction: str = choice("velocity", ("velocity", "eps", "v", "x0"),
                             "network output: velocity d x_t / dt (flow matching), eps (the noise), v = alpha eps - "
                             "sigma x0 (Salimans & Ho 2022) or x0 (the data)")
    t_sampler: str = choice("uniform", ("uniform", "logit_normal"),
                            "training times on continuous paths: uniform U(0, 1) or logit_normal sigmoid(N(t_mean, "
                            "t_std^2)) (SD3); ddpm_* paths draw their discrete steps uniformly instead")
    t_mean: float = field(default=0.0, metadata={"help": "mean of the logit-normal (t_sampler=logit_normal) in ldm "
                                                         "time; a SiT / LightningDiT mean m is -m here"})
    t_std: float = bounded(1.0, min=0.0, min_exclusive=True, help="std of the logit-normal (t_sampler=logit_normal)")
    t_shift: float = bounded(1.0, min=0.0, min_exclusive=True, help="training times t' = s t / (1 + (s-1) t) (SD3 Eq. "
                                                                    "23; s > 1 favours noise; 1 = off, required on "
                                                                    "ddpm_* paths)")
    weighting: str = choice("none", ("none", "min_snr"), "per-sample loss weight: none, or min_snr = min(SNR, gamma) "
                                                         "in x0 units converted to the prediction (Hang et al. 2023)")
    min_snr_gamma: float = bounded(5.0, min=0.0, min_exclusive=True, help="gamma of weighting=min_snr (paper: 5)")
    cos_loss_weight: float = bounded(0.0, min=0.0, help="weight of LightningDiT's velocity-direction loss 1 - "
                                                        "cos(output, target) over channels, added to the MSE (their "
                                                        "recipe: 1; 0 = off)")
    latent_norm: str = choice("channel", ("channel", "scalar", "none"),
                              "latent normalisation: per-channel mean/std, scalar scaling factor, or none; the "
                              "statistics are stored in every generator checkpoint")
    scaling_factor: Optional[float] = field(default=None, metadata={"help": "latent_norm=scalar: z * factor (SD-VAE: "
                                                                            "0.18215); null = the tokenizer's own"})
    repa: bool = field(default=False, metadata={"help": "REPA (Yu et al. 2024, arXiv:2410.06940): align the DiT's "
                                                        "hidden tokens after block repa_depth with a frozen encoder's "
                                                        "patch features; needs model.arch=dit and images "
                                                        "(data.latents unset)"})
    repa_encoder: str = choice("dinov2_vitb14", ENCODER_NAMES, "frozen vision encoder REPA aligns to (as "
                                                              "tokenizer.va.encoder)")
    repa_weights: Optional[str] = field(default=None, metadata={"help": "weights file of REPA's encoder; null = torch "
                                                                        "hub's cache, then the Hugging Face cache"})
    repa_depth: int = bounded(8, min=1, help="1-based index of the DiT block whose output is aligned (REPA: 8)")
    repa_weight: float = bounded(0.5, min=0.0, help="lambda in L = L_diffusion + lambda L_REPA (REPA: 0.5)")
    repa_proj_dim: int = bounded(2048, min=1, help="hidden width of REPA's 3-layer MLP projector (REPA: 2048)")
    lpl: LplCfg = field(default_factory=LplCfg, metadata={"help": "latent perceptual loss through the frozen decoder"})
    pixel_loss: PixelLossCfg = field(default_factory=PixelLossCfg, metadata={"help": "pixel-space loss through the "
                                                                                     "frozen decoder"})


@dataclass
class E2eCfg:
    """stage=end_to_end (REPA-E, Leng et al. 2025, arXiv:2504.10483; ldm/train/end_to_end_task.py): the tokenizer,
    its discriminator and the generator trained together. The generator's lr is optim.lr and its alignment weight
    diffusion.repa_weight; all three optimizers use optim.betas / eps / weight_decay and optim.grad_clip."""

    tokenizer_lr: Optional[float] = field(default=None, metadata={"help": "end_to_end: learning rate of the "
                                                                          "tokenizer's optimizer (REPA-E "
                                                                          "--vae-learning-rate 1e-4); null = optim.lr"})
    disc_lr: Optional[float] = field(default=None, metadata={"help": "end_to_end: learning rate of the discriminator's "
                                                                     "optimizer (REPA-E --disc-learning-rate 1e-4); "
                                                                     "null = optim.lr"})
    tokenizer_align_weight: float = bounded(1.5, min=0.0, help="end_to_end: weight of the REPA alignment loss, "
                                                               "computed through the frozen generator, in the "
                                                               "tokenizer's loss (REPA-E --vae-align-proj-coeff 1.5)")
    bn_momentum: float = bounded(0.1, min=0.0, max=1.0, help="end_to_end: momentum of the generator's latent "
                                                             "batch-norm running statistics (REPA-E --bn-momentum "
                                                             "0.1; eps is REPA-E's 1e-4)")


@dataclass
class SampleCfg:
    sampler: str = choice("euler", SAMPLER_NAMES, "sampler (ldm.diffusion.samplers.SAMPLERS); the options each one "
                                                  "reads: samplers.SAMPLER_OPTIONS")
    steps: int = bounded(50, min=1, help="steps n of the time grid (network calls: euler n, heun 2n - 1); ddpm_* "
                                         "paths: DiT's respacing of their 1000 training steps")
    cfg_scale: float = bounded(1.0, min=0.0, help="classifier-free guidance scale w: uncond + w (cond - uncond) "
                                                  "(1 = off)")
    interval: list = listed([0.0, 1.0], "guidance on for t in [lo, hi] (t=0 data, t=1 noise)")
    cfg_channels: str = choice("all", ("all", "first3"), "guided output channels: all, or first3 = channels 0-2 "
                                                         "only (the DiT / SiT / LightningDiT quirk, to reproduce "
                                                         "their numbers)")
    guidance_rule: str = choice("per_eval", ("per_eval", "step_start"),
                                "which time is checked against sample.interval: per_eval = the time of each network "
                                "evaluation; step_start = the start of the sampler step it belongs to, so Heun's "
                                "corrector is guided as its step's start is (REPA's Heun); the same for samplers "
                                "with one evaluation per step")
    time_grid: str = choice("uniform", ("uniform", "karras", "shifted"),
                            "continuous paths: uniform in t, karras (EDM sigmas 0.002 .. 80, rho 7) or shifted "
                            "(uniform through t' = s t / (1 + (s-1) t), s = sample.shift); euler_maruyama + uniform "
                            "uses SiT's SDE grid; ddpm_* paths always respace")
    shift: float = bounded(1.0, min=0.0, min_exclusive=True, help="s of time_grid=shifted (LightningDiT's timestep "
                                                                  "shift s_L is 1 / s_L here)")
    eta: float = bounded(0.0, min=0.0, help="sampler=ddim: 0 = deterministic DDIM, 1 = DDPM's ancestral noise")
    num: int = bounded(64, min=1, help="images `ldm sample` writes")
    batch_size: int = bounded(32, min=1, help="images per forward pass per process when sampling (the images do not "
                                              "depend on it)")
    seed: int = field(default=0, metadata={"help": "sampling seed: image i's noise comes from a generator keyed by "
                                                   "(seed, i); training grids use seed, periodic FID seed + 1"})
    use_ema: bool = field(default=True, metadata={"help": "`ldm sample`: false = the raw weights (--no-ema); a run's "
                                                          "stored value is not read (sampling defaults to EMA)"})
    precision: str = choice("auto", ("auto", "fp32", "bf16"),
                            "autocast precision of the generator network and the tokenizer's decoder when sampling "
                            "(`ldm sample`, training grids, periodic FID): auto = bf16 on CUDA and on CPUs with native "
                            "bf16 matmul, fp32 elsewhere (as train.mixed_precision=auto; the log says which and why); "
                            "the sampler's state and FID's feature extractor stay fp32")


# SampleCfg fields left out of a sample folder's identity (ldm.eval.generate.sample_identity records every other
# field), so one folder never mixes images of two settings. num and batch_size change how many images are made and how
# fast, not which; seed, use_ema and precision do decide the images, but the identity records the values actually used
# (a seed given on the command line, whether the checkpoint had EMA weights, what precision=auto resolved to on this
# device) under its own keys, not the config's.
SAMPLE_NON_IDENTITY_FIELDS: tuple[str, ...] = ("num", "batch_size", "seed", "use_ema", "precision")


@dataclass
class EvalCfg:
    extractor: str = choice("inception", EXTRACTOR_NAMES, "feature extractor for FID "
                                                          "(ldm.eval.extractors.EXTRACTORS)")
    inception_weights: Optional[str] = field(default=None, metadata={"help": "FID Inception-v3 weights file "
                                                                             "(pytorch-fid's or torch-fidelity's); "
                                                                             "null = $LDM_INCEPTION_WEIGHTS, then "
                                                                             "torch hub's cache"})
    num_samples: int = bounded(1000, min=2, help="images generated for each periodic FID (train.eval_every)")
    batch_size: int = bounded(64, min=1, help="images per generation and feature batch in periodic FID")
    reference: Optional[str] = field(default=None, metadata={"help": "FID reference: statistics .npz, ADM reference "
                                                                     "batch or images (folder, archive, .npz, "
                                                                     "digits); null = data.source"})


@dataclass
class RunConfig:
    name: str = field(default="run", metadata={"help": "run name: the run directory is <train.run_root>/<name>/"})
    stage: str = choice("generator", ("tokenizer", "generator", "end_to_end"),
                        "which model this run trains: tokenizer, generator, or end_to_end (tokenizer + "
                        "discriminator + generator together, REPA-E; section e2e)")
    seed: int = field(default=0, metadata={"help": "training seed: initial weights, data order, crops / flips and "
                                                   "every step's noise derive from it (with rank and step)"})
    data: DataCfg = field(default_factory=DataCfg, metadata={"help": "training images (or latent cache)"})
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg, metadata={"help": "the tokenizer: trained (stage="
                                                                                    "tokenizer) or frozen"})
    model: ModelCfg = field(default_factory=ModelCfg, metadata={"help": "the generator network"})
    text: TextCfg = field(default_factory=TextCfg, metadata={"help": "text conditioning of the generator: captions, "
                                                                     "the frozen text encoder, the embedding cache"})
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg, metadata={"help": "the generator's training "
                                                                                    "objective"})
    optim: OptimCfg = field(default_factory=OptimCfg, metadata={"help": "optimizers and lr schedule"})
    e2e: E2eCfg = field(default_factory=E2eCfg, metadata={"help": "stage=end_to_end: REPA-E's joint tuning"})
    train: TrainCfg = field(default_factory=TrainCfg, metadata={"help": "the training loop"})
    eval: EvalCfg = field(default_factory=EvalCfg, metadata={"help": "periodic evaluation during training"})
    sample: SampleCfg = field(default_factory=SampleCfg, metadata={"help": "sampling: training grids, periodic FID, "
                                                                           "`ldm sample` defaults"})

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_root) / self.name


PIPELINE_STAGES = ("tokenizer", "latents", "generator", "sample", "eval")


@dataclass
class PipelineCfg:
    """`ldm pipeline`: the stages of a whole experiment under <run_root>/<name>/ (tokenizer/, latents/, generator/,
    samples/, eval.json, summary.json). `tokenizer` and `generator` are complete run configs of their stages."""

    name: str = field(default="pipeline", metadata={"help": "pipeline name: everything is written under "
                                                            "<run_root>/<name>/"})
    run_root: str = field(default="runs", metadata={"help": "directory that holds pipeline directories"})
    stages: list = listed(list(PIPELINE_STAGES), "stages to run, in this order")
    tokenizer: RunConfig = field(default_factory=lambda: RunConfig(stage="tokenizer"),
                                 metadata={"help": "the tokenizer stage's run config (the pipeline sets its name, "
                                                   "train.run_root and stage=tokenizer, unless it says stage="
                                                   "end_to_end: REPA-E's joint run, whose tuned tokenizer the later "
                                                   "stages use)"})
    generator: RunConfig = field(default_factory=RunConfig,
                                 metadata={"help": "the generator stage's run config (the pipeline sets its name, "
                                                   "stage, train.run_root, tokenizer.checkpoint and data.latents)"})
    latent_flips: bool = field(default=False, metadata={"help": "cache horizontally flipped latents too (the "
                                                                "generator then trains on both)"})
    num_samples: int = bounded(1000, min=1, help="images sampled for the FID stage")
    grid_per_class: int = bounded(10, min=1, help="grid rows: samples per class in the class-conditional grid")
    fid_extractors: list = listed(["digits", "inception"], "feature spaces for the FID stage; 'inception' is "
                                                           "skipped with a note when its weights are not installed")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


# ----------------------------------------------------------------------------------------------------------- walking
def _section_default(f: dataclasses.Field) -> Any:
    """The default instance of a nested section field (e.g. RunConfig.train -> TrainCfg()), else None."""
    sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return sub if dataclasses.is_dataclass(sub) else None


def _all_keys(schema: type, prefix: str):
    for f in dataclasses.fields(schema):
        sub = _section_default(f)
        if sub is not None:
            yield from _all_keys(type(sub), f"{prefix}{f.name}.")
        else:
            yield prefix, f.name
