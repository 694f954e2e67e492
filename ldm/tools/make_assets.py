"""Regenerate the README pictures in assets/ from the quickstart: `python -m ldm.tools.make_assets`.

Runs (or, when complete, reuses) `ldm quickstart` under --run-root, then writes
    assets/quickstart_grid.png    the 10x10 class-conditional grid sampled with CFG (one class per row)
    assets/tokenizer_recon.png    held-out digits (top) and their reconstructions by the EQ-VAE tokenizer (bottom)
    assets/loss_curves.png        training losses of both stages from their metrics.jsonl
Everything is seeded, so the same machine type gives the same pictures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def upscale(path: Path, out: Path, factor: int) -> None:
    """Nearest-neighbour enlargement so 32-px digits stay crisp on a web page."""
    img = Image.open(path).convert("RGB")
    img.resize((img.width * factor, img.height * factor), resample=Image.NEAREST).save(out)


def reconstruction_grid(tokenizer_dir: Path, out: Path, n: int = 12, factor: int = 3) -> None:
    from ldm.data.embedded import digits_arrays
    from ldm.io import make_grid, save_image_grid
    from ldm.tokenizers.export import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    images, _ = digits_arrays(32)
    x = torch.from_numpy(np.array(images[-n:])).permute(0, 3, 1, 2).float() / 127.5 - 1  # held-out end of the set
    with torch.no_grad():
        rec = tok.decode(tok.encode(x)).clamp(-1, 1)
    save_image_grid(make_grid(torch.cat([x, rec]), nrow=n), out)
    upscale(out, out, factor)


def loss_curves(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    panels = [("tokenizer", ["train/loss_rec"], "L1 reconstruction (EQ-VAE modes mixed)"),
              ("generator", ["train/mse"], "flow-matching MSE (velocity)")]
    for ax, (stage, keys, title) in zip(axes, panels):
        rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines() if line]
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=key.split("/")[-1])
        if stage == "tokenizer":  # the adversarial term trades some L1 for sharpness from here on
            from omegaconf import OmegaConf

            disc_start = OmegaConf.load(run_dir / stage / "config.yaml").tokenizer.disc_start
            ax.axvline(disc_start, color="grey", linestyle="--", linewidth=1)
            ax.annotate("PatchGAN on", (disc_start, 0.97), xycoords=("data", "axes fraction"), xytext=(4, 0),
                        textcoords="offset points", va="top", fontsize=8, color="grey")
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs", help="where the quickstart run lives (or is made)")
    parser.add_argument("--out", default=str(ASSETS), help="assets folder")
    args = parser.parse_args(argv)
    from ldm.cli import main as ldm_main

    code = ldm_main(["quickstart", f"run_root={args.run_root}"])
    if code:
        return code
    run = Path(args.run_root) / "quickstart"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    upscale(run / "samples" / "grid" / "grid.png", out / "quickstart_grid.png", 2)
    reconstruction_grid(run / "tokenizer", out / "tokenizer_recon.png")
    loss_curves(run, out / "loss_curves.png")
    print(f"wrote {out / 'quickstart_grid.png'}, {out / 'tokenizer_recon.png'}, {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
