"""REPA-E's latent normalisation: a non-affine batch normalisation over latent channels inside the generator.

Paper: Leng, Singh, Hou, Xing, Xie, Zheng 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion
Transformers" (arXiv:2504.10483), §3 ("batch-norm layer ... normalises the latents", since the tokenizer's latent
statistics change while it is tuned). Reference End2End-Diffusion/REPA-E:
  models/sit.py L217-220   `torch.nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False,
                           track_running_stats=True)` (no affine parameters, so the diffusion loss cannot rescale
                           the latents away);
  models/sit.py L262-265   `init_bn`: running_mean = the latent mean, running_var = (1 / latents_scale)^2 = std^2;
  models/sit.py L318       applied to the clean latent x before noising; train mode normalises by the batch's
                           statistics and updates the running ones, eval mode uses the running ones;
  train_repae.py L210-212  `SyncBatchNorm` under DDP (statistics of the global batch);
  train_repae.py L85-96    `update_ema` averages the float buffers (running mean / var) with the EMA decay;
  train_repae.py L514-519, generate.py L121-122   de-normalisation z = x / running_var^(-1/2) + running_mean (without
                           eps, as the reference does before decoding).

Departures, none numerical: this is not an nn.BatchNorm2d but the same maths written out (F.batch_norm's update
rule: biased variance to normalise, unbiased variance into running_var, running <- (1 - m) running + m batch), with
the global-batch statistics taken by a differentiable all-reduce instead of SyncBatchNorm (one module for one or N
processes, and 1 vs N processes give the same numbers up to float reduction order). The running statistics are
frozen nn.Parameters (requires_grad=False, never in an optimizer) rather than buffers, so ldm's EMA (ldm.train.ema,
which averages parameters and copies buffers) averages them with its decay exactly as REPA-E's update_ema does.
"""

from __future__ import annotations

import torch
from torch import nn

REPAE_BN_EPS = 1e-4       # models/sit.py L219
REPAE_BN_MOMENTUM = 0.1   # train_repae.py --bn-momentum default


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (differentiable: the gradient is all-reduced too), or x itself without a process
    group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


class LatentBatchNorm(nn.Module):
    """Non-affine batch normalisation over the C channels of (B, C, H, W) latents, statistics over the global batch.

    training: y = (x - mu_B) / sqrt(var_B + eps), mu_B / var_B the (biased) per-channel mean / variance of every
    process's batch; running_mean <- (1 - m) running_mean + m mu_B, running_var <- (1 - m) running_var + m var_B
    n / (n - 1) with n the global count per channel. eval: y = (x - running_mean) / sqrt(running_var + eps).
    """

    def __init__(self, channels: int, *, eps: float = REPAE_BN_EPS, momentum: float = REPAE_BN_MOMENTUM):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum}; expected a value in [0, 1]")
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.running_mean = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.running_var = nn.Parameter(torch.ones(channels), requires_grad=False)

    @torch.no_grad()
    def init_stats(self, mean, std) -> None:
        """REPA-E `init_bn` (models/sit.py L262-265): running_mean = mean, running_var = std^2 (per channel)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != (self.channels,) or std.shape != (self.channels,):
            raise ValueError(f"latent statistics of shapes {tuple(mean.shape)} / {tuple(std.shape)}; expected "
                             f"({self.channels},)")
        self.running_mean.copy_(mean)
        self.running_var.copy_(std.square())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"LatentBatchNorm expects (B, {self.channels}, H, W) latents, got {tuple(x.shape)}")
        x = x.float()  # statistics in fp32 under autocast, as BatchNorm's kernels keep them
        shape = (1, -1, 1, 1)
        if not self.training:
            return (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
        count = x.new_tensor(float(x.shape[0] * x.shape[2] * x.shape[3]))
        n = _global_sum(count)  # values per channel over all processes
        mean = _global_sum(x.sum(dim=(0, 2, 3))) / n  # (C,)
        centred = x - mean.view(shape)  # (B, C, H, W)
        var = _global_sum(centred.square().sum(dim=(0, 2, 3))) / n  # (C,) biased, two-pass
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1.0 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1.0 - m).add_(var.detach() * (n / (n - 1.0)), alpha=m)
        return centred / torch.sqrt(var.view(shape) + self.eps)

    def latent_mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) (C,) the latents are de-normalised with before decoding: running_mean and sqrt(running_var)
        (REPA-E's latents_bias / 1 / latents_scale, train_repae.py L514-519; no eps, as there)."""
        return self.running_mean.detach().clone(), self.running_var.detach().sqrt()

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}, affine=False, global-batch statistics"
