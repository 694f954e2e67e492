"""DiT / LightningDiT network (ldm/models/dit.py)."""

import pytest
import torch

from ldm.models.dit import DIT_PRESETS, DiT, build_dit

LIGHTNING = dict(use_swiglu=True, use_rmsnorm=True, use_rope=True, use_qknorm=True)


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return DiT(**{**args, **kw})


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("switches", [{}, LIGHTNING], ids=["dit", "lightning"])
def test_adaln_zero_blocks_are_identity_at_init(switches):
    torch.manual_seed(0)
    model = tiny(**switches).eval()
    x = torch.randn(3, 16, 32)
    c_act = torch.randn(3, 32)
    rope = (model.rope_cos, model.rope_sin) if model.rope_cos is not None else None
    for block in model.blocks:
        assert torch.equal(block(x, c_act, rope), x)
    xb, t, y = inputs()
    assert torch.equal(model(xb, t, y), torch.zeros(3, 4, 8, 8))  # zero-init output layer


def test_learned_sigma_output_and_hidden_shapes():
    model = tiny(learn_sigma=True, repa_depth=1).eval()
    x, t, y = inputs()
    out, hidden = model(x, t, y, return_hidden=True)
    assert out.shape == (3, 8, 8, 8) and model.out_channels == 8
    assert hidden.shape == (3, 16, 32)  # (B, L = (8/2)^2, D)
    with pytest.raises(ValueError, match="repa_depth"):
        tiny()(x, t, y, return_hidden=True)
    with pytest.raises(ValueError, match="repa_depth"):
        tiny(repa_depth=3)


def test_hidden_is_the_output_of_block_k():
    torch.manual_seed(0)
    model = tiny(repa_depth=1).eval()
    for p in model.parameters():  # leave the zero init so blocks are not the identity
        p.data.normal_(0, 0.1)
    x, t, y = inputs()
    captured = []
    model.blocks[0].register_forward_hook(lambda m, a, o: captured.append(o))
    _, hidden = model(x, t, y, return_hidden=True)
    assert torch.equal(hidden, captured[0])


def test_label_dropout_rate_only_in_training_and_reproducible():
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=10,
                class_dropout_prob=0.1)
    seen = []
    model.y_embedder.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    B = 10000
    x, t = torch.zeros(B, 4, 4, 4), torch.full((B,), 0.5)
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(x, t, y, generator=torch.Generator().manual_seed(1))
        model(x, t, y, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        model(x, t, y)
        torch.manual_seed(5)
        model(x, t, y)
        model.eval()
        model(x, t, y)
        model(x, t, y, force_drop=torch.ones(B, dtype=torch.bool))
    rate = (seen[0] == 10).float().mean().item()
    assert abs(rate - 0.1) < 0.015  # std of the rate is 0.003
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])  # same generator / global seed
    assert torch.equal(seen[4], y)  # eval: no dropout
    assert seen[5].eq(10).all()  # forced to the null label


def test_xl2_parameter_count_matches_the_reference():
    # facebookresearch/DiT models.py DiT_XL_2(input_size=32, num_classes=1000, learn_sigma=True) has 675,129,632
    # parameters as its train.py counts them, pos_embed (256 x 1152 = 294,912) included as a frozen Parameter;
    # ours keeps pos_embed as a buffer.
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, num_classes=1000, learn_sigma=True)
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == 674_834_720
    assert trainable + model.pos_embed.numel() == 675_129_632


def test_every_preset_builds_and_the_small_ones_run():
    for name in DIT_PRESETS:
        with torch.device("meta"):
            model = build_dit(name, input_size=32)
        assert model.blocks[0].attn.qkv.weight.shape[0] == 3 * model.hidden_size
    for name in ("DiT-Pico/1", "DiT-Pico/2", "DiT-Pico/4", "LightningDiT-Pico/2", "DiT-Ti/2"):
        model = build_dit(name, input_size=8, num_classes=10).eval()
        x, t, y = inputs()
        assert model(x, t, y).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    ref = tiny(**LIGHTNING).train()
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    ckpt = tiny(**LIGHTNING, grad_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    drop = torch.zeros(3, dtype=torch.bool)
    outs = []
    for m in (ref, ckpt):
        out = m(x, t, y, force_drop=drop)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_unconditional_model_and_null_labels():
    torch.manual_seed(0)
    model = tiny(num_classes=0).eval()
    x, t, y = inputs()
    assert model.y_embedder is None and model(x, t).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, y)
    cond = tiny().eval()
    for p in cond.parameters():
        p.data.normal_(0, 0.1)
    torch.testing.assert_close(cond(x, t, None), cond(x, t, torch.full((3,), 10)))
    torch.testing.assert_close(cond(x, t[0], y), cond(x, t[0].expand(3), y))  # scalar t broadcasts


def test_time_map_feeds_shift_plus_scale_times_t():
    torch.manual_seed(0)
    a = tiny(t_scale=-1.0, t_shift=1.0).eval()
    b = tiny(t_scale=1.0, t_shift=0.0).eval()
    for p in a.parameters():
        p.data.normal_(0, 0.1)
    b.load_state_dict(a.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(a(x, t, y), b(x, 1 - t, y))


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="expected \\(B, 4, 8, 8\\)"):
        model(torch.zeros(3, 4, 6, 6), t, y)
    with pytest.raises(ValueError, match="t has shape"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="divisible"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="attn_backend"):
        tiny(attn_backend="flash")


def test_xformers_backend_needs_xformers():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            tiny(attn_backend="xformers")
    else:  # installed: the two backends must agree
        ref = tiny(**LIGHTNING).eval()
        xf = tiny(**LIGHTNING, attn_backend="xformers").eval()
        xf.load_state_dict(ref.state_dict())
        x, t, y = inputs()
        torch.testing.assert_close(ref(x, t, y), xf(x, t, y))


def test_seeded_builds_are_identical():
    torch.manual_seed(3)
    a = tiny(**LIGHTNING).state_dict()
    torch.manual_seed(3)
    b = tiny(**LIGHTNING).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ attention backends
def _randomised(model):
    for p in model.parameters():  # leave the zero init, so attention shapes the output
        p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model.eval()


def test_math_attention_is_the_textbook_formula():
    from ldm.models.layers import ATTENTION_BACKENDS

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))  # (B, H, L, Dh)
    expected = torch.empty(2, 5, 3 * 4, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            w = torch.exp(q[b, h] @ k[b, h].T / 2.0)  # sqrt(Dh) = 2
            expected[b, :, 4 * h:4 * h + 4] = (w / w.sum(-1, keepdim=True)) @ v[b, h]
    torch.testing.assert_close(ATTENTION_BACKENDS["math"](q, k, v), expected)
    torch.testing.assert_close(ATTENTION_BACKENDS["sdpa"](q, k, v), expected)


@pytest.mark.parametrize("switches", [{}, LIGHTNING], ids=["dit", "lightning"])
def test_sdpa_and_math_backends_agree(switches):
    torch.manual_seed(0)
    sdpa = _randomised(tiny(**switches))
    math_ = tiny(**switches, attn_backend="math").eval()
    math_.load_state_dict(sdpa.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        ref = sdpa(x, t, y)
        torch.testing.assert_close(math_(x, t, y), ref, rtol=1e-5, atol=1e-5)  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = math_(x, t, y).float(), sdpa(x, t, y).float()
    scale = float(ref.abs().max())  # bf16 keeps 8 bits of mantissa: agree to about 1% of the output's range
    assert float((a - b).abs().max()) <= 0.02 * scale and float((a - ref).abs().max()) <= 0.02 * scale


def test_model_attention_reaches_the_dit_and_xformers_needs_its_extra():
    import dataclasses

    from ldm.config import ModelCfg
    from ldm.models import build_generator_model
    from ldm.models.layers import ATTENTION_BACKENDS

    field = {f.name: f for f in dataclasses.fields(ModelCfg)}["attention"]
    assert set(field.metadata["choices"]) == set(ATTENTION_BACKENDS) and field.default == "sdpa"
    build = dict(latent_channels=4, latent_size=8, num_classes=10)
    net = build_generator_model(ModelCfg(preset="DiT-Pico/2", attention="math"), **build)
    assert {block.attn.backend for block in net.blocks} == {"math"}
    assert {block.attn.backend for block in build_generator_model(ModelCfg(preset="DiT-Pico/2"), **build).blocks} \
        == {"sdpa"}
    with pytest.raises(ValueError, match="model.arch=dit"):
        build_generator_model(ModelCfg(arch="unet", attention="math"), **build)
    try:
        import xformers.ops  # noqa: F401
    except ImportError:  # a ValueError (the CLI's one-line user error) that names the install command
        from ldm.cli.common import is_user_error, one_line

        with pytest.raises(ValueError, match=r"pip install 'ldm\[xformers\]'") as err:
            build_generator_model(ModelCfg(preset="DiT-Pico/2", attention="xformers"), **build)
        assert is_user_error(err.value) and "\n" not in one_line(err.value)
    else:
        assert build_generator_model(ModelCfg(preset="DiT-Pico/2", attention="xformers"), **build) is not None
