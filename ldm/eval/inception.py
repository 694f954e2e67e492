"""The FID Inception-v3: TensorFlow's 2015-12-05 ImageNet graph, as ported to PyTorch by pytorch-fid / torch-fidelity.

FID (Heusel et al. 2017, arXiv:1706.08500) is defined by one network: the TF graph `classify_image_graph_def.pb` of
the `inception-2015-12-05` release. Its blocks differ from torchvision's Inception-v3 (average pools that exclude
padding, a max pool in the last block, 1008 classes) and so do its weights: torchvision's own Inception gives FIDs
that are off by ~1.5 (pytorch-fid #11), so it is never used here. The port follows
  - torch-fidelity `feature_extractor_inceptionv3.py` / `interpolate_compat_tensorflow.py` (blocks and the TF1 resize),
  - openai/guided-diffusion `evaluations/evaluator.py` (the ADM evaluator: which tensors FID, sFID and IS read).
Parameter names are those of pytorch-fid / torch-fidelity, so their weight files load with `strict=True`.

Outputs (all float32; `forward` computes only what is asked for):
  pool     (B, 2048)  TF `pool_3:0`, the FID features.
  spatial  (B, 2023)  TF `mixed_6/conv:0[..., :7]` flattened in TF's NHWC order (17*17*7), the sFID features
                      (Nash et al. 2021, arXiv:2103.03841). See `FIDInceptionV3.forward` for how the layer is matched.
  logits   (B, 1008)  pool @ W_softmax^T without the bias, as the ADM evaluator's `softmax/logits/MatMul` (and
                      torch-fidelity's `logits_unbiased`); the Inception Score reads these (Salimans et al. 2016).

Input: uint8 images (B, 3, H, W) of any size. They are resized to 299x299 with TensorFlow 1.x bilinear resize
(align_corners=False, no half-pixel centres, no antialiasing) and mapped to [-1, 1) by (x - 128) / 128, which is what
the TF graph does after its `ExpandDims` input (the node the ADM evaluator feeds).

Departures from the references, for speed only: after loading, each conv + batch-norm pair is folded into one conv
with a bias (`fold_batchnorm`), and on CPU activations are kept channels-last (oneDNN's fast layout); features then
differ from the reference network by float32 rounding (max ~1e-5 on pool features of magnitude ~1-5).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "LDM_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299
OUTPUTS = ("pool", "spatial", "logits")


# ------------------------------------------------------------------------------------------------------ resizing
def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `ResizeBilinear` (align_corners=False, half_pixel_centers=False) of (B, C, H, W) floats.

    Output pixel i samples the input at s = i * (H_in / H_out) (no half-pixel offset), interpolating between
    floor(s) and min(floor(s) + 1, H_in - 1) with weight s - floor(s); columns first, then rows, in the order of
    TF's kernel (resize_bilinear_op.cc: top = tl + (tr - tl) * dx, bottom likewise, out = top + (bottom - top) * dy),
    so the result equals torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x(method="slow")` bit for bit.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")

    def coords(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        s = torch.arange(size, dtype=torch.float32) * scale
        lo = s.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo.to(x.device), hi.to(x.device), (s - lo.float()).to(device=x.device, dtype=x.dtype)

    x_lo, x_hi, dx = coords(x.shape[3])
    y_lo, y_hi, dy = coords(x.shape[2])
    left, right = x.index_select(3, x_lo), x.index_select(3, x_hi)  # (B, C, H, S)
    rows = left + (right - left) * dx  # (B, C, H, S)
    top, bottom = rows.index_select(2, y_lo), rows.index_select(2, y_hi)  # (B, C, S, S)
    return top + (bottom - top) * dy[:, None]  # (B, C, S, S)


# ------------------------------------------------------------------------------------------------------ blocks
class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU: one TF `conv` scope (Conv2D, batchnorm, Relu)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the eval-mode BN into the conv: W' = W * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps)."""
        if isinstance(self.bn, nn.Identity):
            return
        bn, conv = self.bn, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, bias=True).to(conv.weight)
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv, self.bn = folded, nn.Identity()


def avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 'SAME' average pool that, like TF, averages only the in-image pixels (count_include_pad=False)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """TF mixed, mixed_1, mixed_2 (torch names Mixed_5b/c/d): 35x35 block with 1x1, 5x5, double-3x3, pool towers."""

    def __init__(self, c_in: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)  # (B, 224 + pool_channels, 35, 35)


class Reduction35(nn.Module):
    """TF mixed_3 (Mixed_6a): 35x35 -> 17x17 with a strided 3x3, a strided double-3x3 and a max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 768, 17, 17)


class Block17(nn.Module):
    """TF mixed_4..mixed_7 (Mixed_6b/c/d/e): 17x17 block with factorised 7x7 towers; 768 channels in and out."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)  # (B, 192, 17, 17): TF <mixed_k>/conv
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)  # (B, 768, 17, 17)


class Reduction17(nn.Module):
    """TF mixed_8 (Mixed_7a): 17x17 -> 8x8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 1280, 8, 8)


class Block8(nn.Module):
    """TF mixed_9 / mixed_10 (Mixed_7b / Mixed_7c): 8x8 block with split 1x3 / 3x1 towers; 2048 channels out.

    The pool tower averages in mixed_9 but takes a max in mixed_10: a quirk of the 2015 TF graph (pytorch-fid notes
    it), kept because the weights were trained with it.
    """

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool={pool!r}; expected 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([a, self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c),
                          self.branch3x3dbl_3b(c), self.branch_pool(pooled)], 1)  # (B, 2048, 8, 8)


# ------------------------------------------------------------------------------------------------------ network
class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (module docstring). `forward(x_uint8, outputs)` returns a dict of float32 features."""

    name = "inception"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_channels=32)
        self.Mixed_5c = Block35(256, pool_channels=64)
        self.Mixed_5d = Block35(288, pool_channels=64)
        self.Mixed_6a = Reduction35(288)
        self.Mixed_6b = Block17(768, c7=128)
        self.Mixed_6c = Block17(768, c7=160)
        self.Mixed_6d = Block17(768, c7=160)
        self.Mixed_6e = Block17(768, c7=192)
        self.Mixed_7a = Reduction17(768)
        self.Mixed_7b = Block8(1280, pool="avg")
        self.Mixed_7c = Block8(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        """Always stays in eval mode: batch norm must use the TF moving statistics."""
        return super().train(False)

    @property
    def feature_dims(self) -> dict[str, int]:
        return {"pool": 2048, "spatial": 17 * 17 * 7, "logits": 1008}

    def forward(self, x: torch.Tensor, outputs: Iterable[str] = ("pool",)) -> dict[str, torch.Tensor]:
        outputs = tuple(outputs)
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"outputs={unknown}; expected a subset of {OUTPUTS}")
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects uint8 images (B, 3, H, W); got {tuple(x.shape)} {x.dtype}")
        x = x.to(self.fc.weight.dtype)
        if x.shape[2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_bilinear_tf1(x, INCEPTION_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128  # TF graph: Sub 128, Mul 1/128
        if x.device.type == "cpu":  # oneDNN convolutions run faster on NHWC activations (same values)
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # (B, 768, 17, 17)
        out: dict[str, torch.Tensor] = {}
        if "spatial" in outputs:
            # The ADM evaluator reads `mixed_6/conv:0`. In the TF graph the 17x17 blocks are mixed_4 .. mixed_7, so
            # mixed_6 is the third of them, Mixed_6d here (torch-fidelity's util_convert_inception_weights.py maps
            # mixed_6/conv/{conv2d_params,batchnorm} to Mixed_6d.branch1x1.{conv,bn}); the tensor named after the
            # `conv` scope is its ReLU output, i.e. Mixed_6d.branch1x1's output, which is the first 192 channels of
            # the block's concatenation. ADM keeps channels [..., :7] of the NHWC map and flattens it: 17*17*7 = 2023,
            # ordered (h, w, c) as TF lays it out.
            out["spatial"] = x[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1).float()  # (B, 2023)
            if outputs == ("spatial",):
                return out
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): TF pool_3, an 8x8 average pool
        if "pool" in outputs:
            out["pool"] = pool.float()
        if "logits" in outputs:
            out["logits"] = (pool @ self.fc.weight.T).float()  # (B, 1008), no bias: ADM softmax/logits/MatMul
        return out

    def fold_batchnorm(self) -> "FIDInceptionV3":
        """Fold every batch norm into its conv (see ConvBN.fold_batchnorm); the state dict changes layout after this."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fold_batchnorm()
        return self.requires_grad_(False)  # the new convs' parameters are frozen like the rest


# ------------------------------------------------------------------------------------------------------ weights
def inception_weight_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Where the weights are looked for, in order: `path`, $LDM_INCEPTION_WEIGHTS, then the torch hub cache under both
    known file names (pytorch-fid's `pt_inception-...pth` and torch-fidelity's `weights-inception-...pth`)."""
    if path is not None:
        return [Path(path)]
    found = [Path(os.environ[INCEPTION_ENV])] if os.environ.get(INCEPTION_ENV) else []
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return found + [hub / name for name in INCEPTION_FILENAMES]


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The first existing file of `inception_weight_candidates(path)`; else FileNotFoundError naming all of them."""
    candidates = inception_weight_candidates(path)
    for c in candidates:
        if c.is_file():
            return c
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"FID Inception-v3 weights not found. Looked for:\n  {looked}\n"
        f"Get {INCEPTION_FILENAMES[0]} from {INCEPTION_URL} (or torch-fidelity's {INCEPTION_FILENAMES[1]}) and pass "
        f"its path (--inception-weights / eval.inception_weights), set {INCEPTION_ENV}=/path/to/file, or put it in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}; on a machine with internet, --download-inception fetches it "
        f"there.")


def load_inception(path: str | os.PathLike | None = None, *, download: bool = False,
                   device: torch.device | str = "cpu", fold_batchnorm: bool = True) -> FIDInceptionV3:
    """Build FIDInceptionV3 and load the TF-2015 weights (strict) from a local file.

    `download=True` (opt-in; never used by tests) fetches pytorch-fid's file into the torch hub cache when no local
    file is found. `fold_batchnorm` folds BN into the convs for speed (features change by float32 rounding only).
    """
    try:
        file = find_inception_weights(path)
    except FileNotFoundError:
        if not download or path is not None:
            raise
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        hub.mkdir(parents=True, exist_ok=True)
        file = hub / INCEPTION_FILENAMES[0]
        logger.info("downloading %s to %s", INCEPTION_URL, file)
        torch.hub.download_url_to_file(INCEPTION_URL, str(file), progress=True)
    net = FIDInceptionV3()
    state = torch.load(file, map_location="cpu", weights_only=True)
    # Checkpoints written before torch 0.4.1 lack BN `num_batches_tracked` counters; they are unused in eval mode.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{file} is not an FID Inception-v3 state dict (pytorch-fid / torch-fidelity layout): "
                         f"missing keys {result.missing_keys[:5]}..., unexpected keys {result.unexpected_keys[:5]}...")
    logger.info("loaded FID Inception-v3 weights from %s", file)
    if fold_batchnorm:
        net.fold_batchnorm()
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if net.fc.weight.device.type == "cpu" else net
