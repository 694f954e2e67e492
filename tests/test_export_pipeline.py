"""`ldm export` of generators: the diffusers folders load in diffusers and reproduce `ldm sample` for the same noise.

Three tiny DiT-Pico runs (3 steps at a high learning rate and no EMA, so the networks' outputs depend on t and y) on a
tiny diffusers VAE: flow matching (euler, shifted grid, guidance on an interval), DDPM eps with learned sigma, DDPM eps
without. The references are ldm's own sampling functions (`generate_batch` is what `ldm sample` writes, uint8;
`Generator.sample_latents` its latents); the pipelines run diffusers' scheduler loops (DiTPipeline's own __call__,
FlowMatchEulerDiscreteScheduler, DDPMScheduler). Tolerances: the issue's 1/255 per pixel (DDPM / DDIM) and 1e-5 in
latent space (flow). Everything runs on one thread.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm.config import load_config
from ldm.eval.generate import generate_batch, labels_for
from ldm.eval.generator import initial_noise, load_generator, load_official_generator
from ldm.seeding import index_generators

SEED = 3
INDICES = [0, 1, 2, 5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.train.loop import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    vae = root / "vae"
    torch.manual_seed(0)
    build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(vae)
    common = [f"train.run_root={root}", f"tokenizer.pretrained={vae}", "data.image_size=16",
              "model.preset=DiT-Pico/2", "train.max_steps=3", "train.batch_size=8", "train.ckpt_every=1000",
              "train.ema=false", "optim.lr=0.05", "train.mixed_precision=no"]
    ddpm = ["diffusion.path=ddpm_linear", "diffusion.prediction=eps", "diffusion.latent_norm=scalar",
            "diffusion.scaling_factor=0.5", "sample.sampler=ddpm", "sample.steps=6"]
    fit(load_config(None, ["name=flow", *common, "sample.sampler=euler", "sample.steps=5",
                           "sample.time_grid=shifted", "sample.shift=3", "sample.cfg_scale=2.0",
                           "sample.interval=[0.0,0.8]"]), progress=False)
    fit(load_config(None, ["name=ddpm_sigma", *common, *ddpm, "model.learn_sigma=true", "sample.cfg_scale=1.5"]),
        progress=False)
    fit(load_config(None, ["name=ddpm", *common, *ddpm]), progress=False)
    yield root
    torch.set_num_threads(threads)


def _fp32(sample_cfg):
    """The ldm side in fp32, as the pipelines run (sample.precision where the schema has it)."""
    names = {f.name for f in dataclasses.fields(sample_cfg)}
    return dataclasses.replace(sample_cfg, precision="fp32") if "precision" in names else sample_cfg


def _labels(gen):
    return labels_for(INDICES, list(range(gen.num_classes)), seed=SEED)


def _ldm_images(gen, sample_cfg, indices=INDICES) -> np.ndarray:
    """What `ldm sample` writes for `indices`: uint8 (n, H, W, 3)."""
    labels = labels_for(indices, list(range(gen.num_classes)), seed=SEED)
    return generate_batch(gen, indices, labels, sample_cfg=_fp32(sample_cfg), seed=SEED, batch_size=len(indices),
                          decode_batch=len(indices))


def _pixels(images: np.ndarray) -> np.ndarray:
    """Pipeline images in [0, 1] (n, H, W, 3) as ldm's uint8: floor(255 x + 0.5) = floor(127.5 u + 128), u = 2x - 1."""
    return np.floor(np.clip(255.0 * images + 0.5, 0, 255)).astype(np.int16)


def _export(run, tmp_path, *args):
    from ldm.cli import main

    out = tmp_path / "export"
    assert main(["export", str(run), "--to", str(out), "--no-ema", *args]) == 0
    return out


# ------------------------------------------------------------------------------------------------------ flow matching
def test_flow_export_loads_in_diffusers_and_reproduces_ldm_sample(runs, tmp_path, capsys):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    import ldm.eval.export_pipeline as ep

    out = _export(runs / "flow", tmp_path)
    assert "LdmLatentPipeline" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ep.LdmLatentPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0

    gen = load_generator(runs / "flow", use_ema=False)
    sample_cfg = _fp32(gen.cfg.sample)
    assert (sample_cfg.sampler, sample_cfg.time_grid, sample_cfg.cfg_scale) == ("euler", "shifted", 2.0)
    labels = _labels(gen)
    gens = index_generators(SEED, INDICES)
    ref = gen.sample_latents(initial_noise(gen.latent_shape, gens, "cpu"), labels, sample_cfg=sample_cfg,
                             generators=gens)
    z = pipe(class_labels=labels.tolist(), generator=index_generators(SEED, INDICES), output_type="latent").images
    assert (z - ref).abs().max().item() <= 1e-5
    # the network and the guidance matter at this tolerance: unguided sampling lands far away
    z1 = pipe(class_labels=labels.tolist(), generator=index_generators(SEED, INDICES), guidance_scale=1.0,
              output_type="latent").images
    assert (z1 - ref).abs().max().item() > 1e-2
    images = pipe(class_labels=labels.tolist(), generator=index_generators(SEED, INDICES), output_type="np").images
    assert np.abs(_pixels(images) - _ldm_images(gen, gen.cfg.sample).astype(np.int16)).max() <= 1

    card = (out / "README.md").read_text()
    assert gen.tokenizer.fingerprint in card and "ldm version: " in card and "preset: DiT-Pico/2" in card
    assert json.loads((out / "model_index.json").read_text())["latent_norm"] == gen.normalizer.kind


# ------------------------------------------------------------------------------------------------------ DDPM
def test_ddpm_learned_sigma_ldm_pipeline_reproduces_ldm_sample(runs, tmp_path):
    from diffusers import DDPMScheduler, DiffusionPipeline

    import ldm.eval.export_pipeline  # noqa: F401  (registers LdmLatentPipeline with diffusers)

    out = _export(runs / "ddpm_sigma", tmp_path, "--pipeline", "ldm")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
    gen = load_generator(runs / "ddpm_sigma", use_ema=False)
    labels = _labels(gen)
    images = pipe(class_labels=labels.tolist(), generator=index_generators(SEED, INDICES), output_type="np").images
    ref = _ldm_images(gen, gen.cfg.sample)
    assert np.abs(_pixels(images) - ref.astype(np.int16)).max() <= 1
    other = pipe(class_labels=labels.tolist(), generator=index_generators(SEED + 1, INDICES), output_type="np").images
    assert np.abs(_pixels(other) - ref.astype(np.int16)).max() > 8  # other noise, other images


def test_ddpm_dit_pipeline_reproduces_ldm_sample(runs, tmp_path):
    """DiTPipeline's own loop: it draws the initial noise from `generator` and the DDPM step noise from torch's global
    RNG, so for one image the global RNG is set to that image's generator after its first draw."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    import ldm.eval.export_pipeline as ep

    out = _export(runs / "ddpm", tmp_path)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["3"] == "3"
    pipe = DiTPipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, ep.LdmDiTTransformer2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.vae.config.scaling_factor == 0.5
    gen = load_generator(runs / "ddpm", use_ema=False)
    assert not gen.learned_sigma and gen.cfg.sample.cfg_scale == 1.0
    for i in (0, 5):
        g = index_generators(SEED, [i])[0]
        after_noise = torch.Generator().set_state(g.get_state())
        torch.randn(gen.latent_shape, generator=after_noise)
        torch.set_rng_state(after_noise.get_state())
        label = int(labels_for([i], list(range(gen.num_classes)), seed=SEED)[0])
        images = pipe(class_labels=[label], guidance_scale=1.0, generator=g, num_inference_steps=gen.cfg.sample.steps,
                      output_type="np").images
        assert np.abs(_pixels(images) - _ldm_images(gen, gen.cfg.sample, [i]).astype(np.int16)).max() <= 1
    # the same tensors in a stock DiTTransformer2DModel give another network (diffusers' timestep frequencies)
    stock = DiTTransformer2DModel.from_pretrained(out / "transformer")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        ours = gen.model(x, (t + 1) / 1000.0, y)
        assert (pipe.transformer(x, t, y).sample - ours).abs().max() < 1e-5
        assert (stock(x, t, y).sample - ours).abs().max() > 1e-2


@pytest.mark.slow
def test_ddim_dit_pipeline_with_learned_sigma_and_guidance_at_full_steps(runs, tmp_path):
    """DDIMScheduler's grid equals DiT's respacing at K = T = 1000 steps (export_pipeline.dit_pipeline_scheduler);
    guidance goes through DiTPipeline's null id 1000 (the padded label table). Slow: 2 x 2000 network calls."""
    from diffusers import DiTPipeline

    from ldm.eval.export_pipeline import dit_pipeline_scheduler

    out = _export(runs / "ddpm_sigma", tmp_path)
    pipe = DiTPipeline.from_pretrained(out)
    gen = load_generator(runs / "ddpm_sigma", use_ema=False)
    pipe.scheduler = dit_pipeline_scheduler(gen.path, "ddim")
    labels = _labels(gen)
    images = pipe(class_labels=labels.tolist(), guidance_scale=1.5, generator=index_generators(SEED, INDICES),
                  num_inference_steps=1000, output_type="np").images
    sample_cfg = dataclasses.replace(gen.cfg.sample, sampler="ddim", steps=1000, eta=0.0)
    assert sample_cfg.cfg_scale == 1.5 and sample_cfg.cfg_channels == "all"
    assert np.abs(_pixels(images) - _ldm_images(gen, sample_cfg).astype(np.int16)).max() <= 1


# ------------------------------------------------------------------------------------------------------ official weights
def test_official_weights_export_the_same_way(runs, tmp_path):
    from diffusers import DiffusionPipeline, DiTPipeline
    from test_sample import (
        _official_dit_file,  # a random tiny DiT under the official key names (= SiT's)
    )

    from ldm.eval.export_generator import export_generator
    from ldm.eval.export_pipeline import LdmSamplerScheduler

    vae = runs / "vae"
    dit = _official_dit_file(tmp_path / "DiT-tiny.pt")
    assert export_generator(dit, tmp_path / "dit", official="dit", tokenizer=vae).pipeline_class == "DiTPipeline"
    pipe = DiTPipeline.from_pretrained(tmp_path / "dit")
    gen = load_official_generator("dit", dit, tokenizer=vae)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10])
    with torch.no_grad():
        ours = gen.model(x, (t + 1) / 1000.0, y)  # outputs of size ~10: float32 rounding of the time is ~1e-5
        torch.testing.assert_close(pipe.transformer(x, t, torch.tensor([3, 1000])).sample, ours, rtol=1e-5, atol=1e-4)

    sit = _official_dit_file(tmp_path / "SiT-tiny.pt")  # 8 output channels, as SiT-XL-2-256x256.pt
    done = export_generator(sit, tmp_path / "sit", official="sit", tokenizer=vae)
    assert (done.pipeline_class, done.scheduler_class) == ("LdmLatentPipeline", "LdmSamplerScheduler")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sit")
    assert isinstance(pipe.scheduler, LdmSamplerScheduler) and pipe.scheduler.config.sampler == "euler_maruyama"
    gen = load_official_generator("sit", sit, tokenizer=vae)
    sample_cfg = dataclasses.replace(_fp32(gen.cfg.sample), steps=20)
    labels = _labels(gen)
    gens = index_generators(SEED, INDICES)
    ref = gen.sample_latents(initial_noise(gen.latent_shape, gens, "cpu"), labels, sample_cfg=sample_cfg,
                             generators=gens)
    z = pipe(class_labels=labels.tolist(), num_inference_steps=20, generator=index_generators(SEED, INDICES),
             output_type="latent").images
    assert (z - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------------ bad input
def test_export_refusals(runs, tmp_path, capsys):
    from ldm.cli import main

    out = tmp_path / "x"
    assert main(["export", str(runs / "flow"), "--to", str(out), "--no-ema", "--pipeline", "dit"]) == 2
    err = capsys.readouterr().err
    assert "--pipeline dit" in err and "path=linear" in err and not out.exists()
    (out / "keep").parent.mkdir()
    (out / "keep").write_text("x")
    assert main(["export", str(runs / "ddpm"), "--to", str(out), "--no-ema"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(runs / "vae"), "--to", str(tmp_path / "y"), "--pipeline", "ldm"]) == 2
    assert "is a tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ the Hub
def test_generator_push_and_pull_through_the_hub(runs, tmp_path, monkeypatch):
    """`ldm export --push-to-hub`, then the pipeline and the run itself loaded from hf:// references offline."""
    from diffusers import DiTPipeline
    from test_hub import fake_hub

    from ldm.hub import push_folder, resolve_path

    pushed = fake_hub(monkeypatch, tmp_path / "cache")
    _export(runs / "ddpm", tmp_path, "--push-to-hub", "me/ddpm-tiny")
    push_folder(runs / "ddpm", "me/ddpm-run", commit_message="run")
    assert [p[0] for p in pushed] == ["me/ddpm-tiny", "me/ddpm-run"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = DiTPipeline.from_pretrained(resolve_path("hf://me/ddpm-tiny"))
    gen = load_generator("hf://me/ddpm-run", use_ema=False)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 9])
    with torch.no_grad():
        assert (pipe.transformer(x, t, y).sample - gen.model(x, (t + 1) / 1000.0, y)).abs().max() < 1e-5
