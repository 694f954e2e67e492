"""Latent perceptual loss (issue #15): the distance against a hand computation on a decoder built here, exactly 0 at
the target, the clean-latent estimate of every prediction type against the paths' closed forms, the frozen decoder
untouched by training, bit-exact resume with the loss on (switching on mid-run), process-split independence, and the
bad-input one-liners."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_decoder_losses_off import (
    fit_generator,
    generator_cfg,
    tiny_vae,
    weights_digest,
)

from ldm.config import ConfigError, load_config
from ldm.diffusion.lpl import lpl_distance, outlier_kernels
from ldm.diffusion.paths import get_path, prediction_target
from ldm.tokenizers.decoder_features import decoder_features
from ldm.tokenizers.stats import LatentNormalizer
from ldm.train.generator_terms import StepContext, _Estimate, build_generator_terms


# --------------------------------------------------------------------------------------------- a decoder built here
class _Block(nn.Module):
    """f(x) after an optional nearest x2 upsampling; called as diffusers' blocks are, (hidden, temb)."""

    def __init__(self, f, up: bool):
        super().__init__()
        self.f, self.up = f, up

    def forward(self, x, temb):
        assert temb is None
        return self.f(nn.functional.interpolate(x, scale_factor=2, mode="nearest") if self.up else x)


def _spike(side, i, j, width, value):
    p = torch.zeros(1, 3, side, side)
    p[0, 0, i:i + width, j:j + width] = value
    return p


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.conv_in.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).view(3, 2, 1, 1))
            self.conv_in.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
        self.mid_block = _Block(lambda x: 2 * x + 1, up=False)
        # each up block adds a fixed one-pixel spike to channel 0 (decoders have such high-norm activations): the
        # outliers the mask is there for
        self.up_blocks = nn.ModuleList([_Block(lambda x: torch.tanh(x) + _spike(16, 5, 6, 1, 20.0), up=True),
                                        _Block(lambda x: 0.5 * x + _spike(32, 10, 20, 4, 50.0), up=True)])
        self.conv_norm_out, self.conv_act, self.conv_out = nn.Identity(), nn.Identity(), nn.Identity()


class _TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = _TinyDecoder()
        self.post_quant_conv = None


def _hand_features(z):
    """The tiny decoder's blocks 0, 1, 2 in plain ops: conv_in, then 2x + 1, upsample + tanh, upsample + square."""
    h = torch.stack([z[:, 0], z[:, 1] + 0.5, z[:, 0] - z[:, 1] - 0.5], dim=1)
    mid = 2 * h + 1
    up0 = torch.tanh(mid.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    up0[:, 0, 5, 6] += 20.0
    up1 = 0.5 * up0.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    up1[:, 0, 10:14, 20:24] += 50.0
    return [mid, up0, up1]


def _hand_inliers(f, d):
    """The reference's outlier mask of one (H, W) map written with loops: order statistics by sorting, the map's
    Bessel std, dilation by a k_close window then erosion by a k_open one (windows clipped at the border)."""
    f = f.detach()
    n = f.numel()
    s = sorted(f.flatten().tolist())
    q_lo, q_hi = s[max(1, int(n * 0.02)) - 1], s[max(1, int(n * 0.98)) - 1]
    mean = sum(s) / n
    m = 2 * math.sqrt(sum((v - mean) ** 2 for v in s) / (n - 1))
    h, w = f.shape
    inl = [[1.0 if q_lo - m < float(f[i, j]) < q_hi + m else 0.0 for j in range(w)] for i in range(h)]
    k_open = math.ceil(5 / d)
    k_close = math.ceil(3 / d)
    k_open, k_close = (3 if k_open == 2 else k_open), (1 if k_close == 2 else k_close)

    def window(a, k, op):
        r = (k - 1) // 2
        return [[op(a[y][x] for y in range(max(0, i - r), min(h, i + r + 1)) for x in range(max(0, j - r),
                                                                                     min(w, j + r + 1)))
                 for j in range(w)] for i in range(h)]

    return window(window(inl, k_close, max), k_open, min)


def _hand_lpl(est_feats, tgt_feats, weights, downs):
    """Module docstring of ldm/diffusion/lpl.py, sample by sample, channel by channel, in float64 Python."""
    out = []
    for b in range(est_feats[0].shape[0]):
        total = 0.0
        for e_map, t_map, w, d in zip(est_feats, tgt_feats, weights, downs):
            chans = []
            for c in range(e_map.shape[1]):
                e, t = e_map[b, c].detach().double(), t_map[b, c].detach().double()
                vals = e.flatten().tolist()
                mu = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) + 1e-6
                mask = _hand_inliers(t, d) if d <= 2 else [[1.0] * e.shape[1] for _ in range(e.shape[0])]
                num = sum(mask[i][j] * (((float(e[i, j]) - mu) / sd) - ((float(t[i, j]) - mu) / sd)) ** 2
                          for i in range(e.shape[0]) for j in range(e.shape[1]))
                chans.append(num / max(sum(map(sum, mask)), 1.0))
            total += w * sum(chans) / len(chans)
        out.append(total / len(est_feats))
    return out


def test_outlier_kernels_follow_the_reference_rule():
    assert [outlier_kernels(d) for d in (1, 2, 4, 8)] == [(5, 3), (3, 1), (3, 1), (1, 1)]


def test_lpl_equals_a_hand_computation_on_a_decoder_built_here():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 2, 8, 8, generator=g)
    z_hat = z + 0.3 * torch.randn(z.shape, generator=g)
    ae = _TinyAutoencoder()
    tgt, est = decoder_features(ae, z, [0, 1, 2]), decoder_features(ae, z_hat, [0, 1, 2])
    for mine, hand in zip(tgt, _hand_features(z)):
        torch.testing.assert_close(mine, hand)
    # the tiny decoder's output is 32 px for 8 px latents: maps at 1/4 (unmasked), 1/2 and 1/1 of it; depth weights
    # are the inverse upscaling over the mid block, 1, 1/2, 1/4
    downs, weights = [4.0, 2.0, 1.0], [1.0, 0.5, 0.25]
    # the spikes are masked: at 1/2 resolution the pixel and its 3x3 neighbourhood (no closing, 3x3 erosion); at full
    # resolution the 4x4 patch closed by 3x3 (to 2x2) and eroded by 5x5 (to 6x6); the 2x2 echo of the first spike
    # is below the threshold there
    for block, d, zeros in ((1, 2.0, 9), (2, 1.0, 36)):
        mask = _hand_inliers(tgt[block][0, 0], d)
        assert sum(v == 0.0 for row in mask for v in row) == zeros
    got = lpl_distance(est, tgt, weights=weights, downsamples=downs)
    expected = torch.tensor(_hand_lpl(est, tgt, weights, downs), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # and through the training term: blocks "all", depth weights and downsampling factors derived from the shapes
    term = _lpl_term(ae, snr_min=0.0)
    ctx = _x0_ctx(z, z_hat)
    value, logs = term(ctx)
    torch.testing.assert_close(value, expected.mean(), rtol=1e-5, atol=1e-7)
    assert float(logs["lpl_frac"]) == 1.0


class _Tok(nn.Module):
    """What the terms read of a frozen Tokenizer: .model and .downsample."""

    def __init__(self, model, downsample=4):
        super().__init__()
        self.model, self.downsample = model, downsample


def _lpl_term(ae, **lpl):
    cfg = load_config(None, ["diffusion.lpl.enabled=true", "diffusion.prediction=x0",
                             *[f"diffusion.lpl.{k}={v}" for k, v in lpl.items()]])
    (term,) = build_generator_terms(cfg.diffusion, path=get_path("linear"), tokenizer=_Tok(ae),
                                    normalizer=LatentNormalizer("none", 2))
    return term


def _x0_ctx(x0, out, t=None, step=0):
    """A step whose network predicted x0 = `out` (prediction x0: the estimate is the output itself)."""
    t = torch.full((x0.shape[0],), 0.1) if t is None else t
    return StepContext(batch={}, step=step, x0=x0, x_t=x0, t=t, noise=torch.zeros_like(x0), out=out)


def test_lpl_is_exactly_zero_when_the_estimate_is_the_target():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 8, 8, generator=g)
    value, _ = _lpl_term(_TinyAutoencoder(), snr_min=0.0)(_x0_ctx(z, z.clone().requires_grad_(True)))
    assert value.item() == 0.0
    # the same on a diffusers AutoencoderKL's real blocks (mid + both up blocks)
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    vae = build_autoencoder_kl(latent_channels=2, block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4)
    feats = decoder_features(vae, z, [0, 1, 2])
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 8), (16, 16), (16, 16)]
    assert lpl_distance(feats, decoder_features(vae, z, [0, 1, 2]), weights=[1, 1, 1], downsamples=[2, 1, 1]).eq(0).all()


def test_lpl_gate_start_step_and_batch_mean():
    """Samples below snr_min add 0 but count in the batch mean; before start_step the term adds nothing at all."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 2, 8, 8, generator=g)
    z_hat = z + 0.5 * torch.randn(z.shape, generator=g)
    term = _lpl_term(_TinyAutoencoder(), snr_min=3.0, start_step=5)
    t = torch.tensor([0.2, 0.5])  # linear path SNR ((1 - t) / t)^2: 16 (on) and 1 (off)
    assert term(_x0_ctx(z, z_hat, t, step=4)) == (None, {})
    value, logs = term(_x0_ctx(z, z_hat, t, step=5))
    one, _ = term(_x0_ctx(z[:1], z_hat[:1], t[:1], step=5))
    torch.testing.assert_close(value, one / 2)
    assert float(logs["lpl_frac"]) == 0.5
    none, logs = term(_x0_ctx(z, z_hat, torch.tensor([0.6, 0.9]), step=5))
    assert none.item() == 0.0 and float(logs["lpl"]) == 0.0


@pytest.mark.parametrize("path_name", ["linear", "gvp", "ddpm_linear"])
@pytest.mark.parametrize("prediction", ["eps", "v", "velocity", "x0"])
def test_clean_latent_estimate_matches_the_closed_forms(path_name, prediction):
    """The terms' estimate (one code path: paths.x0_eps_from_prediction, then LatentNormalizer.denormalize) gives the
    true latent back from the ideal output, and equals each prediction's closed form written out here."""
    path = get_path(path_name)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9])  # on the DDPM path between its grid points: the interpolated schedule
    a, s = (c.float().view(-1, 1, 1, 1) for c in path.alpha_sigma(t.double()))
    x_t = a * x0 + s * eps
    out = prediction_target(prediction, x0, eps, t, path).float()
    if prediction == "eps":
        closed = (x_t - s * out) / a
    elif prediction == "v":
        closed = (a * x_t - s * out) / (a * a + s * s)  # alpha x_t - sigma v on VP paths
    elif prediction == "velocity":
        da, ds = (c.float().view(-1, 1, 1, 1) for c in (path.d_alpha(t.double()), path.d_sigma(t.double())))
        closed = (ds * x_t - s * out) / (a * ds - s * da)
        if path_name == "linear":
            torch.testing.assert_close(closed, x_t - t.view(-1, 1, 1, 1) * out, rtol=1e-5, atol=1e-5)
    else:
        closed = out
    norm = LatentNormalizer("channel", 2, mean=[0.5, -1.0], std=[2.0, 0.5])
    ctx = StepContext(batch={}, step=0, x0=x0, x_t=x_t, t=t, noise=eps, out=out)
    z_hat, z = _Estimate(path, prediction, norm)(ctx, torch.arange(4))
    torch.testing.assert_close(z_hat, norm.denormalize(closed), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_hat, z, rtol=1e-4, atol=1e-4)
    if path_name != "linear":  # VP paths: the familiar forms
        torch.testing.assert_close(closed, {"eps": (x_t - s * eps) / a, "v": a * x_t - s * out,
                                            "velocity": closed, "x0": out}[prediction], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors():
    foreign = _Tok(nn.Sequential(nn.Conv2d(2, 3, 1)))  # an imported decoder without named feature blocks
    for ae, blocks, match in ((foreign.model, "[]", "diffusion.lpl.blocks: the tokenizer's decoder"),
                              (_TinyAutoencoder(), "[0,3]", r"diffusion.lpl.blocks=\[0, 3\]: \[3\]; .* 0 \.\. 2"),
                              (_TinyAutoencoder(), "[-1]", r"diffusion.lpl.blocks=\[-1\]")):
        with pytest.raises(ValueError, match=match) as err:
            _lpl_term(ae, blocks=blocks)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"diffusion.lpl.block_weights=\[1.0\] has 1 entries for the 3 blocks"):
        _lpl_term(_TinyAutoencoder(), block_weights="[1.0]")
    from ldm.train.generator_task import build_generator_task

    cfg = load_config(None, ["diffusion.lpl.enabled=true", "data.latents=/nowhere"])
    with pytest.raises(ConfigError, match="diffusion.lpl.enabled=true needs the tokenizer's decoder: set "
                                          "tokenizer.checkpoint=") as err:
        build_generator_task(cfg)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- training
def _cfg(root, vae, name, *extra):
    return generator_cfg(root, vae, name, "diffusion.lpl.enabled=true", *extra)


_fit = fit_generator


def test_training_leaves_the_decoder_untouched_and_out_of_the_checkpoint(tmp_path):
    """10 steps with LPL and the pixel loss on every sample: the generator moves, the decoder's parameters get no
    gradient and stay bit-identical, and neither checkpoints nor optimizers hold them."""
    from ldm.runs import load_checkpoint
    from ldm.train.generator_task import build_generator_task
    from ldm.train.loop import fit

    vae = tiny_vae(tmp_path / "vae")
    cfg = _cfg(tmp_path, vae, "g", "train.max_steps=10", "train.ckpt_every=10", "diffusion.lpl.snr_min=0",
               "diffusion.pixel_loss.enabled=true", "diffusion.lpl.grad_checkpointing=true")
    torch.manual_seed(0)
    task, data = build_generator_task(cfg)
    decoder = {k: v.clone() for k, v in task.tokenizer.state_dict().items()}
    model = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit(cfg, task, data, progress=False)
    assert all(p.grad is None and not p.requires_grad for p in task.tokenizer.parameters())
    assert all(torch.equal(v, decoder[k]) for k, v in task.tokenizer.state_dict().items())
    assert not all(torch.equal(v, model[k]) for k, v in task.model.state_dict().items())
    ckpt = load_checkpoint(tmp_path / "g" / "checkpoints" / "step_0000010")
    assert {k.split(".")[0] for k in ckpt["model"]} == {"model", "normalizer"}
    n_params = sum(len(g["params"]) for g in ckpt["state"]["optimizers"]["model"]["param_groups"])
    assert n_params == len(list(task.model.parameters()))
    import json

    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/lpl"] > 0 and r["train/pixel"] > 0 and r["train/lpl_frac"] == 1.0 for r in rows)


def test_resume_with_lpl_on_is_bit_exact(tmp_path):
    """Stopped at step 2 and resumed to 4 equals 4 straight steps, with the loss switched on at step 3 (start_step)
    and eps-prediction on a DDPM path (the SNR gate keeps part of each batch)."""
    vae = tiny_vae(tmp_path / "vae")
    extra = ["diffusion.lpl.start_step=3", "diffusion.path=ddpm_linear", "diffusion.prediction=eps",
             "sample.sampler=ddim", "train.ckpt_every=2", "diffusion.lpl.snr_min=1.0"]
    _fit(_cfg(tmp_path, vae, "straight", "train.max_steps=4", *extra))
    _fit(_cfg(tmp_path, vae, "resumed", "train.max_steps=2", *extra))
    _fit(_cfg(tmp_path, vae, "resumed", "train.max_steps=4", *extra))
    straight = weights_digest(tmp_path / "straight" / "checkpoints" / "step_0000004")
    assert weights_digest(tmp_path / "resumed" / "checkpoints" / "step_0000004") == straight
    off = _cfg(tmp_path, vae, "plain", "train.max_steps=4", *extra)
    off.diffusion.lpl.enabled = False
    _fit(off)
    assert weights_digest(tmp_path / "plain" / "checkpoints" / "step_0000004") != straight  # the loss did act


def test_a_batch_split_in_halves_gives_the_same_loss(tmp_path):
    """Per-sample draws and a per-sample loss averaged over the batch: the loss of a batch is the mean of its halves'
    (as when two processes each take one), with LPL on, CFG label dropout and the SNR gate splitting the batch."""
    from ldm.train.generator_task import build_generator_task

    vae = tiny_vae(tmp_path / "vae")
    cfg = _cfg(tmp_path, vae, "g", "model.class_dropout=0.5", "diffusion.lpl.snr_min=1.0")
    task, data = build_generator_task(cfg)
    items = [data[(i, 0, 1000 + i)] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]
    whole = task(batch, step=0, phase="model")
    parts = [task(h, step=0, phase="model") for h in halves]
    assert 0.0 < whole.logs["lpl_frac"] < 1.0
    assert float(whole.loss.detach()) == pytest.approx(sum(float(p.loss.detach()) for p in parts) / 2, rel=1e-5)
    assert whole.logs["lpl"] == pytest.approx(sum(p.logs["lpl"] for p in parts) / 2, rel=1e-5)
    # the logged loss is what is optimised: the diffusion loss plus the weighted LPL (weight 1 here), not the former
    assert whole.logs["loss"] == pytest.approx(whole.logs["mse"] + cfg.diffusion.lpl.weight * whole.logs["lpl"],
                                               rel=1e-6)
    assert whole.logs["loss"] == float(whole.loss.detach())


def test_bench_decoder_losses_smoke(capsys):
    """bench/bench_decoder_losses.py --smoke: every variant runs and the table is printed (in-process, tiny sizes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_decoder_losses

    bench_decoder_losses.main(["--smoke", "--variants", "lpl", "pixel_ckpt"])
    out = capsys.readouterr().out
    assert "| plain | " in out and "| lpl | " in out and "| pixel_ckpt | " in out and "done: 3 variants" in out


def test_sd_vae_blocks_depth_weights_and_masked_maps_match_the_reference():
    """On SD-VAE's decoder (meta device: shapes only) "all blocks" are the mid block + 4 up blocks at 32, 64, 128, 256,
    256 px for 256 px images; the depth weights are the reference's 2^-min(l, 3) and the masked maps its blocks 2-4
    (d = 2, 1, 1)."""
    from ldm.diffusion.lpl import depth_weights
    from ldm.tokenizers.decoder_features import num_feature_blocks
    from ldm.tokenizers.kl import build_autoencoder_kl

    with torch.device("meta"):
        vae = build_autoencoder_kl()
        feats = decoder_features(vae, torch.zeros(1, 4, 32, 32), list(range(num_feature_blocks(vae))))
    assert [f.shape[-1] for f in feats] == [32, 64, 128, 256, 256]
    assert depth_weights([f.shape for f in feats], 32) == [2.0 ** -min(i, 3) for i in range(5)]
    assert [256 / f.shape[-1] <= 2 for f in feats] == [False, False, True, True, True]


_WORKER = """
import sys
sys.path.insert(0, {repo!r})
from ldm.config import load_config
from ldm.train.loop import fit
fit(load_config(None, ["stage=generator", "model.preset=DiT-Pico/2", "tokenizer.stats_num_images=64", "sample.steps=2",
                       "data.image_size=16", "train.batch_size=8", "train.max_steps=10", "train.log_every=10",
                       "train.ckpt_every=1000", "train.mixed_precision='no'", "train.ema=false", "optim.lr=1e-3",
                       "diffusion.lpl.enabled=true", "diffusion.lpl.snr_min=1.0", "diffusion.pixel_loss.enabled=true",
                       "diffusion.pixel_loss.t_max=0.5", "name=both", "train.run_root=" + sys.argv[1],
                       "tokenizer.pretrained=" + sys.argv[2]]), progress=False)
"""


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_weights_with_both_losses(tmp_path):
    """As tests/test_process_count.py, with LPL and the pixel loss on (SNR gate and time window splitting batches):
    one process with batch 8 and two gloo processes with 4 each give the same weights after 10 steps, up to float
    reduction order (slow-marked: two subprocess trainings)."""
    from conftest import REPO, run_python
    from safetensors.torch import load_file

    vae = tiny_vae(tmp_path / "vae")
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER.format(repo=str(REPO)))
    run_python([str(worker), str(tmp_path / "one"), str(vae)], timeout=900)
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path / "two"),
                      str(vae)], timeout=900)
    assert "2 processes" in two.stdout + two.stderr
    one, other = (load_file(str(tmp_path / r / "both" / "checkpoints" / "step_0000010" / "model.safetensors"))
                  for r in ("one", "two"))
    assert max(float((one[k].double() - other[k].double()).abs().max()) for k in one) < 2e-5
