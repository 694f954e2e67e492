"""`ldm sample` / sample.py: per-index determinism (batch size, process count, resume after SIGKILL), the ADM .npz,
labels, and each bad input's error. Runs a tiny DiT generator trained for 3 steps on a tiny diffusers VAE.

Bit-identity holds on one device type at one intra-op thread count (CPU GEMM reductions are split by thread); every
process here uses 1 thread (torchrun's default).
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_python
from PIL import Image

from ldm.config import load_config
from ldm.eval.generate import SAMPLE_CONFIG, labels_for, parse_classes, png_path, write_samples
from ldm.eval.generator import load_generator

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SAMPLE = str(REPO / "sample.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional run (EMA) and an unconditional run without EMA, 3 steps each."""
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.train.loop import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # match the subprocesses bit for bit
    root = tmp_path_factory.mktemp("sample")
    vae = root / "vae"
    build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(vae)
    common = [f"train.run_root={root}", f"tokenizer.pretrained={vae}", "data.image_size=16",
              "model.preset=DiT-Pico/2", "train.max_steps=3", "train.batch_size=16", "sample.steps=4",
              "train.ckpt_every=1000"]
    fit(load_config(None, ["name=cond", *common]), progress=False)
    fit(load_config(None, ["name=uncond", "data.class_cond=false", "train.ema=false", *common]), progress=False)
    yield root
    torch.set_num_threads(threads)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".png", ".npz")}


def _same_images(a: Path, b: Path, num: int) -> None:
    fa, fb = _files(a), _files(b)
    names = [png_path(a, i).name for i in range(num)]
    assert [n for n in fa if n.endswith(".png") and n != "grid.png"] == names
    for n in names:
        assert fa[n] == fb[n], f"{n} differs between {a} and {b}"


def _popen(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ------------------------------------------------------------------------------------------------------ labels
def test_labels_are_a_function_of_seed_index_and_classes():
    assert labels_for(range(7), [3, 5, 8], seed=0).tolist() == [3, 5, 8, 3, 5, 8, 3]
    assert labels_for(range(6), [1, 2], seed=0, order="grid", num=6).tolist() == [1, 1, 1, 2, 2, 2]
    r = labels_for(range(40), list(range(10)), seed=7, order="random")
    assert torch.equal(labels_for(range(20, 40), list(range(10)), seed=7, order="random"), r[20:])
    assert not torch.equal(labels_for(range(40), list(range(10)), seed=8, order="random"), r)
    assert len(set(r.tolist())) > 3
    assert parse_classes("all", 4) == [0, 1, 2, 3] and parse_classes("0,2-3", 4) == [0, 2, 3]
    assert parse_classes(None, 0) is None


def test_help_lists_every_sampler():
    from ldm.cli.sample import SAMPLER_NAMES
    from ldm.diffusion.samplers import SAMPLERS

    assert sorted(SAMPLERS) == list(SAMPLER_NAMES)
    out = run_python([SAMPLE, "--help"]).stdout
    for flag in ("--num", "--classes", "--cfg", "--interval", "--sampler", "--steps", "--seed", "--batch", "--out",
                 "--grid", "--npz", "--no-ema", "--time-grid", "--shift"):
        assert flag in out


# ------------------------------------------------------------------------------------------------------ determinism
def test_batch_size_and_process_count_give_identical_files(runs, tmp_path):
    gen = load_generator(runs / "cond")
    a, b = tmp_path / "b8", tmp_path / "b3"
    opts = dict(num=10, classes="1,4,7", label_order="random", seed=3, grid=True, npz=True, progress=False)
    res = write_samples(gen, a, batch_size=8, **opts)
    assert res["written"] == 10 and res["skipped"] == 0
    write_samples(gen, b, batch_size=3, **opts)
    _same_images(a, b, 10)
    assert (a / "samples.npz").read_bytes() == (b / "samples.npz").read_bytes()
    assert Image.open(a / "grid.png").size[0] > 16 * 3

    data = np.load(a / "samples.npz")
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].dtype == np.int64
    assert data["arr_1"].tolist() == labels_for(range(10), [1, 4, 7], seed=3, order="random").tolist()
    for i in (0, 9):
        assert np.array_equal(data["arr_0"][i], np.asarray(Image.open(png_path(a, i)).convert("RGB")))
    assert len({data["arr_0"][i].tobytes() for i in range(10)}) == 10  # distinct noise per index

    # two processes (torchrun, gloo on CPU), batch 3, through the CLI: the same bytes
    c = tmp_path / "torchrun"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", SAMPLE, str(runs / "cond"),
                           "-n", "10", "--classes", "1,4,7", "--label-order", "random", "--seed", "3", "--batch",
                           "3", "--npz", "--no-progress", "--out", str(c)],
                          cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on 2 process(es)" in proc.stdout
    _same_images(a, c, 10)
    assert (a / "samples.npz").read_bytes() == (c / "samples.npz").read_bytes()


def test_damaged_samples_are_regenerated_on_resume_and_named_when_read(runs, tmp_path):
    from ldm.eval.generate import is_complete_png, read_png

    gen = load_generator(runs / "cond")
    out = tmp_path / "s"
    opts = dict(num=4, seed=1, npz=False, progress=False, batch_size=4)
    write_samples(gen, out, **opts)
    good = {i: png_path(out, i).read_bytes() for i in range(4)}
    png_path(out, 1).write_bytes(good[1][: len(good[1]) // 2])  # truncated (a copy cut short)
    png_path(out, 3).write_bytes(b"")  # empty
    assert not is_complete_png(png_path(out, 1)) and is_complete_png(png_path(out, 0))
    with pytest.raises(ValueError, match=r"unreadable sample .*000001\.png.*re-run `ldm sample`"):
        read_png(png_path(out, 1))
    res = write_samples(gen, out, **opts)
    assert res["written"] == 2 and res["skipped"] == 2
    assert {i: png_path(out, i).read_bytes() for i in range(4)} == good


def test_killed_run_resumes_without_gaps_or_duplicates(runs, tmp_path):
    num, steps = 12, 40
    out, ref = tmp_path / "killed", tmp_path / "ref"
    args = [SAMPLE, str(runs / "cond"), "--num", str(num), "--steps", str(steps), "--batch", "1", "--out", str(out),
            "--no-progress"]
    proc = _popen(args)
    start = time.time()
    while len(list(out.glob("0*.png"))) < 3:
        if proc.poll() is not None:
            raise AssertionError(f"sampler ended before it was killed:\n{proc.stdout.read()[-2000:]}")
        assert time.time() - start < 240, "no PNG appeared in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("0*.png")))
    assert 3 <= done < num, f"{done} of {num} images existed at the kill: the test did not interrupt the run"

    gen = load_generator(runs / "cond")
    cfg = dataclasses.replace(gen.cfg.sample, steps=steps)
    res = write_samples(gen, out, num=num, sample_cfg=cfg, batch_size=4, grid=False, npz=False, progress=False)
    assert res["skipped"] == done and res["written"] == num - done
    assert not list(out.glob(".*tmp*")), "temporary files were left behind"
    write_samples(gen, ref, num=num, sample_cfg=cfg, batch_size=5, grid=False, npz=False, progress=False)
    _same_images(ref, out, num)
    again = write_samples(gen, out, num=num, sample_cfg=cfg, batch_size=4, grid=False, npz=False, progress=False)
    assert again["written"] == 0 and again["skipped"] == num


# ------------------------------------------------------------------------------------------------------ bad input
def test_unconditional_run_samples_without_labels(runs, tmp_path):
    gen = load_generator(runs / "uncond", use_ema=False)
    assert gen.num_classes == 0 and not gen.used_ema
    write_samples(gen, tmp_path / "u", num=3, batch_size=2, grid=False, npz=True, progress=False)
    data = np.load(tmp_path / "u" / "samples.npz")
    assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 16, 16, 3)


def test_bad_inputs_fail_clearly_and_write_nothing(runs, tmp_path, capsys):
    gen = load_generator(runs / "cond")
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"class id 10 is out of range.*10 classes"):
        write_samples(gen, out, num=2, classes="0,10", progress=False)
    assert not out.exists()

    uncond = load_generator(runs / "uncond", use_ema=False)
    cfg4 = dataclasses.replace(uncond.cfg.sample, cfg_scale=4.0)
    with pytest.raises(ValueError, match=r"--cfg.*unconditional"):
        write_samples(uncond, out, num=2, sample_cfg=cfg4, progress=False)
    with pytest.raises(ValueError, match=r"unconditional"):
        write_samples(uncond, out, num=2, classes="3", progress=False)
    assert not out.exists()

    with pytest.raises(ValueError, match=r"no EMA weights.*--no-ema"):
        load_generator(runs / "uncond")

    # the CLI prints these without a traceback and exits 2
    from ldm.cli import main

    assert main(["sample", str(runs / "uncond"), "--num", "2", "--out", str(out), "--no-progress"]) == 2
    assert main(["sample", str(runs / "cond"), "--num", "2", "--classes", "12", "--out", str(out)]) == 2
    assert main(["sample", str(runs / "uncond"), "--no-ema", "--cfg", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no EMA weights" in err and "class id 12" in err and "unconditional" in err
    assert "Traceback" not in err and not out.exists()

    # a folder holding another configuration's samples is refused, byte for byte untouched
    write_samples(gen, out, num=3, seed=0, batch_size=3, grid=False, npz=True, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=rf"another configuration.*{SAMPLE_CONFIG}.*seed: 0 there, 1 now"):
        write_samples(gen, out, num=5, seed=1, batch_size=3, progress=False)
    assert main(["sample", str(runs / "cond"), "--num", "3", "--sampler", "heun", "--out", str(out)]) == 2
    assert "sampler: 'euler' there, 'heun' now" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # sample files without a sample config cannot be matched: refused too
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(png_path(out, 0), png_path(stray, 0))
    with pytest.raises(FileExistsError, match=r"no sample_config.yaml"):
        write_samples(gen, stray, num=2, progress=False)
    assert sorted(p.name for p in stray.iterdir()) == ["000000.png"]

    with pytest.raises(ValueError, match=r"sampler='nope'"):
        write_samples(gen, tmp_path / "s", num=2, sample_cfg=dataclasses.replace(gen.cfg.sample, sampler="nope"),
                      progress=False)


# ------------------------------------------------------------------------------------------------------ official weights
def _official_dit_file(path: Path) -> Path:
    """A random DiT under facebookresearch/DiT's key names (the inverse of ldm.models.checkpoints' renames)."""
    import re

    from ldm.models.dit import DiT

    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=10,
              learn_sigma=True)
    sd = {}
    for key, value in net.state_dict().items():
        key = re.sub(r"^patch_embed\.", "x_embedder.proj.", key)
        key = re.sub(r"^y_embedder\.", "y_embedder.embedding_table.", key)
        key = re.sub(r"^(blocks\.\d+|final_layer)\.ada_ln\.", r"\1.adaLN_modulation.1.", key)
        sd[key] = torch.randn_like(value) * 0.05 if value.is_floating_point() and key != "pos_embed" else value
    torch.save(sd, path)
    return path


def test_official_dit_weights_sample_through_the_cli(runs, tmp_path):
    from ldm.cli import main
    from ldm.diffusion.paths import DiscretePath
    from ldm.eval.generator import load_official_generator

    weights = _official_dit_file(tmp_path / "DiT-tiny.pt")
    gen = load_official_generator("dit", weights, tokenizer=runs / "vae")
    # DiT's setup: DDPM (1000 linear-beta steps), eps + learned sigma, SD-VAE scalar factor from the VAE config
    assert isinstance(gen.path, DiscretePath) and gen.path.num_timesteps == 1000
    assert gen.prediction == "eps" and gen.cfg.model.learn_sigma and gen.num_classes == 10
    assert gen.normalizer.kind == "scalar" and float(gen.normalizer.scale) == pytest.approx(0.18215)
    assert gen.cfg.sample.sampler == "ddpm" and gen.cfg.sample.steps == 250

    out = tmp_path / "official"
    assert main(["sample", "--official", "dit", "--weights", str(weights), "--tokenizer", str(runs / "vae"),
                 "--steps", "3", "--cfg", "2", "--cfg-channels", "first3", "-n", "4", "--batch", "2", "--npz",
                 "--no-progress", "--out", str(out)]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_1"].tolist() == [0, 1, 2, 3]
    assert str(weights.resolve()) in (out / SAMPLE_CONFIG).read_text()
    assert main(["sample", "--official", "dit", "--weights", str(weights), "--no-ema", "--out", str(out)]) == 2
    assert main(["sample", str(runs / "cond"), "--official", "dit", "--weights", str(weights)]) == 2


# ------------------------------------------------------------------------------------------------------ identity
def _identity_of(sample_cfg, seed=0):
    from types import SimpleNamespace

    from ldm.eval.generate import sample_identity

    gen = SimpleNamespace(checkpoint="ckpt", used_ema=True, tokenizer=SimpleNamespace(fingerprint="f"),
                          latent_shape=(4, 2, 2))
    return sample_identity(gen, sample_cfg, seed=seed, classes=[0, 1], label_order="cycle", num=8)


def test_identity_is_every_sample_field_but_the_named_ones():
    from ldm.config import SAMPLE_NON_IDENTITY_FIELDS, SampleCfg

    ident = _identity_of(SampleCfg(cfg_scale=2, steps=4))
    fields = {f.name for f in dataclasses.fields(SampleCfg)}
    assert fields - set(SAMPLE_NON_IDENTITY_FIELDS) <= set(ident)
    assert not (set(SAMPLE_NON_IDENTITY_FIELDS) - {"seed", "use_ema"}) & set(ident)
    assert ident["cfg_scale"] == 2.0 and isinstance(ident["cfg_scale"], float) and ident["interval"] == [0.0, 1.0]


def test_folder_written_before_a_field_existed_reads_it_as_the_default(tmp_path):
    """A folder whose recorded identity lacks a sample field (added later) was made with that field's default."""
    from omegaconf import OmegaConf

    from ldm.config import SampleCfg
    from ldm.eval.generate import check_sample_folder

    old = _identity_of(SampleCfg())
    del old["eta"]
    (tmp_path / SAMPLE_CONFIG).write_text(OmegaConf.to_yaml({"identity": old}))
    check_sample_folder(tmp_path, _identity_of(SampleCfg()))  # same settings: accepted
    with pytest.raises(FileExistsError, match="eta: 0.0 there, 0.5 now"):
        check_sample_folder(tmp_path, _identity_of(SampleCfg(eta=0.5)))


def test_guidance_rule_decides_the_images_and_older_folders_read_per_eval(tmp_path):
    from omegaconf import OmegaConf

    from ldm.config import SAMPLE_NON_IDENTITY_FIELDS, SampleCfg
    from ldm.eval.generate import check_sample_folder

    assert "guidance_rule" not in SAMPLE_NON_IDENTITY_FIELDS
    old = _identity_of(SampleCfg(sampler="heun", cfg_scale=2))
    del old["guidance_rule"]  # written before sample.guidance_rule existed: REPA's rule was not available
    (tmp_path / SAMPLE_CONFIG).write_text(OmegaConf.to_yaml({"identity": old}))
    check_sample_folder(tmp_path, _identity_of(SampleCfg(sampler="heun", cfg_scale=2)))
    with pytest.raises(FileExistsError, match="guidance_rule: 'per_eval' there, 'step_start' now"):
        check_sample_folder(tmp_path, _identity_of(SampleCfg(sampler="heun", cfg_scale=2,
                                                             guidance_rule="step_start")))
