"""Import official DiT, SiT and LightningDiT weights into our `DiT` (ldm/models/dit.py).

Formats (`OFFICIAL_FORMATS`):
  "dit"          facebookresearch/DiT models.py, e.g. DiT-XL-2-256x256.pt: eps-prediction with learned sigma
                 (8 output channels for 4 latent channels), the discrete DDPM step index i in [0, 999] fed to the
                 timestep embedder (diffusion/respace.py maps respaced steps back to it).
  "sit"          willisma/SiT models.py, e.g. SiT-XL-2-256x256.pt: the same key layout, but a flow model: velocity
                 of the linear path x_s = s * data + (1 - s) * noise, data at s = 1 (transport/path.py `ICPlan`),
                 s fed unscaled to the embedder; learn_sigma=True checkpoints carry 8 output channels of which its
                 forward keeps the first 4.
  "lightningdit" hustvl/LightningDiT models/lightningdit.py: the SiT convention plus SwiGLU (`mlp.w12`, `mlp.w3`),
                 RMSNorm gains (`norm1.weight`, `norm2.weight`, `final_layer.norm_final.weight`), optional QK-norm
                 (`attn.q_norm`, `attn.k_norm`) and 2-D RoPE tables (`feat_rope.freqs_cos/sin`).

Time convention at the boundary (ours: t = 0 data, t = 1 noise, velocity v = dx/dt = noise - data). For SiT and
LightningDiT, s = 1 - t, so x_t = (1 - t) data + t noise is their x_s, and
    v_ours(x, t) = dx/dt = -dx/ds = -u_theirs(x, s = 1 - t).
Both pieces are folded into the imported weights, so the result is an ordinary `DiT` taking our t:
  - time flip: the embedder receives t_shift + t_scale * t with t_shift = 1, t_scale = -1, i.e. exactly their s;
  - sign flip: final_layer.linear weight and bias are negated, so the network returns -u_theirs = v_ours.
DiT's eps-prediction needs no sign change (eps is the same noise in both conventions). Its step index i (data at
i = -1, i.e. before the first noising step) sits at t_i = (i + 1) / 1000 on the DDPM knots of ldm/diffusion/paths.py,
so the embedder gets i = 1000 t - 1: t_scale = 1000, t_shift = -1 (paths.py `DiscretePath.model_time`).

Key mapping (official -> ours); keys not listed keep their name:
  x_embedder.proj.{weight,bias}            -> patch_embed.{weight,bias}
  y_embedder.embedding_table.weight        -> y_embedder.weight
  blocks.{i}.adaLN_modulation.1.{w,b}      -> blocks.{i}.ada_ln.{w,b}         (the SiLU is applied in our forward)
  final_layer.adaLN_modulation.1.{w,b}     -> final_layer.ada_ln.{w,b}
  final_layer.norm_final.weight            -> final_layer.norm.weight         (LightningDiT RMSNorm gain)
  final_layer.linear.{w,b}                 -> final_layer.linear.{w,b}        (sit/lightningdit: negated; learned-sigma
                                                                               rows dropped, see above)
  feat_rope.freqs_cos / freqs_sin          -> (dropped: recomputed by our DiT, checked to be equal)
  unchanged: pos_embed, t_embedder.mlp.{0,2}.*, blocks.{i}.attn.qkv.*, blocks.{i}.attn.proj.*,
             blocks.{i}.attn.{q,k}_norm.*, blocks.{i}.norm{1,2}.weight, blocks.{i}.mlp.fc{1,2}.*,
             blocks.{i}.mlp.w12.*, blocks.{i}.mlp.w3.*
Training checkpoints are unwrapped ("ema" preferred, then "model", as the official loaders do) and "module." /
"_orig_mod." prefixes removed. LightningDiT's `wo_shift` variant (4-way adaLN) is not supported and is refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

import torch

from ldm.models.dit import DiT
from ldm.models.layers import rope_2d_angles, swiglu_hidden

logger = logging.getLogger(__name__)

OFFICIAL_FORMATS = ("dit", "sit", "lightningdit")
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}  # DiT Table 1, LightningDiT presets
_RENAMES = [
    (r"^x_embedder\.proj\.", "patch_embed."),
    (r"^y_embedder\.embedding_table\.", "y_embedder."),
    (r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.1\.", r"\1.ada_ln."),
    (r"^final_layer\.norm_final\.", "final_layer.norm."),
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pt / .pth file, unwrapped from a training checkpoint and de-prefixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path.resolve()}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:  # weights_only: no code runs; train.py checkpoints also hold an argparse.Namespace of their arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with an 'ema'/'model' one)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}


def _infer_kwargs(sd: dict[str, torch.Tensor], fmt: str, num_heads: int | None) -> dict:
    """DiT constructor kwargs read from the tensor shapes of an official state dict."""
    for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.adaLN_modulation.1.weight"):
        if key not in sd:
            raise ValueError(f"not a {fmt} state dict: key {key!r} is missing")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(sd["pos_embed"].shape[1])
    if grid * grid != sd["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed has {sd['pos_embed'].shape[1]} tokens, not a square grid")
    if sd["blocks.0.adaLN_modulation.1.weight"].shape[0] != 6 * hidden:
        raise ValueError("blocks.0.adaLN_modulation.1 is not 6-way (LightningDiT wo_shift=True); not supported")
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear gives {out_channels} channels per pixel for {in_channels} inputs")
    use_qknorm = "blocks.0.attn.q_norm.weight" in sd
    if use_qknorm:
        num_heads = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]
    elif num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise ValueError(f"cannot tell the number of heads of a width-{hidden} model; pass num_heads=")
        num_heads = HEADS_BY_WIDTH[hidden]
    use_swiglu = "blocks.0.mlp.w12.weight" in sd
    if use_swiglu:
        mlp_ratio = 4.0
        if sd["blocks.0.mlp.w12.weight"].shape[0] != 2 * swiglu_hidden(hidden, mlp_ratio):
            raise ValueError(f"blocks.0.mlp.w12 has {sd['blocks.0.mlp.w12.weight'].shape[0]} rows; LightningDiT's "
                             f"SwiGLU at mlp_ratio 4 has {2 * swiglu_hidden(hidden, mlp_ratio)}")
    else:
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    table = sd.get("y_embedder.embedding_table.weight")
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=0 if table is None else table.shape[0] - 1,
        # SiT/LightningDiT forward drops the learned-sigma half; so do we (below).
        learn_sigma=out_channels == 2 * in_channels and fmt == "dit",
        use_swiglu=use_swiglu, use_rmsnorm="blocks.0.norm1.weight" in sd, use_rope="feat_rope.freqs_cos" in sd,
        use_qknorm=use_qknorm,
        **(dict(t_scale=1000.0, t_shift=-1.0) if fmt == "dit" else dict(t_scale=-1.0, t_shift=1.0)),
    )


def convert_official_state_dict(
    sd: dict[str, torch.Tensor], fmt: str, *, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(our state dict, DiT kwargs) from an official one; see the module docstring for every change."""
    if fmt not in OFFICIAL_FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {OFFICIAL_FORMATS}")
    kwargs = _infer_kwargs(sd, fmt, num_heads)
    out = {}
    for key, value in sd.items():
        if key.startswith("feat_rope."):
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if kwargs["use_rope"]:  # their table: cos/sin of each pair's angle, repeated for both channels of the pair
        head_dim, grid = kwargs["hidden_size"] // kwargs["num_heads"], kwargs["input_size"] // kwargs["patch_size"]
        angles = rope_2d_angles(head_dim, grid)
        for name, fn in (("freqs_cos", torch.cos), ("freqs_sin", torch.sin)):
            if not torch.allclose(sd[f"feat_rope.{name}"].float(), fn(angles).repeat_interleave(2, -1), atol=1e-5):
                raise ValueError(f"feat_rope.{name} differs from the 2-D RoPE table of this grid/head size")
    if fmt != "dit":
        P, C = kwargs["patch_size"], kwargs["in_channels"]
        w, b = out["final_layer.linear.weight"], out["final_layer.linear.bias"]
        if w.shape[0] == P * P * 2 * C:  # per-token rows are laid out (p, q, c): keep c < C of each (p, q)
            w = w.view(P * P, 2 * C, -1)[:, :C].reshape(P * P * C, -1)
            b = b.view(P * P, 2 * C)[:, :C].reshape(-1)
        out["final_layer.linear.weight"], out["final_layer.linear.bias"] = -w, -b  # v_ours = -u_theirs
    return out, kwargs


def load_official(path: str | Path, fmt: str, *, num_heads: int | None = None, **overrides) -> DiT:
    """Build our DiT from an official DiT / SiT / LightningDiT checkpoint file (strict: every key must match).

    `overrides` go to `DiT.__init__` after the inferred kwargs (e.g. class_dropout_prob, repa_depth, attn_backend).
    """
    sd, kwargs = convert_official_state_dict(read_state_dict(path), fmt, num_heads=num_heads)
    model = DiT(**{**kwargs, **overrides})
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: does not match a {fmt} model with {kwargs}: missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")
    logger.info("loaded %s weights from %s: %s", fmt, path, kwargs)
    return model
