"""stage end_to_end (REPA-E, ldm/train/end_to_end_task.py): the latent batch norm against torch's BatchNorm2d, where
gradients flow in the joint step, the tokenizer loss composed by hand, bad input, resume (in-process and after
SIGKILL), 1 vs 2 processes, and the second phase (export -> latent cache -> generator stage).

Run as a script (`python tests/test_end_to_end.py RUN_ROOT NAME [key=value ...]`), this file is the worker of the
subprocess tests: it trains one joint run (E2E_STEP_SLEEP slows each phase, so a test can kill it mid-run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["stage=end_to_end", "data.image_size=16", "train.batch_size=8", "train.mixed_precision='no'",
        "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0", "train.keep_last=10",
        "tokenizer.latent_channels=4", "tokenizer.block_out_channels=[16,16]", "tokenizer.norm_num_groups=8",
        "tokenizer.layers_per_block=1", "tokenizer.mid_block_attention=false", "tokenizer.perceptual_weight=0",
        "tokenizer.disc_layers=1", "tokenizer.disc_weight=0.1", "tokenizer.disc_adaptive=false",
        "tokenizer.disc_start=0", "tokenizer.stats_num_images=32", "model.preset=DiT-Pico/2", "diffusion.repa=true",
        "diffusion.repa_encoder=digits", "diffusion.repa_depth=1", "diffusion.repa_proj_dim=32", "sample.steps=2"]


def _cfg(root, name, *extra):
    from ldm.config import load_config

    return load_config(None, [*TINY, f"name={name}", f"train.run_root={root}", *extra])


def _fit(root, name, *extra):
    from ldm.train.loop import fit

    return fit(_cfg(root, name, *extra), progress=False)


def _batch(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "label": torch.arange(n) % 10,
            "sample_seed": torch.arange(n, dtype=torch.int64) + 100 * seed}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from ldm.train.end_to_end_task import build_end_to_end_task

    torch.manual_seed(0)
    return build_end_to_end_task(_cfg(tmp_path_factory.mktemp("task"), "t"))[0]


# ------------------------------------------------------------------------------------------------ the batch norm
def test_latent_bn_is_torch_batchnorm2d_without_affine():
    from ldm.models.latent_bn import LatentBatchNorm

    g = torch.Generator().manual_seed(0)
    ours, ref = LatentBatchNorm(3), torch.nn.BatchNorm2d(3, eps=1e-4, momentum=0.1, affine=False)
    mean, std = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 2.0, 1.5])
    ours.init_stats(mean, std)
    ref.running_mean.copy_(mean)
    ref.running_var.copy_(std.square())  # REPA-E init_bn: running_var = (1 / latents_scale)^2
    assert torch.equal(ours.running_var.detach(), std.square())
    for _ in range(3):  # training: batch statistics, running statistics updated (unbiased variance)
        x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean.detach(), ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var.detach(), ref.running_var, rtol=1e-6, atol=1e-6)
    ours.eval()
    ref.eval()
    before = ours.running_mean.detach().clone(), ours.running_var.detach().clone()
    x = torch.randn(2, 3, 5, 5, generator=g)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    expected = (x - before[0].view(1, -1, 1, 1)) / torch.sqrt(before[1].view(1, -1, 1, 1) + 1e-4)  # by hand
    torch.testing.assert_close(ours(x), expected)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])  # frozen in eval
    assert not ours.running_mean.requires_grad and not ours.running_var.requires_grad


def test_bn_starts_from_the_pretrained_tokenizers_statistics_and_ema_averages_it(tmp_path):
    from ldm.tokenizers.export import fingerprint
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.tokenizers.stats import LatentStats, save_latent_stats
    from ldm.train.ema import EMA
    from ldm.train.end_to_end_task import build_end_to_end_task

    torch.manual_seed(0)
    vae = build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1, norm_num_groups=8,
                               mid_block_attention=False)
    vae.save_pretrained(tmp_path / "vae")
    mean, std = [0.1, -0.2, 0.3, 0.4], [0.5, 1.5, 2.0, 0.25]
    save_latent_stats(LatentStats(mean=mean, std=std, scaling_factor=1.0, num_images=10,
                                  fingerprint=fingerprint(vae)), tmp_path / "vae")
    task, _ = build_end_to_end_task(_cfg(tmp_path, "bn", f"tokenizer.pretrained={tmp_path / 'vae'}"))
    bn = task.generator.bn
    assert bn.running_mean.tolist() == pytest.approx(mean) and bn.running_var.tolist() == pytest.approx(
        [s * s for s in std])
    assert (bn.eps, bn.momentum) == (1e-4, 0.1)
    ema = EMA(task.ema_module(), decay=0.9)  # the loop's EMA: the statistics are averaged like weights (REPA-E L85-96)
    bn.train()
    bn(torch.randn(8, 4, 8, 8) * 3 + 2)
    live = bn.running_mean.detach().clone()
    ema.update(task.ema_module(), step=100)
    torch.testing.assert_close(ema.model.bn.running_mean, 0.9 * torch.tensor(mean) + 0.1 * live)


# ------------------------------------------------------------------------------------------------ gradients
def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def test_where_gradients_flow_in_the_joint_step(task):
    task.zero_grad(set_to_none=True)
    batch = _batch()
    out = task(batch, step=0, phase="tokenizer", micro=0)
    out.loss.backward()
    enc = _grads(task.autoencoder.encoder)
    assert all(g is not None for g in enc.values()) and any(g.abs().sum() > 0 for g in enc.values())
    for part in (task.generator, task.projector, task.discriminator):  # frozen in the tokenizer phase
        assert all(g is None for g in _grads(part).values())
    task.zero_grad(set_to_none=True)

    # the alignment alone reaches the encoder through z; nothing reaches the generator
    z = task._cache[0]["z"].clone().requires_grad_(True)
    align, _ = task.frozen_alignment(z, batch["label"], task._cache[0]["feats"])
    (gz,) = torch.autograd.grad(align, z)
    assert gz.abs().sum() > 0

    seen = {}
    hook = task.generator.bn.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    task(batch, step=0, phase="disc", micro=0).loss.backward()
    assert all(g is None for g in _grads(task.autoencoder).values())
    task.zero_grad(set_to_none=True)
    out = task(batch, step=0, phase="model", micro=0)
    hook.remove()
    out.loss.backward()
    assert not seen["z"].requires_grad and seen["z"].grad_fn is None  # the generator update sees detached latents
    assert all(g is None for g in _grads(task.autoencoder).values())  # exactly no diffusion gradient in the tokenizer
    net = _grads(task.generator.net)
    assert any(g is not None and g.abs().sum() > 0 for g in net.values())
    assert all(g is not None for g in _grads(task.projector).values())
    task.zero_grad(set_to_none=True)


def test_tokenizer_loss_is_repae_composition(task):
    """L_tok = mean|x - x^| + 1e-6 KL + 0.1 (-mean D(x^)) + 1.5 L_REPA (configs/l1_lpips_kl_gan.yaml, train_repae.py
    L389), each term recomputed here from the step's own tensors."""
    import torch.nn.functional as F

    from ldm.tokenizers.kl import encode_posterior

    batch = _batch(seed=1)
    with torch.no_grad():
        logs = task(batch, step=0, phase="tokenizer", micro=0).logs
        c = task._cache.pop(0)
        post = encode_posterior(task.autoencoder, batch["image"])
        kl = (0.5 * (post.mean ** 2 + post.logvar.exp() - 1 - post.logvar)).sum((1, 2, 3)).mean()
        rec = F.l1_loss(batch["image"], c["x_rec"])
    assert logs["loss_rec"] == pytest.approx(float(rec), rel=1e-6)
    assert logs["loss_kl"] == pytest.approx(float(kl), rel=1e-5)
    total = logs["loss_rec"] + 1e-6 * logs["loss_kl"] + 0.1 * logs["loss_g"] + 1.5 * logs["align_tok"]
    assert logs["loss_tok"] == pytest.approx(total, rel=1e-6)
    assert logs["d_weight"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra, key", [
    (["tokenizer.kind=vq"], "tokenizer.kind"),
    (["diffusion.repa=false"], "diffusion.repa"),
    (["model.preset=DiT-Pico/4", "data.image_size=12"], "model.preset"),
    (["diffusion.repa_weights=/nonexistent/digits.safetensors"], "diffusion.repa_weights"),
    (["tokenizer.va.enabled=true"], "tokenizer.va.enabled"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, extra, key):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        _fit(tmp_path, "bad", *extra)
    assert "\n" not in str(err.value) and key in str(err.value), str(err.value)
    for written in ("config.yaml", "checkpoints", "tokenizer_arch.json"):
        assert not (tmp_path / "bad" / written).exists()


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    _fit(root, "j", "train.max_steps=2", "train.ckpt_every=1", "train.sample_every=2")
    return root


def test_run_has_three_models_optimizers_and_grids(joint_run):
    from ldm.runs import load_checkpoint

    ckpt = load_checkpoint(joint_run / "j" / "checkpoints" / "step_0000002")
    prefixes = {k.split(".")[0] for k in ckpt["model"]}
    assert prefixes == {"autoencoder", "discriminator", "generator", "projector"}
    assert set(ckpt["state"]["optimizers"]) == {"tokenizer", "disc", "model"}
    assert {k.split(".")[0] for k in ckpt["ema"]} == {"net", "bn"}
    assert ckpt["state"]["task"]["kind"] == "end_to_end"
    assert (joint_run / "j" / "samples" / "step_0000002.png").is_file()
    assert any((joint_run / "j" / "tb").iterdir())


def test_resume_is_bit_exact_for_all_three_models(tmp_path, joint_run):
    from ldm.runs import load_checkpoint

    _fit(tmp_path, "r", "train.max_steps=1", "train.ckpt_every=1")
    _fit(tmp_path, "r", "train.max_steps=2", "train.ckpt_every=1", "train.sample_every=2")
    _same(load_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000002"),
          load_checkpoint(joint_run / "j" / "checkpoints" / "step_0000002"))


def _same(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for phase, opt in a["state"]["optimizers"].items():
        other = b["state"]["optimizers"][phase]["state"]
        for pid, st in opt["state"].items():
            for k, v in st.items():
                assert torch.equal(v, other[pid][k]), f"optimizer {phase} state {pid}.{k} differs"
    assert a["state"]["data_position"] == b["state"]["data_position"]


def test_resuming_a_joint_run_as_a_plain_stage_is_refused(joint_run):
    from ldm.config import ConfigError

    for extra in ([], ["train.allow_changes=[stage]"]):
        with pytest.raises(ConfigError) as err:
            _fit(joint_run, "j", "stage=generator", "train.max_steps=3", *extra)
        assert "\n" not in str(err.value) and "stage=generator" in str(err.value) and "stage=end_to_end" in str(
            err.value)


def test_export_decodes_as_the_in_run_decoder_and_phase_two_trains_on_it(tmp_path, joint_run):
    from safetensors.torch import load_file

    from ldm.config import DataCfg
    from ldm.data.latents import build_latent_cache, read_cache_meta
    from ldm.tokenizers.export import export_tokenizer, load_tokenizer
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.train.loop import fit

    ckpt = joint_run / "j" / "checkpoints" / "step_0000002"
    in_run = build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1,
                                  norm_num_groups=8, mid_block_attention=False).eval()
    in_run.load_state_dict({k[len("autoencoder."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
                            if k.startswith("autoencoder.")})
    out = export_tokenizer(joint_run / "j", tmp_path / "export")
    exported = load_tokenizer(out)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.decode(z), in_run.decoder(in_run.post_quant_conv(z)))
    ema = load_file(str(ckpt / "ema.safetensors"))  # REPA-E save_vae_weights.py: the EMA batch norm's statistics
    assert exported.stats.mean == pytest.approx(ema["bn.running_mean"].double().tolist(), rel=1e-6)
    assert exported.stats.std == pytest.approx(ema["bn.running_var"].double().sqrt().tolist(), rel=1e-6)

    cache = tmp_path / "latents"
    build_latent_cache(exported, DataCfg(source="digits", image_size=16), cache, progress=False)
    assert read_cache_meta(cache).tokenizer_fingerprint == exported.fingerprint
    from ldm.config import load_config

    gen = load_config(None, ["stage=generator", "name=g", f"train.run_root={tmp_path}", "data.image_size=16",
                             f"data.latents={cache}", f"tokenizer.checkpoint={out}", "tokenizer.latent_channels=4",
                             "model.preset=DiT-Pico/2", "train.batch_size=8", "train.max_steps=2",
                             "train.mixed_precision='no'", "train.sample_every=0", "sample.steps=2"])
    result = fit(gen, progress=False)
    assert result.step == 2
    from ldm.runs import load_checkpoint

    facts = load_checkpoint(result.last_checkpoint)["state"]["task"]
    assert facts["tokenizer_fingerprint"] == exported.fingerprint


# ------------------------------------------------------------------------------------------------ configs
def test_imagenet_recipes_carry_repae_settings_and_published_sizes():
    from ldm.config import load_config
    from ldm.models import build_generator_model

    recipes = REPO / "configs" / "imagenet256"
    for name, channels, size in (("repae_sit_xl2_sdvae", 4, 32), ("repae_sit_xl1_invae", 32, 16),
                                 ("repae_sit_xl1_vavae", 32, 16)):
        cfg = load_config(recipes / f"{name}.yaml")
        t, e, d = cfg.tokenizer, cfg.e2e, cfg.diffusion
        assert cfg.stage == "end_to_end" and t.latent_channels == channels
        assert (t.kl_weight, t.disc_weight, t.disc_start, t.disc_adaptive, t.perceptual_weight) == (1e-6, 0.1, 0,
                                                                                                      False, 1.0)
        assert (e.tokenizer_lr, e.disc_lr, e.tokenizer_align_weight, e.bn_momentum) == (1e-4, 1e-4, 1.5, 0.1)
        assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.grad_clip, cfg.train.max_steps) == (
            1e-4, (0.9, 0.999), 1.0, 400_000)
        assert (d.repa, d.repa_depth, d.repa_weight, d.path, d.prediction) == (True, 8, 0.5, "linear", "velocity")
        with torch.device("meta"):
            net = build_generator_model(cfg.model, latent_channels=channels, latent_size=size, num_classes=1000,
                                        repa_depth=d.repa_depth)
        count = sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()
        assert abs(count - 675e6) / 675e6 < 0.002, count  # SiT-XL: 675M (SiT / REPA-E tables)
    phase2 = load_config(recipes / "repae_e2e_vavae_sit_xl1.yaml")
    assert phase2.stage == "generator" and phase2.diffusion.latent_norm == "channel" and phase2.train.max_steps == 4e6
    assert (phase2.sample.cfg_scale, list(phase2.sample.interval)) == (2.5, [0.0, 0.75])  # REPA-E time = ours


SHORT = ["train.max_steps=1", "train.batch_size=8", "train.ckpt_every=1000", "train.sample_every=0"]


def test_digits_config_continues_a_tokenizer_run(tmp_path):
    from ldm.config import load_config
    from ldm.train.loop import fit

    short = [*SHORT, f"train.run_root={tmp_path}"]
    fit(load_config(REPO / "configs" / "tokenizer" / "tiny_f4.yaml", [*short, "tokenizer.stats_num_images=8"]),
        progress=False)
    joint = load_config(REPO / "configs" / "end_to_end" / "digits.yaml",
                        [*short, f"tokenizer.pretrained={tmp_path / 'tiny_f4'}", "tokenizer.stats_num_images=8"])
    assert fit(joint, progress=False).step == 1


@pytest.mark.slow
def test_the_pipeline_chains_the_tuned_tokenizer(tmp_path):
    """configs/end_to_end/quickstart.yaml: the joint run takes the tokenizer stage's place; the cache and the generator
    use its tuned tokenizer with the batch norm's statistics (~90 s on a loaded 2-core CPU)."""
    from ldm.config import PipelineCfg, load_config
    from ldm.pipeline import run_pipeline

    stage = [f"{s}.{o}" for s in ("tokenizer", "generator") for o in SHORT]
    cfg = load_config(REPO / "configs" / "end_to_end" / "quickstart.yaml",
                      [f"run_root={tmp_path}", "stages=[tokenizer,latents,generator]", *stage,
                       "tokenizer.tokenizer.stats_num_images=8"], schema=PipelineCfg)
    summary = run_pipeline(cfg, progress=False)
    from ldm.tokenizers.export import load_tokenizer

    tok = load_tokenizer(tmp_path / "repae_quickstart" / "tokenizer")
    assert summary["stages"]["tokenizer"]["latent_mean"] == [round(v, 4) for v in tok.stats.mean]
    from ldm.data.latents import read_cache_meta

    assert read_cache_meta(tmp_path / "repae_quickstart" / "latents").tokenizer_fingerprint == tok.fingerprint
    assert summary["stages"]["generator"]["run_dir"].endswith("generator")


def test_bench_end_to_end_smoke(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_end_to_end

    bench_end_to_end.main(["--smoke"])
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in ("tokenizer", "generator", "separate", "joint"))


# ------------------------------------------------------------------------------------------------ subprocesses
def _popen(args, env=None):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    from conftest import run_python

    from ldm.runs import load_checkpoint

    extra = ["train.max_steps=4", "train.ckpt_every=2"]
    run_python([__file__, str(tmp_path), "straight", *extra], timeout=600)
    proc = _popen([__file__, str(tmp_path), "killed", *extra], env={"E2E_STEP_SLEEP": "0.5"})
    latest, start = tmp_path / "killed" / "latest", time.time()
    while not (latest.exists() and "step_0000002" in latest.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_python([__file__, str(tmp_path), "killed", *extra], timeout=600)
    assert "resumed from" in out.stdout
    _same(load_checkpoint(tmp_path / "killed" / "checkpoints" / "step_0000004"),
          load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_0000004"))


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_three_models(tmp_path):
    """GAN off (disc_start past the end): the discriminator's BatchNorm statistics are per process by design."""
    from conftest import run_python
    from safetensors.torch import load_file

    extra = ["train.max_steps=4", "optim.lr=1e-3", "tokenizer.disc_start=1000", "train.ema=false"]
    run_python([__file__, str(tmp_path / "one"), "p", *extra], timeout=600)
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path / "two"), "p",
                      *extra], timeout=600)
    assert "2 processes" in two.stdout + two.stderr
    one = load_file(str(tmp_path / "one" / "p" / "checkpoints" / "step_0000004" / "model.safetensors"))
    other = load_file(str(tmp_path / "two" / "p" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert one.keys() == other.keys()
    compared = [k for k in one if not (k.startswith("discriminator.") and k.endswith(("running_mean", "running_var")))]
    diff = max(float((one[k].double() - other[k].double()).abs().max()) for k in compared)
    assert diff < 2e-5, diff
    assert any(k.startswith("generator.bn.") for k in compared)  # the global-batch statistics agree too


def _worker(root: str, name: str, *extra: str) -> None:
    sys.path.insert(0, str(REPO))
    delay = float(os.environ.get("E2E_STEP_SLEEP", "0"))
    if delay:
        from ldm.train.end_to_end_task import EndToEndTask

        original = EndToEndTask.forward

        def slow(self, *args, **kwargs):
            time.sleep(delay)
            return original(self, *args, **kwargs)

        EndToEndTask.forward = slow
    _fit(root, name, *extra)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
