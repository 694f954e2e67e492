"""Every user error of every command is one line on stderr, `ldm <command>: error: ...`, naming the key, file or
step and the fix, with exit status 2 and no traceback (issue #13 item 5), on tiny inputs: 16 embedded digits at 16 px
in an .npz, random diffusers VAEs (f=2) and a DiT-Pico/2 generator trained for one step. The CLI sees an empty torch
hub cache and no LDM_* variables, as on a fresh machine without downloaded weights.

A few cases per command (`ldm`) run the real CLI in a subprocess: they pin what a user's shell sees, stderr whole,
warnings included. The others (`cli`) call the same entry point, ldm.cli.main, in this process with stderr captured:
the same error mapping (ldm.cli.common) on the same line, without paying an interpreter start and the
diffusers/transformers imports (5-8 s of CPU) per case; an exception that escapes main is reported as the traceback
a subprocess would print.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

SIZE = 16  # px; the VAEs downsample by 2: 8x8x4 latents


class Pickled:
    """A class torch.load(weights_only=True) must refuse to rebuild (its file is a pickle, not a state dict)."""

    def __init__(self):
        self.weight = torch.zeros(2)


def tiny_vae(path: Path, seed: int) -> Path:
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(seed)
    build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                         sample_size=SIZE).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{root, npz, vae, other_vae, cache (encoded by other_vae), gen.yaml, gen (a run without EMA), env}."""
    from ldm.config import load_config
    from ldm.data.embedded import digits_arrays
    from ldm.data.latents import build_latent_cache
    from ldm.tokenizers.export import load_tokenizer
    from ldm.train.loop import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli_errors")
    images, labels = digits_arrays(SIZE)
    npz = root / "digits16.npz"
    np.savez(npz, arr_0=images[:16], arr_1=labels[:16] % 4)
    vae, other_vae = tiny_vae(root / "vae", 0), tiny_vae(root / "other_vae", 1)
    cache = root / "cache"
    build_latent_cache(load_tokenizer(other_vae), str(npz), cache, image_size=SIZE, batch_size=16, progress=False)
    gen_yaml = root / "gen.yaml"
    gen_yaml.write_text(f"stage: generator\ndata:\n  source: {npz}\n  image_size: {SIZE}\n"
                        f"tokenizer:\n  pretrained: {vae}\n  stats_num_images: 16\n"
                        f"model:\n  preset: DiT-Pico/2\nsample:\n  steps: 2\n"
                        f"train:\n  run_root: {root / 'runs'}\n  max_steps: 1\n  batch_size: 4\n  ema: false\n"
                        f"  ckpt_every: 1000\n")
    fit(load_config([gen_yaml], ["name=gen"]), progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_HOME=str(root / "torch_home"))
    yield {"root": root, "npz": npz, "vae": vae, "other_vae": other_vae, "cache": cache, "gen_yaml": gen_yaml,
           "gen": root / "runs" / "gen", "env": env}
    torch.set_num_threads(threads)


def ldm(setup_or_env, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m ldm.cli ARGS` (or `python SCRIPT ARGS`) in a subprocess, from the repository root."""
    env = setup_or_env["env"] if isinstance(setup_or_env, dict) else None
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "ldm.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def cli(setup_or_env, *args: str) -> subprocess.CompletedProcess:
    """`ldm ARGS` through ldm.cli.main in this process, with `ldm`'s environment (empty torch hub cache, no LDM_*),
    as a CompletedProcess: returncode, stdout and stderr as the subprocess would have them."""
    import contextlib
    import io
    import traceback

    from ldm.cli import main

    env = setup_or_env["env"] if isinstance(setup_or_env, dict) else {**os.environ}
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key in [k for k in os.environ if k.startswith("LDM_")]:
            mp.delenv(key)
        if "TORCH_HOME" in env:
            mp.setenv("TORCH_HOME", env["TORCH_HOME"])
        mp.chdir(REPO)
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001 - what `python -m ldm.cli` would print as a traceback
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["ldm", *map(str, args)], code, out.getvalue(), err.getvalue())


def one_error_line(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """The single stderr line of a user error; asserts exit 2, the `ldm <command>: error:` prefix, no traceback and
    that the line names each of `needles`."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    line = lines[0]
    assert proc.returncode == 2, (proc.returncode, line)
    assert line.startswith(f"ldm {command}: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------------------------ config kinds
def test_train_given_a_pipeline_config_points_at_ldm_pipeline(tmp_path):
    quickstart = "configs/quickstart.yaml"
    one_error_line(cli(None, "train", quickstart), "train",
                   f"{quickstart}: this is a pipeline config: run `ldm pipeline {quickstart}`")
    one_error_line(ldm(None, quickstart, "train.max_steps=3", script="train.py"), "train",
                   "this is a pipeline config: run `ldm pipeline")
    handmade = tmp_path / "mine.yaml"
    handmade.write_text("run_root: runs\nstages: [tokenizer]\ntokenizer:\n  train:\n    max_steps: 3\n"
                        "generator:\n  model:\n    preset: DiT-Pico/2\n")
    line = one_error_line(cli(None, "train", handmade), "train",
                          f"this is a pipeline config: run `ldm pipeline {handmade}`")
    assert "unknown config key" not in line
    one_error_line(cli(None, "pipeline", "configs/tokenizer/tiny_f4.yaml"), "pipeline",
                   "this is a run config: run `ldm train configs/tokenizer/tiny_f4.yaml`")
    # a plain typo in a run config is still the did-you-mean error, not a config-kind guess
    one_error_line(cli(None, "train", "configs/tokenizer/tiny_f4.yaml", "train.max_stepz=3"), "train",
                   "did you mean 'train.max_steps'")


# ------------------------------------------------------------------------------------------------------ ldm train
def test_batch_larger_than_the_dataset(setup):
    proc = ldm(setup, "train", "configs/tokenizer/tiny_f4.yaml", f"data.source={setup['npz']}",
               f"data.image_size={SIZE}", "train.batch_size=64", f"train.run_root={setup['root'] / 'runs'}",
               "name=big_batch", "--no-progress")
    one_error_line(proc, "train", "16 items", "train.batch_size")


def test_patch_size_not_dividing_the_latent_names_preset_and_image_size(setup):
    proc = cli(setup, "train", setup["gen_yaml"], "name=patch", "model.preset=DiT-Pico/4", "data.image_size=12",
               "--no-progress")  # 12 px at f=2: 6x6 latents, patch 4
    line = one_error_line(proc, "train", "model.preset='DiT-Pico/4'", "data.image_size=12", "[1, 2]",
                          "a multiple of 8")
    assert "input_size" not in line


def test_generator_without_a_tokenizer(setup):
    proc = cli(setup, "train", setup["gen_yaml"], "name=notok", "tokenizer.pretrained=null", "--no-progress")
    one_error_line(proc, "train", "tokenizer.checkpoint=", "tokenizer.pretrained=")


def test_latent_cache_of_another_tokenizer(setup):
    proc = cli(setup, "train", setup["gen_yaml"], "name=cached", f"data.latents={setup['cache']}", "--no-progress")
    one_error_line(proc, "train", str(setup["cache"]), "data.latents", "ldm cache-latents")


def test_preset_changed_on_resume(setup, tmp_path):
    shutil.copytree(setup["gen"], tmp_path / "runs" / "gen")
    proc = cli(setup, "train", setup["gen_yaml"], "name=gen", f"train.run_root={tmp_path / 'runs'}",
               "model.preset=DiT-Pico/1", "train.max_steps=2", "--no-progress")
    one_error_line(proc, "train", "model.preset", "DiT-Pico/2", "DiT-Pico/1")


# ------------------------------------------------------------------------------------------------------ ldm sample
def test_missing_ema_weights(setup, tmp_path):
    one_error_line(cli(setup, "sample", setup["gen"], "--num", "2", "--out", tmp_path / "s", "--no-progress"),
                   "sample", "no EMA weights", "train.ema=false", "--no-ema")
    assert not (tmp_path / "s").exists()


def test_unknown_sampler_and_missing_run(setup, tmp_path):
    one_error_line(cli(setup, "sample", setup["gen"], "--sampler", "nope", "--out", tmp_path / "s"), "sample",
                   "sample.sampler='nope'", "heun")
    one_error_line(ldm(setup, "sample", tmp_path / "no_run", "--out", tmp_path / "s"), "sample",
                   str(tmp_path / "no_run"))


def test_damaged_checkpoint(setup, tmp_path):
    run = tmp_path / "gen"
    shutil.copytree(setup["gen"], run)
    (model,) = run.glob("checkpoints/step_*/model.safetensors")
    model.write_bytes(b"not a safetensors file")
    one_error_line(cli(setup, "sample", run, "--no-ema", "--num", "2", "--out", tmp_path / "s"), "sample",
                   str(model))


def test_refused_pickle(setup, tmp_path):
    weights = tmp_path / "DiT-pickled.pt"
    torch.save(Pickled(), weights)
    proc = cli(setup, "sample", "--official", "dit", "--weights", weights, "--tokenizer", setup["vae"], "--num", "2",
               "--out", tmp_path / "s")
    one_error_line(proc, "sample", str(weights), "Pickled", "state_dict()", ".safetensors")


def test_torch_load_failures_are_user_errors_naming_the_file(tmp_path):
    """Whichever loader calls torch.load (official weights, encoders, LPIPS, Inception), a refused pickle or an
    empty / truncated / foreign file is one line naming the file; a RuntimeError raised elsewhere stays a bug."""
    from ldm.cli.common import is_user_error, one_line

    torch.save({"w": torch.zeros(64)}, tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    files = {"truncated.pt": (good[: len(good) // 2], "PytorchStreamReader failed"), "empty.pt": (b"", "empty"),
             "junk.pt": (b"\x80\x02 junk" * 8, "cannot be read as a tensor file")}
    for name, (content, reason) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(Exception) as info:
            torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert is_user_error(info.value), name
        assert str(tmp_path / name) in one_line(info.value) and reason in one_line(info.value)
    with pytest.raises(RuntimeError) as info:
        torch.zeros(2) @ torch.zeros(3)
    assert not is_user_error(info.value)


# ------------------------------------------------------------------------------------------------------ data, eval
def test_corrupt_image_with_on_error_raise(setup, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE), (200, 10, 10)).save(folder / "a_good.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = ldm(setup, "cache-latents", "--tokenizer", setup["vae"], "--data", folder, "--out", tmp_path / "cache",
               "--image-size", SIZE, "--on-error", "raise", "--workers", "0", "--no-progress")
    one_error_line(proc, "cache-latents", "b_broken.png")


@pytest.mark.slow  # ~50 s: two tokenizer loads and a reconstruction pass in subprocesses
def test_reconstruction_metrics_offline_name_the_metric_to_drop(setup, tmp_path, monkeypatch, capsys):
    """Default --metrics need the Inception and VGG16 weights; without them the command stops before any work, and
    the --metrics it suggests run offline."""
    from ldm.cli import main

    line = one_error_line(ldm(setup, "eval", "rfid", "--tokenizer", setup["vae"], "--data", setup["npz"]),
                          "eval rfid", "rfd and lpips", "--metrics psnr,ssim", "--inception-weights",
                          "--lpips-weights", "vgg16-397923af.pth")
    line = one_error_line(ldm(setup, "eval", "recon", "--recons", setup["npz"], "--data", setup["npz"],
                              "--extractor", "digits"), "eval recon", "lpips needs", "--metrics rfd,psnr,ssim")
    suggested = re.search(r"run without it: --metrics ([\w,]+)", line).group(1)
    monkeypatch.setenv("TORCH_HOME", setup["env"]["TORCH_HOME"])  # the same empty cache, in this process
    assert main(["eval", "recon", "--recons", str(setup["npz"]), "--data", str(setup["npz"]), "--extractor", "digits",
                 "--metrics", suggested, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"psnr"' in out and '"rfd_digits"' in out


def test_fid_without_inception_weights(setup):
    one_error_line(cli(setup, "eval", "fid", "--samples", setup["npz"], "--ref", setup["npz"]), "eval fid",
                   "pt_inception-2015-12-05-6726825d.pth", "--inception-weights")


# ------------------------------------------------------------------------------------------------------ progress bars
def test_tokenizer_stats_and_latent_diagnostics_draw_bars_unless_no_progress(setup, tmp_path, capsys):
    from ldm.cli import main

    vae = tmp_path / "vae"
    shutil.copytree(setup["vae"], vae)  # tokenizer-stats writes latent_stats.json into it
    stats = ["tokenizer-stats", str(vae), "--data", str(setup["npz"]), "--image-size", str(SIZE), "--num", "8"]
    latents = ["eval", "latents", "--tokenizer", str(vae), "--data", str(setup["npz"]), "--num-images", "4",
               "--out", str(tmp_path / "diag"), "--device", "cpu"]
    for argv, bar in ((stats, "latent statistics"), (latents, "equivariance")):
        assert main(argv) == 0
        assert bar in capsys.readouterr().err
        assert main([*argv, "--no-progress"]) == 0
        assert bar not in capsys.readouterr().err
