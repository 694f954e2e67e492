"""Official DiT / SiT / LightningDiT state dicts load into our DiT and compute what the official networks compute.

The state dicts are random tensors under the official key names (facebookresearch/DiT models.py, willisma/SiT
models.py, hustvl/LightningDiT models/lightningdit.py + swiglu_ffn.py + rmsnorm.py + pos_embed.py). The reference
forward below is written from those files with plain tensor ops (manual patchify, softmax attention, tanh-GELU
formula, EVA-02 rotate_half RoPE from the stored tables) and shares no code with ldm.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.models.checkpoints import convert_official_state_dict, load_official, read_state_dict

D, HEADS, DEPTH, P, C, GRID, CLASSES = 32, 2, 2, 2, 4, 4, 10


def eva_rope_tables(head_dim, grid):
    """LightningDiT VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid) buffers."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = torch.outer(torch.arange(grid).float(), freqs).repeat_interleave(2, dim=-1)  # (grid, dim), '... n -> ... (n r)'
    f2 = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    f2 = f2.reshape(grid * grid, head_dim)
    return f2.cos(), f2.sin()


def official_state_dict(seed, *, learn_sigma, lightning=False, qknorm=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, mean=0.0):
        return mean + 0.3 * torch.randn(*shape, generator=g)

    L, Dh = GRID * GRID, D // HEADS
    out_c = 2 * C if learn_sigma else C
    sd = {
        "x_embedder.proj.weight": r(D, C, P, P), "x_embedder.proj.bias": r(D),
        "pos_embed": r(1, L, D),
        "t_embedder.mlp.0.weight": r(D, 256) / 4, "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, D),
        "final_layer.linear.weight": r(P * P * out_c, D), "final_layer.linear.bias": r(P * P * out_c),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)}
        if lightning:
            hs = int(2 / 3 * int(D * 4.0))
            sd |= {b + "mlp.w12.weight": r(2 * hs, D), b + "mlp.w12.bias": r(2 * hs),
                   b + "mlp.w3.weight": r(D, hs), b + "mlp.w3.bias": r(D),
                   b + "norm1.weight": r(D, mean=1.0), b + "norm2.weight": r(D, mean=1.0)}
            if qknorm:
                sd |= {b + "attn.q_norm.weight": r(Dh, mean=1.0), b + "attn.k_norm.weight": r(Dh, mean=1.0)}
        else:
            sd |= {b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)}
    if lightning:
        sd["final_layer.norm_final.weight"] = r(D, mean=1.0)
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = eva_rope_tables(Dh, GRID)
    return sd


def reference_forward(sd, x, t_in, y, lightning=False):
    """The official forward, in plain ops. t_in: what the official model receives as t."""
    B = x.shape[0]
    Dh = D // HEADS

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def norm(h, gain_key):
        if lightning:  # RMSNorm(eps 1e-6) with gain
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[gain_key]
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-6)

    def rotate_half(h):  # '... (d r) -> ... d r', (x1, x2) -> (-x2, x1)
        h = h.reshape(*h.shape[:-1], -1, 2)
        return torch.stack([-h[..., 1], h[..., 0]], dim=-1).flatten(-2)

    # patchify: (B, C, H, W) -> (B, L, C*P*P) in Conv2d weight order
    patches = x.reshape(B, C, GRID, P, GRID, P).permute(0, 2, 4, 1, 3, 5).reshape(B, GRID * GRID, C * P * P)
    h = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t_in[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = norm(h, b + "norm1.weight") * (1 + sc1[:, None]) + s1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, HEADS, Dh).permute(2, 0, 3, 1, 4)
        if b + "attn.q_norm.weight" in sd:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[b + "attn.q_norm.weight"]
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[b + "attn.k_norm.weight"]
        if lightning:
            cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, -1, D)
        h = h + g1[:, None] * lin(o, b + "attn.proj")
        m = norm(h, b + "norm2.weight") * (1 + sc2[:, None]) + s2[:, None]
        if lightning:
            u1, u2 = lin(m, b + "mlp.w12").chunk(2, dim=-1)
            m = lin(F.silu(u1) * u2, b + "mlp.w3")
        else:
            z = lin(m, b + "mlp.fc1")
            m = lin(0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))), b + "mlp.fc2")
        h = h + g2[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = norm(h, "final_layer.norm_final.weight") * (1 + scale[:, None]) + shift[:, None]
    h = lin(h, "final_layer.linear")
    out_c = h.shape[-1] // (P * P)
    h = h.reshape(B, GRID, GRID, P, P, out_c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, out_c, GRID * P, GRID * P)


def inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(3, C, GRID * P, GRID * P, generator=g), torch.rand(3, generator=g),
            torch.tensor([0, 9, CLASSES]))  # the last one is the null label


def test_dit_layout_loads_and_matches_the_reference(tmp_path):
    sd = official_state_dict(0, learn_sigma=True)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(sd, path)
    model = load_official(path, "dit", num_heads=HEADS).eval()
    assert model.learn_sigma and model.out_channels == 2 * C
    x, t, y = inputs()
    t = torch.tensor([1, 500, 1000]) / 1000  # DDPM knots t_i = (i + 1) / 1000
    expected = reference_forward(sd, x, torch.tensor([0.0, 499.0, 999.0]), y)  # official index i
    torch.testing.assert_close(model(x, t, y), expected, atol=2e-5, rtol=2e-5)


def test_sit_layout_flips_time_and_velocity_sign(tmp_path):
    sd = official_state_dict(1, learn_sigma=True)  # SiT-XL-2-256x256.pt has 8 output channels; SiT keeps 4
    path = tmp_path / "sit.safetensors"
    save_file(sd, str(path))
    model = load_official(path, "sit", num_heads=HEADS).eval()
    assert not model.learn_sigma and model.out_channels == C
    x, t, y = inputs()
    # ours at t (0 data, 1 noise) = -(SiT velocity at s = 1 - t) (SiT: x_s = s data + (1 - s) noise)
    expected = -reference_forward(sd, x, 1 - t, y)[:, :C]
    torch.testing.assert_close(model(x, t, y), expected, atol=2e-5, rtol=2e-5)


def test_sit_velocity_becomes_our_velocity_on_a_linear_path():
    # A "SiT" whose output is exactly its linear-path velocity u_s = data - noise for a fixed pair: check the sign
    # bookkeeping with actual paths, independent of any network: x_t (ours) = (1 - t) data + t noise equals SiT's x_s
    # at s = 1 - t, and d x_t / dt = noise - data = -u_s.
    data, noise, t = torch.randn(5), torch.randn(5), torch.tensor(0.3)
    x_ours = (1 - t) * data + t * noise
    s = 1 - t
    assert torch.allclose(x_ours, s * data + (1 - s) * noise)
    u_sit = data - noise  # d/ds (s data + (1 - s) noise)
    v_ours = noise - data  # d/dt ((1 - t) data + t noise)
    assert torch.equal(v_ours, -u_sit)


@pytest.mark.parametrize("qknorm", [False, True], ids=["official-config", "qknorm"])
def test_lightningdit_layout_loads_and_matches_the_reference(tmp_path, qknorm):
    sd = official_state_dict(2, learn_sigma=False, lightning=True, qknorm=qknorm)
    path = tmp_path / "lightningdit.pt"
    # a train.py checkpoint: {"model", "ema", "opt", "args"} with DDP prefixes
    torch.save({"ema": {"module." + k: v for k, v in sd.items()}, "model": {}, "args": argparse.Namespace(a=1)}, path)
    model = load_official(path, "lightningdit", num_heads=None if qknorm else HEADS).eval()
    assert model.rope_cos is not None and model.blocks[0].mlp.w12.weight.shape == sd["blocks.0.mlp.w12.weight"].shape
    x, t, y = inputs()
    expected = -reference_forward(sd, x, 1 - t, y, lightning=True)
    torch.testing.assert_close(model(x, t, y), expected, atol=2e-5, rtol=2e-5)


def test_converted_keys_cover_the_model_exactly():
    sd = official_state_dict(3, learn_sigma=False, lightning=True, qknorm=True)
    ours, kwargs = convert_official_state_dict(sd, "lightningdit")
    assert kwargs["num_heads"] == HEADS and kwargs["use_qknorm"] and kwargs["use_rope"]
    assert "patch_embed.weight" in ours and "blocks.1.ada_ln.bias" in ours and "final_layer.norm.weight" in ours
    assert not any(k.startswith("feat_rope") for k in ours)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    sd = official_state_dict(4, learn_sigma=True)
    with pytest.raises(ValueError, match="format"):
        convert_official_state_dict(sd, "edm")
    with pytest.raises(ValueError, match="num_heads"):  # width 32 is no published model: heads must be given
        convert_official_state_dict(sd, "dit")
    broken = dict(sd)
    del broken["blocks.1.attn.proj.bias"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="blocks.1.attn.proj.bias"):
        load_official(tmp_path / "broken.pt", "dit", num_heads=HEADS)
    lightning = official_state_dict(5, learn_sigma=False, lightning=True)
    lightning["feat_rope.freqs_cos"] = lightning["feat_rope.freqs_cos"].flip(0)
    with pytest.raises(ValueError, match="feat_rope.freqs_cos"):
        convert_official_state_dict(lightning, "lightningdit", num_heads=HEADS)
