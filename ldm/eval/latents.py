"""Latent-space diagnostics: what makes a tokenizer's latents easy or hard for a generator to model.

Pure functions of tensors, then one driver, `diagnose_tokenizer`, that runs them on a data source and writes
`latent_diagnostics.json` and `latent_diagnostics.png` (`ldm eval latents`). Definitions (docs/evaluation.md,
"Latent diagnostics", gives them with their sources):

* channel statistics: per-channel mean / std of the latents over images and positions (population std, ddof=0) and
  their spread (max/min std, coefficient of variation of the stds, range of the means). Latent diffusion normalises
  latents by these numbers (Rombach et al. 2022, arXiv:2112.10752, §4.3.2 and App. G: the scale factor).
* equivariance under the EQ-VAE transforms tau (Kouzelis et al. 2025, arXiv:2502.09509, §3 and Table 1; transforms
  and the metric from ldm.tokenizers.eq, `equivariance_errors`: bilinear down-scaling by s and k x 90 deg
  rotations), over the image set:
    decoder ratio  R_dec(tau) = RMS(D(tau(E(x))) - tau(x)) / RMS(D(E(x)) - x)   (1 = as good as a plain reconstruction)
    decoder MSE    the EQ-VAE paper's error, mean over pixels of (D(tau(E(x))) - tau(x))^2, images in [-1, 1]
    latent error   e_lat(tau) = ||E(tau(x)) - tau(E(x))|| / ||tau(E(x))||   (norms over the whole set)
* radially averaged power spectrum (RAPSD) of latents and images, and the high-frequency energy share: per channel,
  the power |FFT(x - mean)|^2 (orthonormal 2-D DFT) at normalised radial frequency rho = sqrt((2 k_y/H)^2 +
  (2 k_x/W)^2) (rho = 1 is Nyquist along an axis), HF share = sum_{rho > cutoff} P / sum_{rho > 0} P with cutoff 0.5
  by default (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders", arXiv:2502.14831, §3 measure
  the same excess of high frequencies in latents with a DCT; Dieleman 2024, "Diffusion is spectral autoregression",
  uses this RAPSD). Images are measured at full size and area-downsampled to the latent grid ("image@latent"), the
  fair reference: a latent that were a faithful thumbnail would have that spectrum.
* KL tokenizers: posterior variance and KL(q(z|x) || N(0, I)) per channel, 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)
  per element (Kingma & Welling 2014, arXiv:1312.6114, App. B; LDM DiagonalGaussianDistribution.kl), and the
  posterior noise-to-signal ratio mean(sigma) / std(mu) per channel.
  Quantised tokenizers (VQ, FSQ): codebook usage (fraction of codes used at least once) and perplexity
  exp(-sum p_k log p_k) (taming-transformers VectorQuantizer; van den Oord et al. 2017).
* alignment with a frozen encoder's patch features at the latent grid: linear CKA (Kornblith et al. 2019,
  arXiv:1905.00414, §3: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the biased HSIC of Gretton et al. 2005;
  its linear-kernel form in their Table 1) and CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis",
  arXiv:2405.07987, appendix on alignment metrics; reference minyoungg/platonic-rep metrics.py `cknna` with the
  unbiased HSIC, L2-normalised features (measure_alignment.py) and top-k = 10, the setting REPA reports).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.encoders import features_at_grid
from ldm.tokenizers.eq import EqTransform, equivariance_errors

log = logging.getLogger(__name__)

JSON_FILE = "latent_diagnostics.json"
FIGURE_FILE = "latent_diagnostics.png"


# ----------------------------------------------------------------------------------------------------------- channels
def channel_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and population std of (N, C, h, w) latents over (N, h, w), in float64, and their spread."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(latents.shape)}")
    z = latents.double()
    mean = z.mean(dim=(0, 2, 3))  # (C,)
    std = z.var(dim=(0, 2, 3), unbiased=False).sqrt()  # (C,)
    return {"mean": mean.tolist(), "std": std.tolist(),
            "mean_range": float(mean.max() - mean.min()),
            "std_ratio": float(std.max() / std.min().clamp_min(1e-30)),
            "std_cv": float(std.std(unbiased=False) / std.mean().clamp_min(1e-30))}


# ----------------------------------------------------------------------------------------------------------- spectrum
def radial_frequency(h: int, w: int) -> torch.Tensor:
    """rho (h, w) of every 2-D DFT coefficient, rho = sqrt((2 k_y / h)^2 + (2 k_x / w)^2): 1 = Nyquist along an axis."""
    ky = torch.fft.fftfreq(h, dtype=torch.float64) * 2  # cycles per pixel / 0.5
    kx = torch.fft.fftfreq(w, dtype=torch.float64) * 2
    return (ky[:, None].square() + kx[None, :].square()).sqrt()


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean power |DFT(x - spatial mean)|^2 over the batch, orthonormal DFT: (N, C, H, W) -> (C, H, W) float64.

    With norm="ortho", white noise of variance s^2 has E P(k) = s^2 at every k != 0 (Parseval)."""
    x = x.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(x, norm="ortho").abs().square().mean(0)  # (C, H, W)


def radial_profile(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power: (C, H, W) -> (frequencies (R,), mean power per ring (C, R)).

    Ring b holds the coefficients with round(rho * min(H, W) / 2) = b (integer radius in cycles per image for square
    inputs), b = 1 .. max; its frequency is b / (min(H, W) / 2). The DC ring (b = 0) is left out."""
    c, h, w = power.shape
    half = min(h, w) / 2
    ring = torch.round(radial_frequency(h, w) * half).long().flatten()  # (H*W,)
    n = int(ring.max()) + 1
    sums = torch.zeros(c, n, dtype=torch.float64).index_add_(1, ring, power.reshape(c, -1).double())
    counts = torch.bincount(ring, minlength=n).double()
    return torch.arange(1, n, dtype=torch.float64) / half, sums[:, 1:] / counts[1:]


def high_frequency_share(power: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per channel: sum of power at rho > cutoff over all power at rho > 0. (C, H, W) -> (C,)."""
    if not 0.0 < cutoff < math.sqrt(2):
        raise ValueError(f"cutoff={cutoff}; expected a normalised frequency in (0, sqrt(2))")
    rho = radial_frequency(*power.shape[-2:])
    total = power[:, rho > 0].sum(-1)
    return power[:, rho > cutoff].sum(-1) / total.clamp_min(1e-300)


def spectrum_summary(x: torch.Tensor, cutoff: float, chunk: int = 64) -> dict:
    """RAPSD (per-channel profiles normalised to unit total power, then averaged) and HF share of (N, C, H, W);
    the power is accumulated over chunks of `chunk` images (float64 FFTs of large images are memory-hungry)."""
    p = sum(power_spectrum(part) * len(part) for part in x.split(chunk)) / len(x)  # (C, H, W)
    freq, prof = radial_profile(p)
    rel = prof / prof.sum(-1, keepdim=True).clamp_min(1e-300)  # (C, R) relative power per ring
    share = high_frequency_share(p, cutoff)
    return {"size": list(x.shape[-2:]), "freq": freq.tolist(), "power": rel.mean(0).tolist(),
            "hf_share": float(share.mean()), "hf_share_per_channel": share.tolist()}


# ----------------------------------------------------------------------------------------------------------- posterior
def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) elementwise (Kingma & Welling App. B)."""
    return 0.5 * (mean.double().square() + logvar.double().exp() - 1.0 - logvar.double())


def posterior_stats(mean: torch.Tensor, logvar: torch.Tensor) -> dict:
    """Per-channel KL (nats per element and per image), posterior variance and noise-to-signal of (N, C, h, w)."""
    kl = kl_per_element(mean, logvar)  # (N, C, h, w)
    var = logvar.double().exp()
    noise = var.sqrt().mean(dim=(0, 2, 3))  # (C,)
    signal = mean.double().var(dim=(0, 2, 3), unbiased=False).sqrt()
    return {"kl_per_element": kl.mean(dim=(0, 2, 3)).tolist(),
            "kl_per_image": float(kl.sum(dim=(1, 2, 3)).mean()),
            "posterior_variance": var.mean(dim=(0, 2, 3)).tolist(),
            "noise_to_signal": (noise / signal.clamp_min(1e-30)).tolist()}


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of codes hit at least once), perplexity exp(H(p)) of the code histogram, and the histogram."""
    from ldm.tokenizers.vq import code_histogram, perplexity

    counts = code_histogram(indices.long().cpu(), codebook_size)
    ppl = float(perplexity(counts))
    return {"codebook_size": codebook_size, "codes_used": int((counts > 0).sum()),
            "usage": float((counts > 0).float().mean()), "perplexity": ppl,
            "perplexity_ratio": ppl / codebook_size, "counts": counts.long().tolist()}


# ----------------------------------------------------------------------------------------------------------- alignment
def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 of Song et al. 2012 (JMLR 13, Eq. 5), as platonic-rep metrics.py `hsic_unbiased`, in O(n^2):
    sum(K~ L~) is computed as sum_m (column sums of K~)_m (row sums of L~)_m instead of a matrix product."""
    n = k.shape[0]
    kt = k.clone().fill_diagonal_(0)
    lt = l.clone().fill_diagonal_(0)
    value = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt.sum(0) * lt.sum(1)).sum() / (n - 2)
    return value / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, d1), (n, d2) features (Kornblith et al. 2019, §3 and Table 1), in the feature-space form of
    tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), X, Y
    column-centred. O(n d^2) instead of O(n^3)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.T @ x).square().sum()
    return float(num / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)).clamp_min(1e-300))


def cknna(x: torch.Tensor, y: torch.Tensor, topk: int = 10) -> float:
    """CKNNA (Huh et al. 2024): CKA with the kernels restricted to pairs that are mutual top-k neighbours.

    Inner-product kernels of the given rows (L2-normalise them first, as the reference does); the unbiased HSIC;
    each point's own entry excluded from its neighbours (reference `cknna(unbiased=True)`)."""
    n = x.shape[0]
    if not 2 <= topk < n:
        raise ValueError(f"cknna topk={topk}; expected 2 <= topk < number of points ({n})")
    x, y = x.double(), y.double()
    k, l = x @ x.T, y @ y.T

    def masked(a: torch.Tensor) -> torch.Tensor:  # 1 where j is among i's top-k (diagonal excluded)
        idx = a.clone().fill_diagonal_(float("-inf")).topk(topk, dim=1).indices
        return torch.zeros_like(a).scatter_(1, idx, 1.0)

    mk, ml = masked(k), masked(l)
    sim_kl = hsic_unbiased(mk * ml * k, mk * ml * l)
    sim_kk = hsic_unbiased(mk * k, mk * k)
    sim_ll = hsic_unbiased(ml * l, ml * l)
    return float(sim_kl / ((sim_kk * sim_ll).sqrt() + 1e-12))


def alignment(latents: torch.Tensor, features: torch.Tensor, *, topk: int = 10, max_tokens: int = 2048,
              seed: int = 0) -> dict:
    """Token-level alignment of latents (N, C, h, w) with features (N, D, h, w): each latent position is a point.
    At most `max_tokens` positions, drawn without replacement with `seed`."""
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N*h*w, C)
    f = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (N*h*w, D)
    if z.shape[0] != f.shape[0]:
        raise ValueError(f"latents give {z.shape[0]} positions, features {f.shape[0]}: grids differ")
    if z.shape[0] > max_tokens:
        keep = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        z, f = z[keep], f[keep]
    return {"linear_cka": linear_cka(z, f), "cknna": cknna(F.normalize(z.double(), dim=1),
                                                           F.normalize(f.double(), dim=1), topk),
            "topk": topk, "num_tokens": int(z.shape[0])}


# ----------------------------------------------------------------------------------------------------------- equivariance
def eq_transforms(scales: Sequence[float] = (0.5, 0.75), rotations: Sequence[int] = (1, 2, 3)) -> dict[str, EqTransform]:
    """The diagnostic transform set: each rotation k x 90 deg at scale 1, each scale s without rotation."""
    out = {f"rot{90 * k}": EqTransform("equivariance", (1.0, 1.0), int(k)) for k in rotations}
    out.update({f"scale{s:g}": EqTransform("equivariance", (float(s), float(s)), 0) for s in scales})
    return out


# ----------------------------------------------------------------------------------------------------------- driver
def load_images(data: str, *, image_size: int | None = None, num_images: int = 512) -> torch.Tensor:
    """The first `num_images` images of a source (ADM centre crop to image_size if given) as (N, 3, H, W) in [-1, 1]."""
    from ldm.data.images import iter_uint8_batches

    chunks, n = [], 0
    for arr, _ in iter_uint8_batches(data, 256, size=image_size):
        chunks.append(torch.from_numpy(arr[:num_images - n]))
        n += len(chunks[-1])
        if n >= num_images:
            break
    if not chunks:
        raise ValueError(f"data source {data!r} yielded no images")
    return torch.cat(chunks).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)


@torch.no_grad()
def diagnose_tokenizer(tokenizer, data: str, *, image_size: int | None = None, num_images: int = 512,
                       batch_size: int = 64, encoder: nn.Module | None = None, encoder_name: str = "",
                       scales: Sequence[float] = (0.5, 0.75), rotations: Sequence[int] = (1, 2, 3),
                       hf_cutoff: float = 0.5, topk: int = 10, max_tokens: int = 2048, seed: int = 0,
                       device: str | torch.device = "cpu", out_dir: str | Path | None = None,
                       progress: bool = False) -> dict:
    """All diagnostics of a frozen tokenizer (ldm.tokenizers.export.Tokenizer: encode, decode, kind, downsample;
    family; posterior for gaussian kinds, encode_indices for quantised ones) on the first `num_images` images of `data`.

    `encoder` (images in [-1, 1] -> patch tokens (B, L, D), e.g. ldm.encoders.FrozenEncoder) enables the alignment
    metrics; without it they are skipped and the JSON says so. With `out_dir`, writes latent_diagnostics.json and
    latent_diagnostics.png there. Deterministic for a given seed (it only subsamples alignment tokens). `progress`
    draws a bar for each pass over the images (encoding, equivariance)."""
    from tqdm.auto import tqdm

    if num_images < 2:
        raise ValueError(f"num_images={num_images}; the statistics need at least 2 images")
    device = torch.device(device)
    images = load_images(data, image_size=image_size, num_images=num_images)
    batches = [b.to(device) for b in images.split(batch_size)]
    f = tokenizer.downsample
    latents, logvars, indices, feats = [], [], [], []
    for x in tqdm(batches, desc="encode", unit="batch", disable=not progress):
        if tokenizer.family == "gaussian":
            post = tokenizer.posterior(x)
            z = post.mean.float()  # what encode() returns
            logvars.append(post.logvar.float().cpu())
        else:
            z = tokenizer.encode(x)  # (B, C, h, w)
        if tokenizer.family == "quantised":
            indices.append(tokenizer.encode_indices(x).cpu())
        if encoder is not None:
            feats.append(features_at_grid(encoder, x, tuple(z.shape[-2:])).cpu())  # (B, D, h, w)
        latents.append(z.cpu())
    z = torch.cat(latents)  # (N, C, h, w)
    result: dict = {
        "tokenizer": {"source": getattr(tokenizer, "source", ""), "kind": tokenizer.kind,
                      "fingerprint": getattr(tokenizer, "fingerprint", ""), "downsample": f,
                      "latent_shape": list(z.shape[1:])},
        "data": {"source": data, "num_images": int(images.shape[0]), "image_size": list(images.shape[-2:])},
        "channels": channel_stats(z),
        "equivariance": equivariance_errors(tokenizer.encode, tokenizer.decode,
                                            tqdm(batches, desc="equivariance", unit="batch", disable=not progress),
                                            downsample=f, transforms=eq_transforms(scales, rotations)),
        "spectrum": {"cutoff": hf_cutoff,
                     "latent": spectrum_summary(z, hf_cutoff),
                     "image": spectrum_summary(images, hf_cutoff),
                     "image_at_latent": spectrum_summary(F.avg_pool2d(images, f), hf_cutoff)},
    }
    if tokenizer.family == "gaussian":
        result["posterior"] = posterior_stats(z, torch.cat(logvars))
    elif tokenizer.family == "quantised":
        result["codebook"] = codebook_stats(torch.cat(indices), tokenizer.kind_ops.codebook_size(tokenizer.model))
    if encoder is not None:
        result["alignment"] = {"encoder": encoder_name or type(encoder).__name__,
                               **alignment(z, torch.cat(feats), topk=topk, max_tokens=max_tokens, seed=seed)}
    else:
        result["alignment"] = {"skipped": "no frozen encoder given (ldm eval latents --encoder NAME)"}
    if out_dir is not None:
        from ldm.io import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / JSON_FILE, json.dumps(result, indent=2) + "\n")
        plot_diagnostics(result, out / FIGURE_FILE)
        log.info("wrote %s and %s", out / JSON_FILE, out / FIGURE_FILE)
    return result


def plot_diagnostics(result: dict, path: str | Path) -> Path:
    """Four panels: channel mean +- std, RAPSD (latent vs images), equivariance per transform, KL or code usage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    ch = result["channels"]
    c = np.arange(len(ch["mean"]))
    ax[0, 0].bar(c, ch["mean"], yerr=ch["std"], capsize=3, color="tab:blue", alpha=0.7)
    ax[0, 0].set(title=f"latent channels: mean ± std (std ratio {ch['std_ratio']:.2f})", xlabel="channel")
    sp = result["spectrum"]
    for key, style in (("image", ":"), ("image_at_latent", "--"), ("latent", "-")):
        s = sp[key]
        ax[0, 1].plot(s["freq"], s["power"], style, marker=".", label=f"{key} {s['size'][0]}px: HF {s['hf_share']:.3f}")
    ax[0, 1].axvline(sp["cutoff"], color="grey", lw=0.8)
    ax[0, 1].set(xscale="log", yscale="log", title="radially averaged power (relative)",
                 xlabel="frequency / Nyquist")
    ax[0, 1].legend(fontsize=8)
    eq = result["equivariance"]["transforms"]
    names = list(eq)
    pos = np.arange(len(names))
    ax[1, 0].bar(pos - 0.2, [eq[n]["decoder_ratio"] for n in names], 0.4, label="decoder RMS ratio")
    ax[1, 0].bar(pos + 0.2, [eq[n]["latent_error"] for n in names], 0.4, label="latent rel. error")
    ax[1, 0].axhline(1.0, color="grey", lw=0.8)
    ax[1, 0].set_xticks(pos, names)
    ax[1, 0].set(title="equivariance (EQ-VAE transforms)")
    ax[1, 0].legend(fontsize=8)
    if "posterior" in result:
        ax[1, 1].bar(c, result["posterior"]["kl_per_element"], color="tab:red", alpha=0.7)
        ax[1, 1].set(title=f"KL per element (nats); per image {result['posterior']['kl_per_image']:.1f}",
                     xlabel="channel")
    elif "codebook" in result:
        cb = result["codebook"]
        ax[1, 1].plot(sorted(cb["counts"], reverse=True))
        ax[1, 1].set(yscale="symlog", xlabel="code (sorted)", ylabel="count",
                     title=f"codebook: usage {cb['usage']:.2f}, perplexity {cb['perplexity']:.1f}")
    else:
        ax[1, 1].axis("off")
    al = result.get("alignment", {})
    if "cknna" in al:
        fig.suptitle(f"alignment with {al['encoder']}: CKNNA {al['cknna']:.3f}, linear CKA {al['linear_cka']:.3f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
