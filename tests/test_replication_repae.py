"""`bench/replication/run.py --study repae`: the configs it trains (REPA-E's joint stage over the mode's tokenizer, the
REPA generators), its paired tables checked against hand-computed ratios and differences, and (slow) the --tiny
study end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from conftest import REPO, run_python


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("replication_run", REPO / "bench" / "replication" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_joint_stage_tunes_the_exported_plain_tokenizer_for_the_generator_budget(study, tmp_path):
    cfgs = study.repae_configs("tiny", tmp_path, 1)
    kl, repae, control = cfgs["kl"], cfgs["repae"], cfgs["repae_noalign"]
    joint, gen = repae.tokenizer, repae.generator
    assert repae.run_dir == tmp_path / "tiny" / "repae_s1" and kl.run_dir == tmp_path / "tiny" / "kl_s1"
    assert joint.stage == "end_to_end" and joint.seed == 1 and gen.seed == 1
    assert joint.tokenizer.pretrained == str(tmp_path / "tiny" / "kl_s1" / "tokenizer_export")
    # the budget: N generator steps with checkpoints at the generator's fractions, at the tokenizer stage's batch
    assert (joint.train.max_steps, joint.train.ckpt_every, joint.train.keep_last) == (
        gen.train.max_steps, gen.train.ckpt_every, gen.train.keep_last) == (8, 2, 4)  # tiny.yaml's generator
    assert joint.train.batch_size == kl.tokenizer.train.batch_size == 32
    assert joint.sample == gen.sample  # the joint generator samples with the same settings and noise as every arm
    assert (joint.model, joint.optim.lr, joint.train.ema_decay) == (gen.model, gen.optim.lr, gen.train.ema_decay)
    # REPA-E's settings (train_repae.py, configs/l1_lpips_kl_gan.yaml) and the plain tokenizer's architecture
    assert (joint.e2e.tokenizer_lr, joint.e2e.disc_lr, joint.e2e.tokenizer_align_weight, joint.e2e.bn_momentum) == (
        1e-4, 1e-4, 1.5, 0.1)
    t = joint.tokenizer
    assert (t.disc_start, t.disc_weight, t.disc_adaptive, t.kl_weight) == (0, 0.1, False, 1e-6)
    assert (joint.optim.name, tuple(joint.optim.betas), joint.optim.grad_clip) == ("adamw", (0.9, 0.999), 1.0)
    assert (t.latent_channels, t.block_out_channels) == (kl.tokenizer.tokenizer.latent_channels,
                                                         kl.tokenizer.tokenizer.block_out_channels)
    assert joint.model == gen.model and joint.diffusion.repa and joint.diffusion.repa_encoder == "digits"
    assert joint.data.class_cond
    # the control differs by the alignment weight only
    assert control.run_dir == tmp_path / "tiny" / "repae_noalign_s1"
    assert control.tokenizer.e2e.tokenizer_align_weight == 0
    assert dataclasses.replace(control.tokenizer, e2e=joint.e2e) == joint and control.generator == gen


def test_repa_generators_differ_from_the_plain_one_only_by_repa(study, tmp_path):
    from ldm.pipeline import stage_configs

    cfgs = study.repae_configs("tiny", tmp_path, 0)
    repae = cfgs["repae"]
    for pcfg in cfgs.values():
        _, plain = stage_configs(pcfg)
        export = pcfg.run_dir / study.EXPORT_DIR
        repa = study.repa_generator(pcfg, repae)
        assert repa.run_dir == pcfg.run_dir / "generator_repa"
        assert repa.diffusion.repa and all(getattr(repa.diffusion, k) == getattr(repae.tokenizer.diffusion, k)
                                           for k in study.REPA_KEYS)
        assert dataclasses.replace(repa.diffusion, repa=False) == dataclasses.replace(
            plain.diffusion, **{k: getattr(repa.diffusion, k) for k in study.REPA_KEYS if k != "repa"})
        assert repa.data.latents is None and plain.data.latents == str(pcfg.run_dir / "latents")
        assert repa.tokenizer.checkpoint == str(export)
        for section in ("model", "optim", "train", "sample"):  # the same budget, network and sampler
            theirs, mine = getattr(plain, section), getattr(repa, section)
            if section == "train":
                theirs, mine = dataclasses.replace(theirs, run_root=""), dataclasses.replace(mine, run_root="")
            assert theirs == mine, section


def _tok(name, seed, psnr, cknna):
    d = {"equivariance": {"rotation_mean": {"decoder_ratio": 1.0, "latent_error": 0.5},
                          "scale_mean": {"decoder_ratio": 2.0, "latent_error": 0.25}},
         "spectrum": {"latent": {"hf_share": 0.4}, "image_at_latent": {"hf_share": 0.2}},
         "posterior": {"kl_per_image": 100.0}, "channels": {"std_ratio": 3.0},
         "alignment": {"cknna": cknna, "linear_cka": 0.1}}
    return {"tokenizer": name, "seed": seed, "psnr": psnr, "rfd_digits": 1.0, "diagnostics": d}


def test_tables_pair_by_seed(study):
    toks = [_tok("kl", 0, 20.0, 0.10), _tok("repae", 0, 21.0, 0.15), _tok("kl", 1, 22.0, 0.20),
            _tok("repae", 1, 21.5, 0.21)]
    text = study.repae_tokenizer_tables(toks)
    # PSNR tuned - plain: +1.0 and -0.5 dB -> mean 0.25; CKNNA +0.05 and +0.01 -> mean 0.03
    assert "REPA-E-tuned KL − plain KL: PSNR 0.25 [-0.50, 1.00] dB, CKNNA 0.030 [0.010, 0.050]" in text
    assert "| plain KL | 21.00 [20.00, 22.00] |" in text and "| REPA-E-tuned KL | 21.25 [21.00, 21.50] |" in text
    arms = [{"arm": a, "seed": s, "gfd_digits": v} for a, s, v in (
        ("repa", 0, [10.0, 8.0, 4.0]), ("repae", 0, [5.0, 8.0, 2.0]), ("repa", 1, [20.0, 10.0, 5.0]),
        ("repae", 1, [20.0, 5.0, 4.0]))]
    text = study.arm_tables(arms, [2, 4, 8], study.REPAE_ARMS, study.REPAE_PAIRS)
    # ratios by seed: @2 0.5 and 1.0, @4 1.0 and 0.5, @8 0.5 and 0.8
    assert "| repae / repa | 0.75 [0.50, 1.00] | 0.75 [0.50, 1.00] | 0.65 [0.50, 0.80] |" in text
    assert "repa / plain" not in text  # pairs whose arms are absent are left out


def test_arms_keep_the_reference_and_their_order(study):
    assert study.parse_arms(None, study.REPAE_ARMS) == list(study.REPAE_ARMS)
    assert study.parse_arms("repae,joint", study.REPAE_ARMS) == ["plain", "joint", "repae"]
    assert study.parse_arms("lpl", study.DECODER_ARMS) == ["plain", "lpl"]
    with pytest.raises(SystemExit, match="unknown \\['lpl'\\]"):
        study.parse_arms("repae,lpl", study.REPAE_ARMS)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_study_runs_every_arm(tmp_path):
    run_python(["bench/replication/run.py", "--study", "repae", "--tiny", "--seeds", "0", "--run-root",
                str(tmp_path), "--no-docs"], timeout=1200)
    result = json.loads((tmp_path / "tiny" / "results_repae.json").read_text())
    assert [r["arm"] for r in result["runs"]] == ["plain", "repa", "joint", "repae", "repae_noalign"]
    assert all(r["steps"] == [2, 4, 8] and len(r["gfd_digits"]) == 3 for r in result["runs"])
    assert [t["tokenizer"] for t in result["tokenizers"]] == ["kl", "repae", "repae_noalign"]
    for name in ("repae_s0", "repae_noalign_s0"):
        run = tmp_path / "tiny" / name
        assert (run / "tokenizer" / "checkpoints" / "step_0000008").is_dir()  # the joint run: the generator budget
        assert (run / "tokenizer_export" / "latent_stats.json").is_file()
        assert (run / "generator_repa" / "checkpoints" / "step_0000008").is_dir()
    samples = tmp_path / "tiny" / "repae_s0" / "tokenizer" / "samples" / "step_0000008" / "samples.npz"
    assert samples.is_file()  # the joint run's own generator, sampled as `ldm sample` does
