"""Sampling generators trained on precomputed caption embeddings (text.embeddings): `ldm sample --prompt-embeddings
FILE` (ldm/eval/generator.py set_prompt_embeddings, ldm/data/embeddings.py read_prompt_embeddings), the refusals
around it, resume of a half-written folder, and conditioned training grids (grid_rows)."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_text_data import _fit, vae  # noqa: F401  (vae: the module-scoped tiny KL tokenizer fixture)

from ldm.data.embeddings import grid_rows, load_embeddings, read_prompt_embeddings
from ldm.data.sources import ArraySource, open_source

TOKENS, WIDTH = 3, 6  # the training embeddings: up to 3 tokens of width 6
CFG = 3.0


def _training_embeddings(path: Path, labels: np.ndarray) -> Path:
    """(N, 3, 6) tokens + (N, 3) masks with 1 to 3 real tokens, no pooled array (so pooled = the real tokens' mean):
    token k of image i encodes its digit and k, so the condition carries the label."""
    n = len(labels)
    tokens = np.zeros((n, TOKENS, WIDTH), np.float32)
    tokens[np.arange(n), :, labels % WIDTH] = 2.0
    tokens[np.arange(n), :, (labels // WIDTH) % WIDTH] -= 1.0
    tokens += np.linspace(-0.5, 0.5, TOKENS, dtype=np.float32)[None, :, None]
    mask = np.arange(TOKENS)[None, :] <= (labels % TOKENS)[:, None]  # (N, 3): 1, 2 or 3 real tokens
    np.savez(path, tokens=tokens, mask=mask)
    return path


@pytest.fixture(scope="module")
def emb_run(vae, tmp_path_factory):  # noqa: F811
    """A tiny text DiT trained 4 steps on the digits with per-token embeddings; a high learning rate so that its
    (zero-initialised) caption paths already matter. Training grids every 4 steps, guided with sample.cfg_scale."""
    root = tmp_path_factory.mktemp("emb")
    labels = open_source("digits", 16).labels
    emb = _training_embeddings(root / "train.npz", np.asarray(labels))
    _fit(root, vae, "name=emb", "train.max_steps=4", "data.source=digits", f"text.embeddings={emb}",
         "optim.lr=0.05", "train.sample_every=4", f"sample.cfg_scale={CFG}")
    return root


def _prompts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Three prompts of 2 tokens (one with 1 real token): fewer than the 3 the run was trained on, so the sampler
    must pad them. Large values, so that after 4 training steps which tokens are attended to already shows."""
    rng = np.random.default_rng(7)
    tokens = rng.normal(size=(3, 2, WIDTH)).astype(np.float32) * 20
    mask = np.array([[1, 1], [1, 0], [1, 1]], np.int64)
    np.savez(path, tokens=tokens, mask=mask)
    return tokens, mask.astype(bool)


def _sample(run: Path, out: Path, *args) -> int:
    from ldm.cli import main

    return main(["sample", str(run), "--out", str(out), "--steps", "3", "--precision", "fp32", "--no-progress",
                 *args])


def _by_hand(run: Path, tokens: np.ndarray, mask: np.ndarray, indices: list[int], *, seed: int = 0,
             cfg: float = CFG, attend_all: bool = False) -> np.ndarray:
    """uint8 images of sample `indices`, computed without the sampling code: the EMA network called directly on
    (B, 3, 6) tokens padded here with zeros + a False mask, pooled = the mean of the real tokens (loops), the null
    caption as model(x, t, None), classifier-free guidance u = u_null + w (u_cond - u_null) and Euler on the linear
    path over t = 1, 2/3, 1/3, 0 (x <- x + (s - t) u), noise from each index's generator; decoded as ldm does.
    attend_all: the network attends to every token, padding and masked ones included (a wrong variant)."""
    from ldm.eval.generator import load_generator
    from ldm.models.text_cond import TextCondition
    from ldm.seeding import index_generators

    gen = load_generator(run)
    n, length, _ = tokens.shape
    padded = np.zeros((n, TOKENS, WIDTH), np.float32)
    padded[:, :length] = tokens
    full_mask = np.zeros((n, TOKENS), bool)
    full_mask[:, :length] = mask
    if attend_all:
        full_mask[:] = True
    pooled = np.zeros((n, WIDTH), np.float32)
    for r in range(n):
        real = [tokens[r, k] for k in range(length) if mask[r, k]]
        pooled[r] = sum(real) / len(real)
    out = []
    with torch.no_grad():
        for i in indices:
            r = i % n
            cond = TextCondition(torch.from_numpy(padded[r:r + 1]), torch.from_numpy(full_mask[r:r + 1]),
                                 torch.from_numpy(pooled[r:r + 1]))
            g = index_generators(seed, [i])[0]
            x = torch.randn((1, *gen.latent_shape), generator=g)
            ts = [1.0, 2 / 3, 1 / 3, 0.0]
            for t, s in itertools.pairwise(ts):
                tt = torch.full((1,), t)
                u_c, u_n = gen.model(x, tt, cond), gen.model(x, tt, None)
                x = x + (s - t) * (u_n + cfg * (u_c - u_n))
            image = gen.tokenizer.decode(gen.normalizer.denormalize(x)).clamp(-1, 1)
            out.append(torch.clamp(127.5 * image + 128, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return np.stack(out)


def _off(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of uint8 values of `a` and `b` more than one grey level apart (one level: float reordering, as the
    sampler batches the conditional and null calls together)."""
    return float((np.abs(a.astype(int) - b.astype(int)) > 1).mean())


def _pngs(out: Path, n: int) -> np.ndarray:
    from ldm.eval.generate import png_path, read_png

    return np.stack([read_png(png_path(out, i)) for i in range(n)])


def test_prompt_embeddings_reach_the_guided_denoiser(emb_run, tmp_path, capsys):
    """`ldm sample --prompt-embeddings` gives sample i row i mod 3, padded, masked and pooled as in training, guided
    against the learned null caption: its PNGs equal the hand computation (to one grey level of float reordering),
    which itself differs from the samples of other rows or without guidance. Each PNG names its row beside it; a
    half-written folder resumes to the same bytes; another file into the same folder is refused."""
    run = emb_run / "emb"
    assert (run / "samples" / "step_0000004.png").is_file()  # the guided training grid on the first training rows
    tokens, mask = _prompts(tmp_path / "p.npz")
    out = tmp_path / "out"
    args = ["--prompt-embeddings", str(tmp_path / "p.npz"), "--cfg", str(CFG), "-n", "5", "--batch", "2", "--grid"]
    assert _sample(run, out, *args) == 0
    got = _pngs(out, 5)
    assert _off(got, _by_hand(run, tokens, mask, list(range(5)))) == 0
    # the comparison can tell: other rows, no guidance, or the padding mask ignored move many pixels by more than
    # one grey level (printed by the assertion below when it fails)
    other_rows = _by_hand(run, tokens[[1, 2, 0]], mask[[1, 2, 0]], list(range(5)))
    unguided = _by_hand(run, tokens, mask, list(range(5)), cfg=1.0)
    unmasked = _by_hand(run, tokens, mask, list(range(5)), attend_all=True)
    apart = [_off(got, wrong) for wrong in (other_rows, unguided, unmasked)]
    assert min(apart) > 0.04, apart
    for i in range(5):
        assert (out / f"{i:06d}.txt").read_text() == f"embedding:{tmp_path / 'p.npz'}#{i % 3}\n"
    assert (out / "grid.txt").is_file() and "#2" in (out / "grid.txt").read_text()

    # resume: two samples gone, one truncated; the same command fills them in, bit for bit
    first = {i: (out / f"{i:06d}.png").read_bytes() for i in range(5)}
    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    (out / "000002.png").write_bytes(first[2][:40])
    capsys.readouterr()
    assert _sample(run, out, *args) == 0
    assert "sampled 3 new images (2 already there)" in capsys.readouterr().out
    assert all((out / f"{i:06d}.png").read_bytes() == first[i] for i in range(5))

    # the same rows saved as another file (another name, same arrays) are the same prompts; other arrays are not
    np.savez(tmp_path / "same.npz", tokens=tokens, mask=mask)
    assert _sample(run, out, *args[:1], str(tmp_path / "same.npz"), *args[2:]) == 0
    np.savez(tmp_path / "moved.npz", tokens=tokens + 1, mask=mask)
    capsys.readouterr()
    assert _sample(run, out, *args[:1], str(tmp_path / "moved.npz"), *args[2:]) == 2
    err = capsys.readouterr().err
    assert "holds samples of another configuration" in err and "prompt_embeddings" in err


def test_training_grids_show_the_first_training_rows_guided(emb_run, tmp_path):
    """The run's step-4 grid (sample.cfg_scale=3) is 4 rows of its first 10 distinct training embeddings (the digits'
    images 0 .. 9), one per column, guided against the null caption: it equals the grid sampled from the checkpoint's
    EMA network with those rows, and differs from the unguided null-caption grid."""
    import dataclasses

    from ldm.eval.generate import read_png
    from ldm.eval.generator import load_generator
    from ldm.io import make_grid, save_image_grid

    run = emb_run / "emb"
    rows = grid_rows(load_embeddings(open_source("digits", 16), str(emb_run / "train.npz"), max_tokens=77))
    assert rows.captions.texts == [f"embedding of {name}" for name in open_source("digits", 16).names[:10]]
    gen = load_generator(run)

    def grid(labels, sample_cfg, name):
        images = gen.generate(labels, list(range(40)), sample_cfg.seed, sample_cfg=sample_cfg)
        save_image_grid(make_grid(images, nrow=10), tmp_path / name)
        return read_png(tmp_path / name)

    null = grid(None, dataclasses.replace(gen.cfg.sample, cfg_scale=1.0), "null.png")
    gen.set_prompt_embeddings(rows)
    prompted = grid(torch.arange(10).repeat(4), gen.cfg.sample, "rows.png")
    saved = read_png(run / "samples" / "step_0000004.png")
    assert gen.cfg.sample.cfg_scale == CFG and _off(saved, prompted) == 0 and _off(saved, null) > 0.04


def _one_line_exit_2(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_refusals_are_one_line(emb_run, vae, tmp_path, capsys):  # noqa: F811
    run = emb_run / "emb"
    _prompts(tmp_path / "p.npz")
    capsys.readouterr()
    _one_line_exit_2(capsys, _sample(run, tmp_path / "a", "--prompt", "a seven"),
                     "trained on precomputed embeddings", "pass --prompt-embeddings FILE")
    np.save(tmp_path / "wide.npy", np.ones((2, 2, WIDTH + 1), np.float32))
    _one_line_exit_2(capsys, _sample(run, tmp_path / "b", "--prompt-embeddings", str(tmp_path / "wide.npy")),
                     f"{tmp_path / 'wide.npy'}: embeddings of width 7", "expected (N, L, 6) per-token embeddings "
                     "with L <= 3")
    _one_line_exit_2(capsys, _sample(run, tmp_path / "c", "--prompt-embeddings", str(tmp_path / "p.npz"), "--prompt",
                                     "x"), "exclude each other")
    _one_line_exit_2(capsys, _sample(run, tmp_path / "d", "--prompt-embeddings", str(tmp_path / "nope.npz")),
                     "no such file")
    assert not any((tmp_path / d).exists() for d in "abcd")  # refused before anything was written

    # a class-conditional run has no caption to take embeddings
    _fit(tmp_path, vae, "name=cls", "train.max_steps=1", "data.source=digits")
    _one_line_exit_2(capsys, _sample(tmp_path / "cls", tmp_path / "e", "--prompt-embeddings",
                                     str(tmp_path / "p.npz")),
                     "--prompt-embeddings needs a text-conditioned generator")


def test_encoder_models_take_text_prompts_only(emb_run):
    """A generator whose checkpoint records a text encoder (no "precomputed") refuses embedding prompts, before it
    reads the file."""
    from ldm.eval.generator import load_generator

    gen = load_generator(emb_run / "emb")
    gen.caption = {k: v for k, v in gen.caption.items() if k != "precomputed"}
    with pytest.raises(ValueError, match=r"was trained with text encoder .*: give its prompts as text"):
        gen.load_prompt_embeddings("never-read.npy")


def test_prompt_files_are_checked_against_the_trained_shape(tmp_path):
    """read_prompt_embeddings: the formats text.embeddings takes, completed by the same rules (pooled-only rows are
    one token; no pooled = the real tokens' mean), padded to the trained token count; mismatches name the file and the
    expected shape."""
    pooled = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "pooled.npy", pooled)
    one = read_prompt_embeddings(tmp_path / "pooled.npy", token_dim=4, max_tokens=1, pooled_dim=4)
    assert np.array_equal(one.embeddings.tokens[:, 0], pooled) and np.array_equal(one.embeddings.pooled, pooled)
    assert one.captions.texts == [f"embedding:{tmp_path / 'pooled.npy'}#0", f"embedding:{tmp_path / 'pooled.npy'}#1"]

    feature = np.ones((1, 3, 4), np.float32) * np.array([1.0, 2.0, 3.0], np.float32)[None, :, None]
    np.savez(tmp_path / "pixart.npz", caption_feature=feature, attention_mask=np.array([[1, 1, 0]]))
    pix = read_prompt_embeddings(tmp_path / "pixart.npz", token_dim=4, max_tokens=5, pooled_dim=4)
    assert pix.embeddings.tokens.shape == (1, 5, 4) and pix.embeddings.mask.tolist() == [[True, True] + [False] * 3]
    assert pix.embeddings.pooled.tolist() == [[1.5] * 4] and not pix.embeddings.tokens[0, 3:].any()

    def refused(name, message, **kw):
        dims = {"token_dim": 4, "max_tokens": 5, "pooled_dim": 4, **kw}
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            read_prompt_embeddings(tmp_path / name, **dims)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)

    refused("pooled.npy", r"pooled \(N, 4\) embeddings, but the generator was trained on per-token embeddings of up "
                          r"to 5 tokens; expected \(N, L, 4\) per-token embeddings with L <= 5")
    refused("pixart.npz", r"3 tokens per embedding, more than the 2 the generator was trained on; expected \(N, L, 4\)",
            max_tokens=2)
    refused("pixart.npz", r"embeddings of width 4, but the generator was trained on width 8", token_dim=8)
    refused("pixart.npz", r"pooled embeddings of width 4, but the generator takes 6; expected a 'pooled' \(N, 6\)",
            pooled_dim=6)
    refused("pixart.npz", r"no 'pooled' array, but the generator was trained with one beside the tokens",
            pooled_given=True)
    np.savez(tmp_path / "given.npz", tokens=feature, pooled=np.ones((1, 4), np.float32))
    refused("given.npz", r"a 'pooled' array, but the generator's pooled embeddings were the mean", pooled_given=False)
    read_prompt_embeddings(tmp_path / "given.npz", token_dim=4, max_tokens=5, pooled_dim=None, pooled_given=False)
    np.save(tmp_path / "empty.npy", np.zeros((0, 2, 4), np.float32))
    refused("empty.npy", r"no embedding \(0 rows\)")
    refused("nope.npz", r"no such file")
    (tmp_path / "x.txt").write_text("1 2 3")
    refused("x.txt", r"expected a \.npy / \.npz file")
    np.save(tmp_path / "nan.npy", np.full((1, 2, 4), np.nan, np.float32))
    refused("nan.npy", r"tokens holds NaN or infinite values")  # training data's checks, reused


def test_grid_rows_are_the_first_distinct_training_embeddings(tmp_path):
    """Grids and periodic FID of a text.embeddings run sample the first 10 distinct rows of its data, in order."""
    source = ArraySource(np.zeros((30, 8, 8, 3), np.uint8), None, "thirty")
    values = np.array([0, 0, 1, 2, 1, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11] + [0] * 15, np.float32)
    np.save(tmp_path / "e.npy", values[:, None] * np.ones((1, 3), np.float32))
    pre = load_embeddings(source, str(tmp_path / "e.npy"), max_tokens=4)
    rows = grid_rows(pre)
    assert rows.embeddings.tokens[:, 0, 0].tolist() == list(range(10))
    assert rows.captions.texts[:3] == ["embedding of thirty[0]", "embedding of thirty[2]", "embedding of thirty[3]"]
    assert rows.pooled_given is False and rows.embeddings.mask.all()


def test_end_to_end_refuses_text_embeddings():
    from ldm.config import ConfigError, load_config
    from ldm.train.end_to_end_task import check_end_to_end_config

    cfg = load_config(None, ["stage=end_to_end", "diffusion.repa=true", "text.embeddings=e.npy"])
    with pytest.raises(ConfigError, match=r"^text.embeddings is set: the end_to_end stage trains class-conditional or "
                                          r"unconditional generators; unset text.embeddings$"):
        check_end_to_end_config(cfg)
