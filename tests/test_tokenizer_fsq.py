"""FSQ (ldm/tokenizers/fsq.py; Mentzer et al. 2024, arXiv:2309.15505): the reference notebook's worked example, codes
on the level grid, index <-> code round trips for every code of the paper's level sets, straight-through gradients,
code-usage statistics on constructed cases, bad levels / image sizes / regularisers named in one line, and a tiny FSQ
tokenizer trained -> exported -> loaded -> cached -> a generator trained on its latents."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from ldm.config import ConfigError, load_config
from ldm.tokenizers.fsq import (
    FSQAutoencoder,
    codes_to_indices,
    fsq_bound,
    fsq_quantize,
    implicit_codebook,
    indices_to_codes,
    round_ste,
)

# the paper's recommended levels per target codebook size 2^bits (its Sec. 4 table)
PAPER_LEVELS = {8: [8, 6, 5], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5]}
TINY = ["stage=tokenizer", "data.image_size=16", "data.class_cond=false", "tokenizer.kind=fsq",
        "tokenizer.block_out_channels=[16,16]", "tokenizer.norm_num_groups=8", "tokenizer.layers_per_block=1",
        "tokenizer.mid_block_attention=false", "tokenizer.latent_channels=16", "tokenizer.fsq.levels=[5,4,3]",
        "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1", "train.batch_size=8", "train.log_every=1",
        "optim.name=adam", "optim.lr=1e-3", "optim.betas=[0.5,0.9]"]


# ------------------------------------------------------------------------------------------------------ maths
def test_the_reference_notebooks_example():
    """google-research fsq.ipynb: FSQ([3, 5, 4]) on z = [0.25, 0.6, -7]. By hand: L=3: 0.999 tanh(0.25) = 0.245 -> 0;
    L=5: 1.998 tanh(0.6) = 1.073 -> 1 -> 1/2; L=4 (offset 0.5): 1.4985 tanh(-7 + tan(0.5/1.4985)) - 0.5 = -1.998 -> -2
    -> -2/2. Index: digits (0+1, 1+2, -2+2) = (1, 3, 0) with basis (1, 3, 15): 1 + 9 + 0 = 10."""
    levels = torch.tensor([3, 5, 4])
    codes = fsq_quantize(torch.tensor([0.25, 0.6, -7.0]), levels)
    assert codes.tolist() == [0.0, 0.5, -1.0]
    assert int(codes_to_indices(codes, levels)) == 10
    assert indices_to_codes(torch.tensor(10), levels).tolist() == [0.0, 0.5, -1.0]


@pytest.mark.parametrize("levels", [[2], [3, 4], *PAPER_LEVELS.values()], ids=str)
def test_codes_lie_on_the_level_grid_and_reach_every_level(levels):
    lv = torch.tensor(levels)
    z = torch.randn(20000, len(levels), generator=torch.Generator().manual_seed(0)) * 3
    z = torch.cat([z, torch.full((1, len(levels)), 50.0), torch.full((1, len(levels)), -50.0)])
    codes = fsq_quantize(z, lv)
    for i, n in enumerate(levels):
        half = n // 2
        steps = codes[:, i] * half
        assert torch.equal(steps, steps.round())  # on the grid k / floor(L/2)
        # L values: -floor(L/2) .. L - 1 - floor(L/2) (odd: symmetric; even: one more below zero)
        assert sorted(set(steps.round().long().tolist())) == list(range(-half, n - half))
    assert codes.min() >= -1 and codes.max() <= 1


def test_bound_matches_the_paper_formula():
    """Odd L: f(z) = floor(L/2) tanh(z) times the reference's (1 - eps); even L: f(0) = 0 (up to tan vs atanh,
    O(x^5)) and f(+-inf) = +-(L - 1)(1 - eps) / 2 - 1/2."""
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    f5 = fsq_bound(z.unsqueeze(-1), torch.tensor([5])).squeeze(-1)
    torch.testing.assert_close(f5, 2 * (1 - 1e-3) * torch.tanh(z), rtol=0, atol=1e-12)
    f8 = fsq_bound(torch.tensor([[0.0], [1e3], [-1e3]], dtype=torch.float64), torch.tensor([8])).squeeze(-1)
    half_l = 7 * (1 - 1e-3) / 2
    assert abs(float(f8[0])) < 1e-4
    assert float(f8[1]) == pytest.approx(half_l - 0.5) and float(f8[2]) == pytest.approx(-half_l - 0.5)


@pytest.mark.parametrize("bits", sorted(PAPER_LEVELS))
def test_index_code_round_trip_for_every_code(bits):
    levels = PAPER_LEVELS[bits]
    lv = torch.tensor(levels)
    k = math.prod(levels)
    assert 0.9 < k / 2 ** bits < 1.1  # the table's sets are near their target sizes
    book = implicit_codebook(lv)  # (K, d)
    assert book.shape == (k, len(levels))
    assert torch.equal(codes_to_indices(book, lv), torch.arange(k))
    assert len(torch.unique(book, dim=0)) == k
    # every code is reached: z with bound(z) = 0.99 * code * floor(L/2) (inverting tanh) quantises to that code
    half = (lv // 2).double()
    half_l = (lv - 1).double() * (1 - 1e-3) / 2
    offset = (lv % 2 == 0).double() * 0.5
    z = torch.atanh((0.99 * book.double() * half + offset) / half_l) - torch.tan(offset / half_l)
    assert torch.equal(fsq_quantize(z, lv).float(), book)
    if k <= 1000:  # an independent enumeration: channel 0 varies fastest (mixed radix, basis 1, L0, L0 L1, ...)
        grid = [[(d - n // 2) / (n // 2) for d, n in zip(digits[::-1], levels)]
                for digits in itertools.product(*[range(n) for n in levels[::-1]])]
        assert torch.equal(book, torch.tensor(grid, dtype=torch.float32))


def test_gradients_pass_straight_through():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64)
    (g,) = torch.autograd.grad((w * round_ste(x)).sum(), x)
    assert torch.equal(g, w)  # d round_ste(x) / dx = identity
    # through the whole quantiser: d/dz [half_l tanh(z + shift) - offset] / floor(L/2), computed here with math
    levels = [8, 5]
    z = torch.tensor([[0.3, -0.7], [1.5, 0.1]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fsq_quantize(z, torch.tensor(levels)).sum(), z)
    for (i, j), zij in np.ndenumerate(z.detach().numpy()):
        n = levels[j]
        half_l = (n - 1) * (1 - 1e-3) / 2
        shift = math.tan((0.5 if n % 2 == 0 else 0.0) / half_l)
        assert float(g[i, j]) == pytest.approx(half_l * (1 - math.tanh(zij + shift) ** 2) / (n // 2), rel=1e-12)


def test_the_autoencoder_trains_its_encoder_through_the_quantiser():
    torch.manual_seed(0)
    ae = FSQAutoencoder(block_out_channels=[8, 8], levels=[8, 5, 5, 5], layers_per_block=1, norm_num_groups=4,
                        mid_block_attention=False, z_channels=8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    rec, q = ae(x)
    assert q.codes.shape == (2, 4, 4, 4) and q.indices.shape == (2, 4, 4) and rec.shape == x.shape
    rec.square().mean().backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0 and ae.quant_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(q.indices), ae.decode(q.codes), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ usage
def test_usage_and_perplexity_of_a_constructed_index_set():
    """Codes hit 2, 1 and 1 times of 1000: usage 3/1000; perplexity exp(-(1/2 ln 1/2 + 2 * 1/4 ln 1/4)) = 2^1.5."""
    from ldm.eval.latents import codebook_stats

    lv = torch.tensor([8, 5, 5, 5])
    codes = torch.tensor([[0.75, -1.0, 0.0, 1.0], [0.75, -1.0, 0.0, 1.0], [-1.0, -1.0, -1.0, -1.0],
                          [0.0, 0.5, -0.5, 0.0]])
    stats = codebook_stats(codes_to_indices(codes, lv).view(1, 2, 2), 1000)
    assert stats["codes_used"] == 3 and stats["usage"] == pytest.approx(0.003)
    assert stats["perplexity"] == pytest.approx(2 ** 1.5, rel=1e-6)
    # digits (7, 0, 2, 4) -> 7 + 8 * 0 + 40 * 2 + 200 * 4 = 887; (0,0,0,0) -> 0; (4, 3, 1, 2) -> 4 + 24 + 40 + 400
    assert stats["counts"][887] == 2 and stats["counts"][0] == 1 and stats["counts"][468] == 1


def test_eval_latents_and_training_logs_report_the_code_usage(tmp_path):
    """An encoder whose projection is constant (weights 0, bias (+10, -10, 0, +10)) maps every position to the code
    (3/4, -1, 0, 1) = index 887: one code of 1000 used, perplexity 1."""
    from ldm.eval.latents import diagnose_tokenizer
    from ldm.tokenizers.export import Tokenizer
    from ldm.tokenizers.kinds import get_kind

    torch.manual_seed(0)
    ae = FSQAutoencoder(block_out_channels=[8, 8], levels=[8, 5, 5, 5], layers_per_block=1, norm_num_groups=4,
                        mid_block_attention=False, z_channels=8)
    with torch.no_grad():
        ae.quant_conv.weight.zero_()
        ae.quant_conv.bias.copy_(torch.tensor([10.0, -10.0, 0.0, 10.0]))
    tok = Tokenizer(ae)
    res = diagnose_tokenizer(tok, "digits", image_size=16, num_images=4, batch_size=4, scales=(0.5,))
    cb = res["codebook"]
    assert cb["codebook_size"] == 1000 and cb["codes_used"] == 1 and cb["counts"][887] == 4 * 8 * 8
    assert cb["usage"] == pytest.approx(1e-3) and cb["perplexity"] == pytest.approx(1.0)
    enc = get_kind("fsq").encode_train(ae, torch.zeros(2, 3, 16, 16), cfg=None, draws=None)
    assert float(enc.loss) == 0.0 and enc.logs["fsq_usage"] == pytest.approx(1e-3)
    assert enc.logs["fsq_perplexity"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_levels_are_named_at_load_and_in_the_cli(capsys):
    from ldm.cli import main

    for bad in ("[8,1]", "[8,2.5]", "[]", "[a,5]"):
        with pytest.raises(ConfigError, match=r"^tokenizer\.fsq\.levels=.*expected a non-empty list of integers >= 2"):
            load_config(overrides=[f"tokenizer.fsq.levels={bad}"])
    with pytest.raises(ValueError, match="integers >= 2"):
        FSQAutoencoder(block_out_channels=[8], levels=[8, 1])
    assert main(["train", "--no-progress", *TINY, "tokenizer.fsq.levels=[8,1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.fsq.levels=[8, 1]" in err


def test_image_size_not_divisible_by_the_downsampling_factor():
    from ldm.tokenizers.export import build_tokenizer

    f4 = [*TINY, "tokenizer.block_out_channels=[16,16,16]"]  # 3 levels: downsampling factor 4
    with pytest.raises(ConfigError, match="data.image_size=18 is not divisible by the tokenizer's downsampling "
                                          "factor 4"):
        load_config(overrides=[*f4, "data.image_size=18"])
    cfg = load_config(overrides=f4)
    with pytest.raises(ValueError, match="^data.image_size=18 is not divisible by the tokenizer's downsampling "
                                         "factor 4; choose a multiple of 4$"):
        build_tokenizer(cfg.tokenizer, 18)


def test_an_unsupported_regulariser_is_named_with_the_kinds_it_applies_to():
    from ldm.tokenizers.kinds import KINDS
    from ldm.train.tokenizer_task import build_tokenizer_task

    kinds = sorted(k.name for k in KINDS.values() if "va" in k.regularisers)
    assert "fsq" not in kinds and "kl" in kinds
    cfg = load_config(overrides=[*TINY, "tokenizer.va.enabled=true", "tokenizer.va.encoder=digits"])
    with pytest.raises(ValueError) as err:
        build_tokenizer_task(cfg)
    assert str(err.value) == (f"tokenizer.va.enabled=true: the va regulariser does not apply to fsq tokenizers (it "
                              f"applies to tokenizer.kind in {kinds}); set tokenizer.va.enabled=false")
    eq = ["tokenizer.eq.enabled=true", "tokenizer.eq.scale_num_min=16"]  # EQ-VAE applies to FSQ
    task, _ = build_tokenizer_task(load_config(overrides=[*TINY, *eq]))
    assert [r.name for r in task.regularisers] == ["eq"]


# ------------------------------------------------------------------------------------------------------ end to end
def test_train_export_load_cache_and_a_generator_trains(tmp_path):
    from ldm.cli import main
    from ldm.data.latents import build_latent_cache, read_cache_meta
    from ldm.tokenizers import export_tokenizer, load_tokenizer
    from ldm.tokenizers.stats import compute_tokenizer_stats
    from ldm.train import generator_task
    from ldm.train.loop import fit

    assert main(["train", "--no-progress", *TINY, "name=fsq", f"train.run_root={tmp_path}", "train.max_steps=3",
                 "train.ckpt_every=3", "tokenizer.disc_start=0"]) == 0
    compute_tokenizer_stats(tmp_path / "fsq", load_config(overrides=TINY).data, num_images=64, batch_size=64)
    run = load_tokenizer(tmp_path / "fsq")
    assert run.stats is not None and len(run.stats.mean) == 3
    assert run.kind == "fsq" and run.family == "quantised" and run.latent_channels == 3 and run.downsample == 2
    out = export_tokenizer(tmp_path / "fsq", tmp_path / "export")
    assert json.loads((out / "tokenizer_config.json").read_text())["config"]["levels"] == [5, 4, 3]
    tok = load_tokenizer(out)
    assert tok.fingerprint == run.fingerprint
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(tok.encode(x), run.encode(x)) and torch.equal(tok.encode_indices(x), run.encode_indices(x))
    assert torch.equal(tok.decode(tok.encode(x)), run.decode(run.encode(x)))

    meta = build_latent_cache(tok, "digits", tmp_path / "cache", image_size=16, flips=False, batch_size=64,
                              shard_size=256, progress=False)
    assert meta.tokenizer_kind == "fsq" and meta.latent_shape == [3, 8, 8]
    latents = np.concatenate([np.load(p) for p in sorted((tmp_path / "cache").glob("shard_*.latents.npy"))])
    half = np.array([2, 2, 1]).reshape(1, 3, 1, 1)  # floor(L/2) of levels [5, 4, 3]: the cache holds grid codes
    np.testing.assert_array_equal(latents * half, np.round(latents * half))

    gen = ["name=g", f"train.run_root={tmp_path}", f"tokenizer.checkpoint={out}", f"data.latents={tmp_path / 'cache'}",
           "data.image_size=16", "tokenizer.kind=fsq", "tokenizer.fsq.levels=[5,4,3]", "model.preset=DiT-Pico/2",
           "train.batch_size=32", "train.max_steps=30", "train.log_every=10", "train.ckpt_every=1000",
           "optim.lr=2e-3", "sample.steps=2",
           "diffusion.latent_norm=scalar"]  # 3 tokenizer steps leave the L=3 channel constant: its std is 0
    result = fit(load_config(None, gen), progress=False)
    losses = [r["train/loss"] for r in map(json.loads, (tmp_path / "g" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert result.step == 30 and losses[-1] < losses[0], losses
    # the cache decides the channels: levels of another length are refused, naming the key
    with pytest.raises(ConfigError, match=r"tokenizer\.fsq\.levels=\[8, 5, 5, 5\] but the cache holds 3-channel "
                                          r"latents: set tokenizer\.fsq\.levels=a list of 3"):
        generator_task._refuse_contradicting_keys(load_config(None, [*gen, "tokenizer.fsq.levels=[8,5,5,5]"]),
                                                  read_cache_meta(tmp_path / "cache"))


def test_resume_is_bit_exact(tmp_path):
    """2 + 2 steps (re-running the command resumes) == 4 steps: weights and discriminator (model.safetensors), EMA,
    both optimizers' states and the RNG states, with the GAN on from step 1 (the quantiser itself has no state: its
    levels are fixed buffers)."""
    from safetensors.torch import load_file

    from ldm.cli import main

    def equal(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
        return a == b

    common = [*TINY, f"train.run_root={tmp_path}", "train.ckpt_every=2", "tokenizer.disc_start=1", "--no-progress"]
    assert main(["train", *common, "name=whole", "train.max_steps=4"]) == 0
    assert main(["train", *common, "name=split", "train.max_steps=2"]) == 0
    assert main(["train", *common, "name=split", "train.max_steps=4"]) == 0
    whole, split = (tmp_path / name / "checkpoints" / "step_0000004" for name in ("whole", "split"))
    files = sorted(p.name for p in whole.glob("*.safetensors"))
    assert {"model.safetensors", "ema.safetensors"} <= set(files)
    for f in files:
        a, b = load_file(str(whole / f)), load_file(str(split / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    a, b = (torch.load(d / "state.pt", map_location="cpu", weights_only=False) for d in (whole, split))
    assert a["optimizers"].keys() == {"gen", "disc"} and a["optimizers"]["disc"]["state"]
    for key in ("step", "data_position", "optimizers", "schedulers", "rng"):
        assert equal(a[key], b[key]), key
    logs = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_g" in r for r in logs)  # the GAN did run
