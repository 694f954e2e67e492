"""VQ tokenizer: a nearest-neighbour vector quantizer between diffusers' Encoder and Decoder.

van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937):
* quantisation z_q = e_k, k = argmin_j ||z - e_j||^2, with the straight-through estimator z + sg[z_q - z] (Eq. 1-3);
* loss Eq. (3): ||sg[z] - e||^2 (codebook) + beta ||z - sg[e]||^2 (commitment), beta = 0.25; taming's
  VectorQuantizer2 / LlamaGen vq_model.py VectorQuantizer use per-element means, as here;
* or EMA codebook updates, Appendix A.1 Eqs. (6)-(8): N_i <- g N_i + (1-g) n_i, m_i <- g m_i + (1-g) sum_{j: k_j=i} z_j,
  e_i = m_i / N_i, with the Laplace smoothing of Sonnet's VectorQuantizerEMA, N_i <- (N_i + eps) / (N + K eps) * N
  (then there is no codebook loss, only the commitment term).
Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN" (arXiv:2110.04627) §3.2 and LlamaGen
(Sun et al. 2024, arXiv:2406.06525; FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py): l2-normalised,
low-dimensional codes (16384 x 8), nearest neighbour = cosine similarity; the optional entropy loss of
compute_entropy_loss (per-sample entropy minus the entropy of the batch-averaged code distribution, softmax of
-distance / 0.01). Dead codes are restarted as in Jukebox (Dhariwal et al. 2020, arXiv:2005.00341, §2.2 "random
restarts"): a code whose EMA usage (per-step assignment count, decay `ema_decay`) falls below `dead_code_threshold` is
replaced by a random encoder output of the current batch.

Under torch.distributed, assignment counts and EMA statistics are summed over processes and restart vectors come from
rank 0, so every process keeps the same codebook.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from safetensors.torch import load_file
from torch import nn

from ldm.io import atomic_write_text, save_tensors
from ldm.tokenizers.base import Encoded, TokenizerKind, load_strict
from ldm.tokenizers.kl import block_types


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor            # (B, C, h, w) quantised latent, straight-through gradient to the encoder
    indices: torch.Tensor        # (B, h, w) code indices
    codebook_loss: torch.Tensor  # (B,) ||sg[z] - z_q||^2 mean (zero with EMA updates)
    commit_loss: torch.Tensor    # (B,) beta * ||z - sg[z_q]||^2 mean
    entropy_loss: torch.Tensor   # () entropy_weight * (sample entropy - batch entropy)
    perplexity: torch.Tensor     # () exp(entropy of the batch code histogram)
    usage: torch.Tensor          # () fraction of codes used in the batch


# ----------------------------------------------------------------------------------------------------------- maths
def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """||z_n - e_k||^2 = ||z_n||^2 + ||e_k||^2 - 2 z_n.e_k for z (N, D), codebook (K, D) -> (N, K)."""
    return z.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2.0 * z @ codebook.t()


def codebook_losses(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ-VAE Eq. (3) per sample: (mean (z_q - sg[z])^2, beta * mean (sg[z_q] - z)^2), each (B,)."""
    codebook = (z_q - z.detach()).square().flatten(1).mean(1)
    commit = beta * (z_q.detach() - z).square().flatten(1).mean(1)
    return codebook, commit


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """LlamaGen compute_entropy_loss: mean_n H(p_n) - H(mean_n p_n), p_n = softmax(affinity_n / T); affinity (N, K)."""
    logits = affinity / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    return sample_entropy - avg_entropy


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Assignment counts n_k, (K,) float."""
    return torch.bincount(indices.flatten(), minlength=codebook_size).float()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum_k p_k log p_k) of the code histogram (taming VectorQuantizer)."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
                        decay: float, eps: float = 1e-5, counts: torch.Tensor | None = None,
                        sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step (VQ-VAE App. A.1 Eqs. 6-8 + Laplace smoothing); returns (cluster_size, embed_sum, codebook).

    z (N, D) encoder outputs, indices (N,) their codes. `counts` / `sums` override the batch statistics (the
    quantizer passes all-reduced ones under torch.distributed).
    """
    k = cluster_size.shape[0]
    if counts is None:
        counts = code_histogram(indices, k)
    if sums is None:
        sums = torch.zeros_like(embed_sum).index_add_(0, indices.flatten(), z.to(embed_sum.dtype))
    cluster_size = decay * cluster_size + (1.0 - decay) * counts  # Eq. (6)
    embed_sum = decay * embed_sum + (1.0 - decay) * sums  # Eq. (7)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed.unsqueeze(1)  # Eq. (8)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------------------------------------- quantizer
class VectorQuantizer(nn.Module):
    """Codebook (K, D) + nearest-neighbour lookup; training updates happen in forward when `self.training`."""

    def __init__(self, *, codebook_size: int, code_dim: int, beta: float = 0.25, l2_norm: bool = True,
                 use_ema: bool = False, ema_decay: float = 0.99, dead_code_threshold: float = 0.0,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01, eps: float = 1e-5):
        super().__init__()
        if codebook_size < 1 or code_dim < 1:
            raise ValueError(f"codebook_size={codebook_size} and code_dim={code_dim} must both be >= 1")
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.l2_norm, self.use_ema, self.ema_decay, self.eps = l2_norm, use_ema, ema_decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        init = torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            init = F.normalize(init, dim=1)
        if use_ema:  # updated by EMA statistics, not by gradients
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", torch.zeros(codebook_size))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(codebook_size))  # EMA of per-step assignment counts
        self.register_buffer("usage_initialized", torch.tensor(False))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.l2_norm else self.codebook

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices (B, h, w) -> (B, D, h, w)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"code indices must be integers, got {indices.dtype}")
        return self.normalized_codebook()[indices].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, c, h, w = z.shape
        if c != self.code_dim:
            raise ValueError(f"quantizer expects {self.code_dim} channels, got {c}")
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, c)  # (N, D)
        codebook = self.normalized_codebook()  # (K, D)
        dist2 = squared_distances(flat, codebook)  # (N, K)
        indices = dist2.argmin(1)  # (N,)
        z_q = codebook[indices].view_as(z)  # (B, h, w, D)
        codebook_loss, commit_loss = codebook_losses(z.reshape(b, -1), z_q.reshape(b, -1), self.beta)
        if self.use_ema:
            codebook_loss = torch.zeros_like(codebook_loss)
        ent = (self.entropy_weight * entropy_loss(-dist2, self.entropy_temperature) if self.entropy_weight > 0
               else dist2.new_zeros(()))
        counts = code_histogram(indices, self.codebook_size)
        if self.training:
            self._train_updates(flat.detach(), indices, counts)
        z_q = z + (z_q - z).detach()  # straight-through estimator (VQ-VAE §3.1)
        return QuantizerOutput(z_q.permute(0, 3, 1, 2), indices.view(b, h, w), codebook_loss, commit_loss, ent,
                               perplexity(counts).detach(), ((counts > 0).float().mean()).detach())

    @torch.no_grad()
    def _train_updates(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.clone()
        n_vectors = torch.tensor(float(flat.shape[0]), device=flat.device)
        sums = None
        if self.use_ema:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat.to(self.ema_embed_sum.dtype))
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(n_vectors)
            if sums is not None:
                dist.all_reduce(sums)
        if self.use_ema:
            size, emb_sum, book = ema_codebook_update(self.ema_cluster_size, self.ema_embed_sum, flat, indices,
                                                      self.ema_decay, self.eps, counts=counts, sums=sums)
            self.ema_cluster_size.copy_(size)
            self.ema_embed_sum.copy_(emb_sum)
            self.codebook.copy_(book)
        expected = n_vectors / self.codebook_size  # a fresh code starts at the uniform per-step count
        if not bool(self.usage_initialized):
            self.usage.fill_(float(expected))
            self.usage_initialized.fill_(True)
        self.usage.mul_(self.ema_decay).add_((1.0 - self.ema_decay) * counts)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat, float(expected))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, expected: float) -> None:
        dead = self.usage < self.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)  # global RNG: reseeded every step
        new = flat[pick].to(self.codebook.dtype)  # (n_dead, D)
        if _distributed():
            dist.broadcast(new, src=0)
        self.codebook.data[dead] = new
        self.usage[dead] = expected
        if self.use_ema:
            self.ema_cluster_size[dead] = expected
            self.ema_embed_sum[dead] = new * expected


# ----------------------------------------------------------------------------------------------------------- model
def diffusers_encoder(*, in_channels: int, z_channels: int, block_out_channels: list[int], layers_per_block: int,
                      norm_num_groups: int, mid_block_attention: bool, attn_levels: list[int]) -> Encoder:
    """diffusers' VAE Encoder with a single (not doubled) z_channels output, attention at `attn_levels` (LDM's
    attn_resolutions); shared by the discrete kinds (vq, fsq)."""
    down, _ = block_types(len(block_out_channels), attn_levels)
    return Encoder(in_channels=in_channels, out_channels=z_channels, down_block_types=down,
                   block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                   norm_num_groups=norm_num_groups, double_z=False, mid_block_add_attention=mid_block_attention)


def diffusers_decoder(*, z_channels: int, out_channels: int, block_out_channels: list[int], layers_per_block: int,
                      norm_num_groups: int, mid_block_attention: bool, attn_levels: list[int]) -> Decoder:
    """diffusers' VAE Decoder mirroring `diffusers_encoder` (built separately so that each model keeps its order
    of random initialisation: encoder, its own layers, decoder)."""
    _, up = block_types(len(block_out_channels), attn_levels)
    return Decoder(in_channels=z_channels, out_channels=out_channels, up_block_types=up,
                   block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                   norm_num_groups=norm_num_groups, mid_block_add_attention=mid_block_attention)


class VQAutoencoder(nn.Module):
    """diffusers Encoder -> 1x1 conv to code_dim -> VectorQuantizer -> 1x1 conv -> diffusers Decoder."""

    def __init__(self, *, block_out_channels: list[int], layers_per_block: int = 2, norm_num_groups: int = 32,
                 mid_block_attention: bool = True, attn_levels: list[int] = (), z_channels: int = 256,
                 codebook_size: int = 16384, code_dim: int = 8, beta: float = 0.25, l2_norm: bool = True,
                 use_ema: bool = False, ema_decay: float = 0.99, dead_code_threshold: float = 0.0,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01, in_channels: int = 3):
        super().__init__()
        self.config = dict(block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           norm_num_groups=norm_num_groups, mid_block_attention=mid_block_attention,
                           attn_levels=list(attn_levels), z_channels=z_channels, codebook_size=codebook_size,
                           code_dim=code_dim, beta=beta, l2_norm=l2_norm, use_ema=use_ema, ema_decay=ema_decay,
                           dead_code_threshold=dead_code_threshold, entropy_weight=entropy_weight,
                           entropy_temperature=entropy_temperature, in_channels=in_channels)
        conv = {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
                "norm_num_groups": norm_num_groups, "mid_block_attention": mid_block_attention,
                "attn_levels": attn_levels}
        self.encoder = diffusers_encoder(in_channels=in_channels, z_channels=z_channels, **conv)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.quantizer = VectorQuantizer(codebook_size=codebook_size, code_dim=code_dim, beta=beta, l2_norm=l2_norm,
                                         use_ema=use_ema, ema_decay=ema_decay, dead_code_threshold=dead_code_threshold,
                                         entropy_weight=entropy_weight, entropy_temperature=entropy_temperature)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.decoder = diffusers_decoder(z_channels=z_channels, out_channels=in_channels, **conv)
        self.downsample = 2 ** (len(block_out_channels) - 1)
        self.latent_channels = code_dim

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Images (B, 3, H, W) in [-1, 1] -> quantised latents (B, code_dim, h, w) and indices (B, h, w)."""
        h = self.quant_conv(self.encoder(x))  # (B, code_dim, h, w)
        return self.quantizer(h)

    def decode(self, z_or_indices: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, code_dim, h, w) or code indices (B, h, w) -> images (B, 3, H, W)."""
        if z_or_indices.dim() == 3:
            z_or_indices = self.quantizer.lookup(z_or_indices)  # (B, code_dim, h, w)
        elif z_or_indices.dim() != 4:
            raise ValueError(f"decode expects latents (B, C, h, w) or indices (B, h, w), got {tuple(z_or_indices.shape)}")
        return self.decoder(self.post_quant_conv(z_or_indices))  # (B, 3, H, W)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.encode(x)
        return self.decode(q.z_q), q


# buffers that only steer training (usage counts for restarts, EMA codebook statistics): not exported or fingerprinted
VQ_TRAINING_BUFFERS = ("quantizer.usage", "quantizer.usage_initialized", "quantizer.ema_cluster_size",
                       "quantizer.ema_embed_sum")
VQ_CONFIG_FILE = "vq_config.json"
VQ_WEIGHTS_FILE = "vq_model.safetensors"


class VQKind(TokenizerKind):
    """`tokenizer.kind: vq`: the VQAutoencoder above; its own loss term is codebook + commitment (+ entropy)."""

    name, family, module_type = "vq", "quantised", VQAutoencoder

    def build(self, cfg, image_size: int) -> nn.Module:
        q = cfg.vq
        return VQAutoencoder(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                             norm_num_groups=cfg.norm_num_groups, mid_block_attention=cfg.mid_block_attention,
                             attn_levels=cfg.attn_levels, z_channels=cfg.latent_channels,
                             codebook_size=q.codebook_size, code_dim=q.code_dim, beta=q.beta, l2_norm=q.l2_norm,
                             use_ema=q.ema, ema_decay=q.ema_decay, dead_code_threshold=q.dead_code_threshold,
                             entropy_weight=q.entropy_weight, entropy_temperature=q.entropy_temperature)

    def training_buffers(self) -> tuple[str, ...]:
        return VQ_TRAINING_BUFFERS

    def configured_latent_channels(self, cfg) -> tuple[str, int, int]:
        return "tokenizer.vq.code_dim", cfg.vq.code_dim, cfg.vq.code_dim

    def encode_train(self, model, x, *, cfg, draws) -> Encoded:
        q = model.encode(x)
        loss = (q.codebook_loss + q.commit_loss).mean() + q.entropy_loss
        return Encoded(q.z_q, loss, {"loss_codebook": q.codebook_loss.mean(), "loss_commit": q.commit_loss.mean(),
                                     "loss_entropy": q.entropy_loss, "vq_perplexity": q.perplexity,
                                     "vq_usage": q.usage})  # z_q is straight-through

    def encode(self, model, x, *, sample=False, generator=None) -> torch.Tensor:
        return model.encode(x).z_q

    def indices(self, model, x) -> torch.Tensor:
        return model.encode(x).indices

    def codebook_size(self, model) -> int:
        return int(model.config["codebook_size"])

    def is_folder(self, folder) -> bool:
        return (folder / VQ_CONFIG_FILE).is_file()

    def save_folder(self, model, out_dir, *, stats, scaling_factor) -> None:
        """`vq_model.safetensors` (inference tensors) + `vq_config.json` (the constructor arguments)."""
        save_tensors(out_dir / VQ_WEIGHTS_FILE,
                     {k: v for k, v in model.state_dict().items() if k not in VQ_TRAINING_BUFFERS})
        atomic_write_text(out_dir / VQ_CONFIG_FILE, json.dumps(model.config, indent=2) + "\n")

    def load_folder(self, folder):
        weights = folder / VQ_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"VQ tokenizer folder {str(folder)!r} has {VQ_CONFIG_FILE} but no {VQ_WEIGHTS_FILE}")
        model = VQAutoencoder(**json.loads((folder / VQ_CONFIG_FILE).read_text()))
        load_strict(model, load_file(str(weights)), str(weights), allow_missing=VQ_TRAINING_BUFFERS)
        return model, None, None
