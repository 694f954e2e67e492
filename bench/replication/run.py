"""Replication study: do EQ-VAE and VA-VAE latents make a latent generator learn faster here too?

    python bench/replication/run.py --quick            # 3 tokenizers x 3 seeds on a 2-core CPU (< 30 min unloaded)
    python bench/replication/run.py --full             # sized for one GPU (see docs/replication.md)
    python bench/replication/run.py --tiny             # smoke test of the machinery (minutes; numbers mean nothing)
    options: --seeds 0,1,2  --variants kl,kl_eq,kl_va  --run-root runs/replication  --inception {off,rfid,all}
             --inception-weights PATH  --no-docs
    python bench/replication/run.py --study decoder_losses --quick   # plain vs + LPL vs + pixel post-training of the
                                                                     # generator, paired by seed (DECODER_ARMS below)
    python bench/replication/run.py --study repae --quick   # REPA on the frozen plain tokenizer vs REPA-E tuning of
                                                            # it, then REPA on the tuned one (REPAE_ARMS below;
                                                            # ~45 min for 3 seeds on an idle 2-core CPU, estimated)

For every (tokenizer variant, seed), one `ldm pipeline` run (bench/replication/<mode>.yaml + overrides) trains a KL
tokenizer of identical architecture and budget -- plain, + EQ-VAE (Kouzelis et al. 2025, arXiv:2502.09509), or
+ VA-VAE (Yao et al. 2025, arXiv:2501.01423) -- stores its latent statistics and a latent cache, and trains the same
DiT with flow matching on it, keeping the checkpoints at 25/50/75/100 % of the budget. Then this script measures:
PSNR and rFD_digits of the tokenizer (rFID with Inception too when its weights are found), gFD_digits of EMA samples
at 25/50/100 % of the generator budget (same per-index noise and labels for every run: paired), and the latent
diagnostics of ldm.eval.latents. Seeds set both stages, so the spread covers tokenizer and generator training.

VA-VAE needs a frozen vision foundation model; no pretrained DINOv2/MAE weights are available offline, so the
aligner here is the conv trunk of the digits classifier shipped with ldm (ldm/assets/digits_classifier.safetensors,
supervised on the digits' classes; 64-d features on an 8 x 8 grid = the latent grid): ldm.encoders.build_encoder
("digits"), named by `tokenizer.va.encoder: digits` in the configs. That departs from the paper (self-supervised
DINOv2 features of ImageNet).

Outputs: <run-root>/<mode>/results.json (every number), per run <variant>_s<seed>/study.json and diagnostics/;
docs/replication.md (the block between the GENERATED markers), assets/replication_gfid.png (gFD vs steps, min-max
bands over seeds) and assets/replication_latents.png (latent spectra and equivariance). Re-running skips finished
stages and measurements; the same seeds give the same numbers on the same CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

MODES = {  # study settings per mode; the training budgets live in <mode>.yaml
    "tiny": {"num_samples": 60, "recon_images": 128, "diag_images": 32, "inception": "off"},
    "quick": {"num_samples": 500, "recon_images": 1797, "diag_images": 512, "inception": "off"},
    "full": {"num_samples": 10000, "recon_images": 1797, "diag_images": 1797, "inception": "all"},
}
VARIANTS = {
    "kl": ("plain KL", []),
    "kl_eq": ("KL + EQ-VAE", ["tokenizer.tokenizer.eq.enabled=true"]),
    "kl_va": ("KL + VA-VAE", ["tokenizer.tokenizer.va.enabled=true"]),
}
FRACTIONS = (0.25, 0.5, 1.0)
BEGIN, END = "<!-- BEGIN GENERATED (bench/replication/run.py) -->", "<!-- END GENERATED -->"


# ----------------------------------------------------------------------------------------------------------- config
def study_config(mode: str, root: Path, variant: str, seed: int, extra: tuple[str, ...] = (),
                 overlays: tuple[Path, ...] = ()):
    """The pipeline config <root>/<mode>/<variant>_s<seed>: <mode>.yaml, then `overlays` (YAML files merged over it),
    then the seeds, the variant's switches (VARIANTS; none for a name that is not a tokenizer variant) and `extra`."""
    from ldm.config import PipelineCfg, load_config

    switches = VARIANTS[variant][1] if variant in VARIANTS else []
    overrides = [f"name={variant}_s{seed}", f"run_root={root / mode}", f"tokenizer.seed={seed}",
                 f"generator.seed={seed}", *switches, *extra]
    cfg = load_config([HERE / f"{mode}.yaml", *overlays], overrides, schema=PipelineCfg)
    t = cfg.generator.train
    steps = [round(f * t.max_steps) for f in FRACTIONS]
    if any(s % t.ckpt_every for s in steps) or t.keep_last < t.max_steps // t.ckpt_every:
        raise ValueError(f"{mode}.yaml: generator.train.ckpt_every={t.ckpt_every} / keep_last={t.keep_last} do not "
                         f"keep the checkpoints at steps {steps}")
    return cfg


# ----------------------------------------------------------------------------------------------------------- one run
def measure_run(cfg, variant: str, settings: dict, cache_dir: Path, inception_weights: str | None) -> dict:
    """Train (pipeline) and measure one (variant, seed); cached in <run>/study.json for identical settings."""
    from ldm.pipeline import run_pipeline
    from ldm.tokenizers.export import load_tokenizer

    run_dir = cfg.run_dir
    record_file = run_dir / "study.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            return record
    summary = run_pipeline(cfg, progress=False)
    seconds = {k: v["seconds"] for k, v in summary["stages"].items()}

    measured, tok_seconds = measure_tokenizer(load_tokenizer(run_dir / "tokenizer"), run_dir / "diagnostics",
                                              settings, cache_dir, inception_weights)
    record: dict = {"variant": variant, "seed": cfg.tokenizer.seed, "settings": settings, **measured}
    seconds.update(tok_seconds)

    start = time.perf_counter()
    max_steps = cfg.generator.train.max_steps
    record["gfd_digits"], record["gfid"], record["steps"] = [], [], []
    for frac in FRACTIONS:
        step = round(frac * max_steps)
        ckpt = run_dir / "generator" / "checkpoints" / f"step_{step:07d}"
        fd, fid = sample_gfd(ckpt, run_dir / "samples" / f"step_{step:07d}", settings, cache_dir,
                             cfg.generator.sample.seed, inception_weights)
        record["steps"].append(step)
        record["gfd_digits"].append(fd)
        if fid is not None:
            record["gfid"].append(fid)
    return save_record(record, seconds, start, record_file)


def measure_tokenizer(tok, diag_dir: Path, settings: dict, cache_dir: Path,
                      inception_weights: str | None) -> tuple[dict, dict]:
    """({psnr, rfd_digits[, rfid], diagnostics}, {recon_eval, diagnostics: seconds}) of a frozen tokenizer: posterior-
    mean reconstructions of the first settings["recon_images"] digits, and ldm.eval.latents.diagnose_tokenizer (what
    `ldm eval latents` reports) on settings["diag_images"] digits with the digits-classifier trunk as the aligner,
    its JSON and figure written to `diag_dir`."""
    from ldm.encoders import build_encoder
    from ldm.eval.evaluate import evaluate_reconstruction
    from ldm.eval.latents import diagnose_tokenizer

    start = time.perf_counter()
    recon = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), "digits", extractor="digits",
                                    metrics=("rfd", "psnr"), size=32, num_images=settings["recon_images"],
                                    cache_dir=cache_dir, progress=False)
    out: dict = {"psnr": recon["psnr"], "rfd_digits": recon["rfd_digits"]}
    if settings["inception"] in ("rfid", "all"):
        rec_i = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), "digits", extractor="inception",
                                        extractor_weights=inception_weights, metrics=("rfd",), size=32,
                                        num_images=settings["recon_images"], cache_dir=cache_dir, progress=False)
        out["rfid"] = rec_i["rfid"]
    seconds = {"recon_eval": round(time.perf_counter() - start, 1)}

    start = time.perf_counter()
    out["diagnostics"] = diagnose_tokenizer(tok, "digits", num_images=settings["diag_images"], encoder=build_encoder(
        "digits"), encoder_name="digits classifier trunk", out_dir=diag_dir)
    seconds["diagnostics"] = round(time.perf_counter() - start, 1)
    return out, seconds


def save_record(record: dict, seconds: dict, sampling_start: float, record_file: Path) -> dict:
    """Add the sampling time and the phase times to `record` and write it to `record_file`."""
    seconds["sample_and_gfd"] = round(time.perf_counter() - sampling_start, 1)
    record["seconds"] = seconds
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def sample_gfd(ckpt: Path, out_dir: Path, settings: dict, cache_dir: Path, seed: int,
               inception_weights: str | None) -> tuple[float, float | None]:
    """gFD_digits (and gFID when settings say "all") of settings["num_samples"] class-balanced EMA samples of one
    generator checkpoint, drawn with per-index noise from `seed` (the same for every run: paired)."""
    import torch

    from ldm.eval.evaluate import evaluate_samples
    from ldm.eval.generate import write_samples
    from ldm.eval.generator import load_generator

    gen = load_generator(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    out = write_samples(gen, out_dir, num=settings["num_samples"], classes=list(range(gen.num_classes)), grid=False,
                        npz=True, seed=seed, progress=False)
    fd = evaluate_samples(str(out["npz"]), "digits", extractor="digits", size=32, metrics=("fd",),
                          cache_dir=cache_dir, progress=False)["fd_digits"]
    fid = None
    if settings["inception"] == "all":
        fid = evaluate_samples(str(out["npz"]), "digits", extractor="inception", size=32, metrics=("fd",),
                               extractor_weights=inception_weights, cache_dir=cache_dir, progress=False)["fid"]
    return fd, fid


# ----------------------------------------------------------------------------------------------------------- aggregate
def recon_headline(record: dict) -> dict:
    """PSNR, rFD_digits (and rFID) of a record holding measure_tokenizer's numbers."""
    return {"psnr": record["psnr"], "rfd_digits": record["rfd_digits"],
            **({"rfid": record["rfid"]} if "rfid" in record else {})}


def diag_headline(d: dict) -> dict:
    """The flat numbers of ldm.eval.latents.diagnose_tokenizer's result that enter the tables."""
    eq, sp = d["equivariance"], d["spectrum"]
    return {"hf_share_latent": sp["latent"]["hf_share"], "hf_share_image_at_latent": sp["image_at_latent"]["hf_share"],
            "rot_decoder_ratio": eq["rotation_mean"]["decoder_ratio"],
            "rot_latent_error": eq["rotation_mean"]["latent_error"],
            "scale_decoder_ratio": eq["scale_mean"]["decoder_ratio"],
            "scale_latent_error": eq["scale_mean"]["latent_error"],
            "kl_per_image": d["posterior"]["kl_per_image"], "latent_std_ratio": d["channels"]["std_ratio"],
            "cknna": d["alignment"]["cknna"], "linear_cka": d["alignment"]["linear_cka"]}


def headline(record: dict) -> dict:
    """The flat numbers of one run that enter the tables."""
    return {**recon_headline(record),
            **{f"gfd_digits@{s}": v for s, v in zip(record["steps"], record["gfd_digits"])},
            **{f"gfid@{s}": v for s, v in zip(record["steps"], record["gfid"])},
            **diag_headline(record["diagnostics"])}


def tokenizer_headline(record: dict) -> dict:
    """The flat numbers of a tokenizer-only record (measure_tokenizer's)."""
    return {**recon_headline(record), **diag_headline(record["diagnostics"])}


def aggregate(records: list[dict], key: str = "variant", row=headline) -> dict:
    """{record[key]: {metric: {mean, min, max, values}}} over seeds, the metrics of `row(record)`."""
    out: dict = {}
    for variant in dict.fromkeys(r[key] for r in records):
        rows = [row(r) for r in records if r[key] == variant]
        out[variant] = {k: {"mean": float(np.mean([row[k] for row in rows])),
                            "min": float(np.min([row[k] for row in rows])),
                            "max": float(np.max([row[k] for row in rows])),
                            "values": [row[k] for row in rows]} for k in rows[0]}
    return out


def _cell(s: dict, digits: int) -> str:
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _spread(values: np.ndarray, digits: int = 2) -> str:
    """mean [min, max] of values."""
    return _cell({"mean": values.mean(), "min": values.min(), "max": values.max()}, digits)


DIAG_COLS = [("HF share latent", "hf_share_latent", 3), ("HF share image@latent", "hf_share_image_at_latent", 3),
             ("rot. decoder ratio", "rot_decoder_ratio", 2), ("rot. latent error", "rot_latent_error", 3),
             ("scale decoder ratio", "scale_decoder_ratio", 2), ("scale latent error", "scale_latent_error", 3),
             ("KL / image [nats]", "kl_per_image", 0), ("std max/min", "latent_std_ratio", 2),
             ("CKNNA", "cknna", 3), ("linear CKA", "linear_cka", 3)]


def recon_cols(agg: dict) -> list[tuple[str, str, int]]:
    """(header, metric, decimals) of PSNR, rFD_digits and, when every row has it, rFID."""
    has_rfid = all("rfid" in agg[v] for v in agg)
    return [("PSNR [dB]", "psnr", 2), ("rFD_digits", "rfd_digits", 2)] + ([("rFID", "rfid", 2)] if has_rfid else [])


def stat_table(agg: dict, labels: dict, cols: list[tuple[str, str, int]], first: str = "tokenizer") -> list[str]:
    """Markdown rows: one per entry of `agg` (named by labels), one mean [min, max] cell per (header, metric,
    decimals) of `cols`."""
    lines = [f"| {first} | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v in agg:
        lines.append(f"| {labels[v]} | " + " | ".join(_cell(agg[v][k], d) for _, k, d in cols) + " |")
    return lines


def tables(agg: dict, steps: list[int]) -> str:
    has_gfid = all(f"gfid@{steps[-1]}" in agg[v] for v in agg)
    cols = recon_cols(agg) + [(f"gFD_digits @{s}", f"gfd_digits@{s}", 2) for s in steps]
    cols += [(f"gFID @{s}", f"gfid@{s}", 2) for s in steps] if has_gfid else []
    labels = {v: VARIANTS[v][0] for v in agg}
    return "\n".join(stat_table(agg, labels, cols) + [""] + stat_table(agg, labels, DIAG_COLS))


def paired_table(records: list[dict], steps: list[int]) -> str:
    """gFD of each variant divided by plain KL's at the same seed and step (same generator initialisation, data
    order and sampling noise: a paired comparison), mean [min, max] over seeds; < 1 = better than plain."""
    plain = {r["seed"]: r for r in records if r["variant"] == "kl"}
    others = [v for v in dict.fromkeys(r["variant"] for r in records) if v != "kl"]
    if not plain or not others:
        return ""
    lines = ["| gFD_digits / plain KL's (paired by seed) | " + " | ".join(f"@{s}" for s in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for v in others:
        ratios = np.array([[a / b for a, b in zip(r["gfd_digits"], plain[r["seed"]]["gfd_digits"])]
                           for r in records if r["variant"] == v and r["seed"] in plain])  # (seeds, steps)
        lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(_spread(ratios[:, i]) for i in range(len(steps))) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- figures
def plot_gfd(agg: dict, steps: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, stats in agg.items():
        s = [stats[f"gfd_digits@{k}"] for k in steps]
        line, = ax.plot(steps, [x["mean"] for x in s], marker="o", label=VARIANTS[v][0])
        ax.fill_between(steps, [x["min"] for x in s], [x["max"] for x in s], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="generator training steps", ylabel="gFD_digits (lower is better)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latents(records: list[dict], path: Path, title: str) -> None:
    """Left: RAPSD of the latents (seed-mean per variant) vs the images at the latent size. Right: equivariance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    for v in variants:
        sp = [r["diagnostics"]["spectrum"] for r in records if r["variant"] == v]
        ax[0].plot(sp[0]["latent"]["freq"], np.mean([s["latent"]["power"] for s in sp], 0), marker=".",
                   label=f"{VARIANTS[v][0]} latents")
    ref = records[0]["diagnostics"]["spectrum"]["image_at_latent"]
    ax[0].plot(ref["freq"], ref["power"], "k--", label="images at the latent size")
    ax[0].set(xscale="log", yscale="log", xlabel="frequency / Nyquist", ylabel="relative power",
              title="radially averaged power spectrum")
    ax[0].legend(fontsize=8)
    keys = [("rotation_mean", "decoder_ratio", "rot. dec. ratio"), ("rotation_mean", "latent_error", "rot. lat. err"),
            ("scale_mean", "decoder_ratio", "scale dec. ratio"), ("scale_mean", "latent_error", "scale lat. err")]
    pos = np.arange(len(keys))
    for i, v in enumerate(variants):
        vals = [[r["diagnostics"]["equivariance"][g][k] for r in records if r["variant"] == v] for g, k, _ in keys]
        ax[1].bar(pos + (i - 1) * 0.27, [np.mean(x) for x in vals], 0.27, label=VARIANTS[v][0],
                  yerr=[[np.mean(x) - np.min(x) for x in vals], [np.max(x) - np.mean(x) for x in vals]], capsize=3)
    ax[1].set_xticks(pos, [k[2] for k in keys])
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set(title="equivariance (mean, min-max over seeds)")
    ax[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- docs
def replace_block(text: str, begin: str, end: str, block: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `block`."""
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}"


def write_docs(path: Path, block: str) -> None:
    """Replace the generated block of docs/replication.md (the hand-written reading around it stays)."""
    text = path.read_text() if path.is_file() else f"# Replication study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN!r} ... {END!r}")
    path.write_text(replace_block(text, BEGIN, END, block))


def write_study_block(begin: str, end: str, block: str) -> None:
    """Replace a study's generated block of docs/replication.md, appending its markers first when it has none."""
    path = REPO / "docs" / "replication.md"
    text = path.read_text()
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    path.write_text(replace_block(text, begin, end, block))


def study_header(study: str, args, seeds: list[int], settings: dict, wall: float) -> str:
    """The first lines of a study's generated block: the smoke warning (--tiny), the command, seeds and wall time."""
    smoke = "**SMOKE NUMBERS (--tiny): a few training steps; they check the machinery and mean nothing.**\n\n"
    command = (f"python bench/replication/run.py --study {study} --{args.mode}"
               + ("" if args.seeds == "0,1,2" else f" --seeds {args.seeds}")
               + ("" if args.arms is None else f" --arms {args.arms}"))
    return (f"{smoke if args.mode == 'tiny' else ''}Command: `{command}` (seeds {seeds}; cells mean [min, max] "
            f"over seeds; {settings['num_samples']} EMA samples per gFD_digits; {wall / 60:.1f} min)")


def generated_block(mode: str, command: str, agg: dict, records: list[dict], steps: list[int], wall: float,
                    settings: dict, inception_weights: str | None) -> str:
    import torch

    compute = sum(sum(r["seconds"].values()) for r in records)
    per_variant = {v: np.mean([sum(r["seconds"].values()) for r in records if r["variant"] == v]) for v in agg}
    phases = {k: sum(r["seconds"].get(k, 0.0) for r in records) for k in records[0]["seconds"]}
    shown = os.path.relpath(inception_weights, REPO) if inception_weights else "not found"
    inception = {"off": f"off (`--inception rfid` or `all` adds it; weights {shown})",
                 "rfid": f"rFID only (weights {shown})", "all": f"rFID and gFID (weights {shown})"}
    seeds = sorted({r["seed"] for r in records})
    label = {"tiny": "**SMOKE NUMBERS (--tiny): a few training steps; they check the machinery and mean nothing.**",
             "quick": "Mode --quick (2-core CPU budget).", "full": "Mode --full (GPU budget)."}[mode]
    lines = [f"{label}", "", f"Command: `{command}`", "",
             f"Seeds {seeds}; cells are mean [min, max] over seeds. gFD_digits: Fréchet distance of "
             f"{settings['num_samples']} EMA samples (class-balanced, no guidance, same per-index noise for every "
             f"run) to the 1,797 digits in the digits-classifier feature space; PSNR / rFD over the first "
             f"{settings['recon_images']} digits; diagnostics over {settings['diag_images']} digits.",
             f"Inception: {inception[settings['inception']]}.", "",
             tables(agg, steps), "", paired_table(records, steps), "",
             "![gFD vs steps](../assets/replication_gfid.png)", "",
             "![latent spectra and equivariance](../assets/replication_latents.png)", "",
             f"Time: {compute / 60:.1f} min of wall-clock time recorded by the runs when they ran (" +
             ", ".join(f"{VARIANTS[v][0]} {s / 60:.1f} min per seed" for v, s in per_variant.items()) +
             "; by phase: " + ", ".join(f"{k} {s / 60:.1f}" for k, s in phases.items() if s >= 1) +
             f" min) on {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; this "
             f"invocation {wall / 60:.1f} min (finished runs are read from their study.json, not redone)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- decoder losses
# --study decoder_losses: the generator objective through the frozen decoder, on the plain-KL tokenizer of each seed
# (the "kl" pipeline run: its tokenizer and latent cache are shared by every arm, so only the objective differs).
#   plain       the pipeline's own generator: N steps of flow matching
#   lpl         N steps with the latent perceptual loss (diffusion.lpl.* at its defaults; Berrada et al. 2025)
#   plain_post  plain's EMA at N/2 (train.init_from, init_weights=ema), then N/2 more plain steps with a fresh
#               optimizer: the control of the post-training arm (same restart, no pixel loss)
#   pixel_post  the same restart with the pixel-space loss (Zhang et al. 2024; target=decoded, the cache has no
#               images)
# The post arms equal plain up to N/2 (their 25 % and 50 % numbers are plain's); all arms end at N steps.
DECODER_ARMS = {
    "plain": ("plain", (), False),
    "lpl": ("+ LPL", ("generator.diffusion.lpl.enabled=true",), False),
    "plain_post": ("plain, restarted from its 50 % EMA", (), True),
    "pixel_post": ("+ pixel post-training from the 50 % EMA", ("generator.diffusion.pixel_loss.enabled=true",
                                                                "generator.diffusion.pixel_loss.target=decoded"), True),
}
DECODER_PAIRS = (("lpl", "plain"), ("plain_post", "plain"), ("pixel_post", "plain_post"))
DBEGIN = "<!-- BEGIN GENERATED decoder losses (bench/replication/run.py --study decoder_losses) -->"
DEND = "<!-- END GENERATED decoder losses -->"


def arm_config(mode: str, root: Path, arm: str, seed: int):
    """(the plain-KL pipeline config of `seed`, the arm's generator RunConfig under that pipeline's directory)."""
    import dataclasses

    from ldm.pipeline import stage_configs

    pcfg = study_config(mode, root, "kl", seed, DECODER_ARMS[arm][1])
    _, gen = stage_configs(pcfg)
    if arm == "plain":
        return pcfg, gen
    t = gen.train
    if DECODER_ARMS[arm][2]:
        half = t.max_steps // 2
        t = dataclasses.replace(t, max_steps=half, ckpt_every=half, init_weights="ema",
                                init_from=str(pcfg.run_dir / "generator" / "checkpoints" / f"step_{half:07d}"))
    return pcfg, dataclasses.replace(gen, name=f"generator_{arm}", train=t)


def measure_arm(mode: str, root: Path, arm: str, seed: int, settings: dict, cache_dir: Path,
                inception_weights: str | None, plain: dict | None) -> dict:
    """Train one arm (the plain pipeline first, skip-done) and measure gFD at 25/50/100 % of N; cached in
    <kl_s{seed}>/study_<arm>.json for identical settings. `plain`: the plain arm's record (the post arms reuse its
    numbers up to N/2)."""
    from ldm.pipeline import run_pipeline
    from ldm.train.loop import fit

    pcfg, gen = arm_config(mode, root, arm, seed)
    record_file = pcfg.run_dir / f"study_{arm}.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            return record
    start = time.perf_counter()
    plain_pcfg, _ = arm_config(mode, root, "plain", seed)
    run_pipeline(plain_pcfg, progress=False)  # tokenizer, latent cache, plain generator (skipped when done)
    if arm != "plain" and not (gen.run_dir / "checkpoints" / f"step_{gen.train.max_steps:07d}").is_dir():
        fit(gen, progress=False)
    seconds = {"train": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    n = plain_pcfg.generator.train.max_steps
    post = DECODER_ARMS[arm][2]
    record: dict = {"arm": arm, "seed": seed, "settings": settings, "steps": [], "gfd_digits": [], "gfid": []}
    for frac in FRACTIONS:
        step = round(frac * n)
        if post and frac <= 0.5:
            i = plain["steps"].index(step)
            fd, fid = plain["gfd_digits"][i], (plain["gfid"][i] if plain["gfid"] else None)
        else:
            own = step - n // 2 if post else step
            fd, fid = sample_gfd(gen.run_dir / "checkpoints" / f"step_{own:07d}", gen.run_dir / "samples" /
                                 f"step_{step:07d}", settings, cache_dir, gen.sample.seed, inception_weights)
        add_point(record, step, fd, fid)
    return save_record(record, seconds, start, record_file)


def add_point(record: dict, step: int, fd: float, fid: float | None) -> None:
    """Append one checkpoint's gFD_digits (and gFID, when measured) at `step` to an arm's record."""
    record["steps"].append(step)
    record["gfd_digits"].append(fd)
    if fid is not None:
        record["gfid"].append(fid)


def arm_tables(records: list[dict], steps: list[int], labels: dict, pairs) -> str:
    """gFD per arm (mean [min, max] over seeds; arms named by `labels`), then the paired ratios a / b of `pairs` by
    seed (< 1 = a better)."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    lines = ["| arm | " + " | ".join(f"gFD_digits @{s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for a in arms:
        v = np.array([r["gfd_digits"] for r in records if r["arm"] == a])  # (seeds, steps)
        lines.append(f"| {labels[a]} | " + " | ".join(_spread(v[:, i]) for i in range(len(steps))) + " |")
    by = {(r["arm"], r["seed"]): r for r in records}
    pairs = [(a, b) for a, b in pairs if a in arms and b in arms]
    if pairs:
        lines += ["", "| paired by seed: gFD ratio | " + " | ".join(f"@{s}" for s in steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]
    for a, b in pairs:
        ratios = np.array([[x / y for x, y in zip(by[(a, s)]["gfd_digits"], by[(b, s)]["gfd_digits"])]
                           for (arm, s) in by if arm == a and (b, s) in by])
        lines.append(f"| {a} / {b} | " + " | ".join(_spread(ratios[:, i]) for i in range(len(steps))) + " |")
    return "\n".join(lines)


def decoder_tables(records: list[dict], steps: list[int]) -> str:
    """gFD per arm (mean [min, max] over seeds), then the paired ratios of DECODER_PAIRS by seed (< 1 = better)."""
    return arm_tables(records, steps, {a: v[0] for a, v in DECODER_ARMS.items()}, DECODER_PAIRS)


def parse_arms(text: str | None, known: dict) -> list[str]:
    """--arms as a list in `known`'s order (all of them when not given), always with "plain": the reference every
    pair and post arm needs."""
    arms = list(known) if text is None else [a for a in text.split(",") if a]
    bad = [a for a in arms if a not in known]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; expected a subset of {list(known)}")
    return [a for a in known if a == "plain" or a in arms]


def main_decoder_losses(args, seeds: list[int], settings: dict, weights: str | None) -> int:
    arms = parse_arms(args.arms, DECODER_ARMS)
    root, start, records = Path(args.run_root), time.perf_counter(), []
    cache_dir = root / args.mode / "fid_stats"
    for seed in seeds:
        plain = None
        for arm in arms:
            t0 = time.perf_counter()
            rec = measure_arm(args.mode, root, arm, seed, settings, cache_dir, weights, plain)
            plain = rec if arm == "plain" else plain
            records.append(rec)
            print(f"{arm:<10} seed {seed}: gFD_digits " + " / ".join(f"{x:.2f}" for x in rec["gfd_digits"]) +
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - start
    steps = records[0]["steps"]
    table = decoder_tables(records, steps)
    out = root / args.mode / "results_decoder_losses.json"
    out.write_text(json.dumps({"mode": args.mode, "settings": settings, "seeds": seeds, "runs": records}, indent=2)
                   + "\n")
    print(table)
    print(f"wrote {out}; wall time {wall / 60:.1f} min")
    if not args.no_docs:
        write_study_block(DBEGIN, DEND, f"{study_header('decoder_losses', args, seeds, settings, wall)}\n\n{table}")
        print("wrote docs/replication.md (decoder-loss block)")
    return 0


# ----------------------------------------------------------------------------------------------------------- REPA-E
# --study repae: REPA on the frozen plain-KL tokenizer vs REPA-E's end-to-end tuning of that tokenizer (Leng et al.
# 2025, arXiv:2504.10483; docs/end-to-end.md), then a generator trained on the tuned tokenizer. Per seed, every
# generator has the budget N = the mode's generator.train.max_steps and is measured at 25 / 50 / 100 % of it:
#   plain          the plain-KL pipeline's own generator, no REPA, on its latent cache (the decoder study's "plain")
#   repa           the same generator + REPA (the joint stage's REPA settings: repae.yaml) on the frozen plain-KL
#                  tokenizer (its export); ldm's REPA reads the images for its frozen encoder, so latents are encoded
#                  on the fly (no cache)
#   joint          REPA-E's joint run (repae.yaml over <mode>.yaml): the exported plain-KL tokenizer (the EMA weights
#                  the frozen arms use; its latent statistics start the batch norm) tuned together with a fresh
#                  discriminator, DiT and REPA projector for N steps at the tokenizer's batch; its own generator
#                  sampled end-to-end (load_generator on a joint run, as `ldm sample` does)
#   repae          repa's generator on the joint run's tuned tokenizer (exported: diffusers folder + the EMA batch
#                  norm's statistics)
#   repae_noalign  the control: the same joint run with e2e.tokenizer_align_weight=0 (the tokenizer gets N more steps
#                  of its reconstruction losses, no alignment gradient), then repa's generator on its tokenizer; it
#                  separates REPA-E's alignment from the extra tokenizer training, which a tokenizer trained for 250
#                  steps still profits from (REPA-E tunes converged VAEs)
# Paired by seed: repae / repa (the question), repae / repae_noalign (the alignment's share), repae_noalign / repa
# (the extra training's share), repa / plain (REPA itself). Tokenizers: PSNR, rFD and the latent diagnostics of the
# plain, the tuned and the control tokenizer.
REPAE_ARMS = {
    "plain": "plain KL, generator without REPA",
    "repa": "plain KL (frozen), generator + REPA",
    "joint": "REPA-E joint run's own generator (end-to-end, batch of the tokenizer)",
    "repae": "REPA-E-tuned KL, generator + REPA",
    "repae_noalign": "control: tuned without alignment, generator + REPA",
}
REPAE_PAIRS = (("repae", "repa"), ("repae", "repae_noalign"), ("repae_noalign", "repa"), ("repa", "plain"))
REPAE_TOKENIZERS = {"kl": "plain KL", "repae": "REPA-E-tuned KL", "repae_noalign": "control: tuned without alignment"}
REPA_KEYS = ("repa", "repa_encoder", "repa_weights", "repa_depth", "repa_weight", "repa_proj_dim")
EXPORT_DIR = "tokenizer_export"
RBEGIN = "<!-- BEGIN GENERATED repae (bench/replication/run.py --study repae) -->"
REND = "<!-- END GENERATED repae -->"


def repae_configs(mode: str, root: Path, seed: int) -> dict:
    """{"kl": the plain-KL pipeline config, "repae": the REPA-E one, "repae_noalign": its control} of `seed`. The
    REPA-E configs are <mode>.yaml + repae.yaml: their tokenizer stage is the joint run, which tunes the plain-KL
    tokenizer of the same seed (its export, export_pipeline_tokenizer) for the generator budget N with checkpoints at
    the generator's steps (its generator is the "joint" arm), with the generator's network, lr (optim.lr: the joint
    generator's) and EMA decay, and samples with the generator's sample settings (the same per-index noise as every
    arm); the control sets e2e.tokenizer_align_weight=0."""
    import dataclasses

    kl = study_config(mode, root, "kl", seed)
    g = kl.generator.train
    extra = (f"tokenizer.tokenizer.pretrained={kl.run_dir / EXPORT_DIR}", f"tokenizer.train.max_steps={g.max_steps}",
             f"tokenizer.train.ckpt_every={g.ckpt_every}", f"tokenizer.train.keep_last={g.keep_last}",
             f"tokenizer.train.ema_decay={g.ema_decay}", f"tokenizer.optim.lr={kl.generator.optim.lr}")
    out = {"kl": kl}
    for name, more in (("repae", ()), ("repae_noalign", ("tokenizer.e2e.tokenizer_align_weight=0",))):
        cfg = study_config(mode, root, name, seed, extra + more, overlays=(HERE / "repae.yaml",))
        joint = dataclasses.replace(cfg.tokenizer, model=cfg.generator.model, sample=cfg.generator.sample)
        out[name] = dataclasses.replace(cfg, tokenizer=joint)
    return out


def repa_generator(pcfg, repae_pcfg):
    """Pipeline `pcfg`'s generator stage with REPA as the joint stage of `repae_pcfg` has it (REPA_KEYS), run
    generator_repa under pcfg's directory, on images encoded on the fly by pcfg's exported tokenizer (no cache)."""
    import dataclasses

    from ldm.pipeline import stage_configs

    _, gen = stage_configs(pcfg)
    d = dataclasses.replace(gen.diffusion, **{k: getattr(repae_pcfg.tokenizer.diffusion, k) for k in REPA_KEYS})
    return dataclasses.replace(gen, name="generator_repa", diffusion=d,
                               data=dataclasses.replace(gen.data, latents=None),
                               tokenizer=dataclasses.replace(gen.tokenizer, checkpoint=str(pcfg.run_dir / EXPORT_DIR)))


def finished(cfg) -> bool:
    """Whether training run `cfg` has its last checkpoint."""
    return (cfg.run_dir / "checkpoints" / f"step_{cfg.train.max_steps:07d}").is_dir()


def measure_generator(arm: str, seed: int, gen, record_file: Path, settings: dict, cache_dir: Path,
                      inception_weights: str | None, prepare=None) -> dict:
    """Train run `gen` (after `prepare()`, which makes what it needs; skipped when its last checkpoint exists) and
    measure gFD at FRACTIONS of its budget from its own checkpoints (a generator or a joint run); cached in
    `record_file` for identical settings."""
    from ldm.train.loop import fit

    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            return record
    start = time.perf_counter()
    if prepare is not None:
        prepare()
    if not finished(gen):
        fit(gen, progress=False)
    seconds = {"train": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    record: dict = {"arm": arm, "seed": seed, "settings": settings, "steps": [], "gfd_digits": [], "gfid": []}
    for step in (round(frac * gen.train.max_steps) for frac in FRACTIONS):
        ckpt, samples = (gen.run_dir / part / f"step_{step:07d}" for part in ("checkpoints", "samples"))
        add_point(record, step, *sample_gfd(ckpt, samples, settings, cache_dir, gen.sample.seed, inception_weights))
    return save_record(record, seconds, start, record_file)


def export_pipeline_tokenizer(pcfg) -> Path:
    """A pipeline's tokenizer as `ldm export` writes it, in <pipeline>/tokenizer_export: a diffusers AutoencoderKL
    folder + latent_stats.json (a tokenizer run: its EMA weights and latent statistics; a joint run: its tuned
    tokenizer and the EMA batch norm's statistics). Written beside and renamed into place; kept while its fingerprint
    is the run's."""
    import shutil

    from ldm.tokenizers.export import export_tokenizer, load_tokenizer

    out, run = pcfg.run_dir / EXPORT_DIR, pcfg.run_dir / "tokenizer"
    if out.is_dir() and load_tokenizer(out).fingerprint == load_tokenizer(run).fingerprint:
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_tokenizer(run, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def tune_and_export(pcfg, plain_pcfg) -> Path:
    """Train REPA-E pipeline `pcfg`'s joint run (unless finished) from `plain_pcfg`'s exported tokenizer, then export
    its tuned tokenizer."""
    from ldm.pipeline import stage_configs
    from ldm.train.loop import fit

    export_pipeline_tokenizer(plain_pcfg)
    joint, _ = stage_configs(pcfg)
    if not finished(joint):
        fit(joint, progress=False)
    return export_pipeline_tokenizer(pcfg)


def measure_study_tokenizer(name: str, seed: int, pcfg, settings: dict, cache_dir: Path,
                            inception_weights: str | None) -> dict:
    """measure_tokenizer of pipeline `pcfg`'s exported tokenizer, cached in <pipeline>/study_tokenizer.json for
    identical settings (diagnostics in <pipeline>/diagnostics)."""
    from ldm.tokenizers.export import load_tokenizer

    record_file = pcfg.run_dir / "study_tokenizer.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") == settings:
            return record
    measured, seconds = measure_tokenizer(load_tokenizer(export_pipeline_tokenizer(pcfg)), pcfg.run_dir /
                                          "diagnostics", settings, cache_dir, inception_weights)
    record = {"tokenizer": name, "seed": seed, "settings": settings, **measured, "seconds": seconds}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def repae_tokenizer_tables(records: list[dict]) -> str:
    """PSNR / rFD and the latent diagnostics per tokenizer (mean [min, max] over seeds), then each tuned tokenizer's
    PSNR and CKNNA minus the plain one's, paired by seed."""
    agg = aggregate(records, key="tokenizer", row=tokenizer_headline)
    lines = stat_table(agg, REPAE_TOKENIZERS, recon_cols(agg)) + [""] + stat_table(agg, REPAE_TOKENIZERS, DIAG_COLS)
    by = {(r["tokenizer"], r["seed"]): tokenizer_headline(r) for r in records}
    for name in [t for t in agg if t != "kl"]:
        seeds = [s for (t, s) in by if t == name and ("kl", s) in by]
        if seeds:
            delta = {k: np.array([by[(name, s)][k] - by[("kl", s)][k] for s in seeds]) for k in ("psnr", "cknna")}
            lines += ["", (f"Paired by seed, {REPAE_TOKENIZERS[name]} − plain KL: PSNR {_spread(delta['psnr'])} dB, "
                           f"CKNNA {_spread(delta['cknna'], 3)}.")]
    return "\n".join(lines)


def measure_repae_seed(mode: str, root: Path, seed: int, settings: dict, cache_dir: Path,
                       weights: str | None, arms=tuple(REPAE_ARMS)) -> tuple[list[dict], list[dict]]:
    """(the gFD records of `arms`, the tokenizers' records) of one seed, each run trained where needed, in an order
    where each finds what it needs (the plain-KL pipeline, its export, the joint runs, their exports). The control's
    tokenizer is measured only with its arm."""
    from ldm.pipeline import stage_configs

    cfgs = repae_configs(mode, root, seed)
    kl, repae, control = cfgs["kl"], cfgs["repae"], cfgs["repae_noalign"]
    common = (settings, cache_dir, weights)
    records = []

    def report(rec: dict, t0: float) -> None:
        records.append(rec)
        print(f"{rec['arm']:<14} seed {seed}: gFD_digits " + " / ".join(f"{x:.2f}" for x in rec["gfd_digits"]) +
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    measures = {
        "plain": lambda: measure_arm(mode, root, "plain", seed, *common, None),  # trains the plain-KL pipeline
        "repa": lambda: measure_generator("repa", seed, repa_generator(kl, repae), kl.run_dir / "study_repa.json",
                                          *common, prepare=lambda: export_pipeline_tokenizer(kl)),
        "joint": lambda: measure_generator("joint", seed, stage_configs(repae)[0], repae.run_dir / "study_joint.json",
                                           *common, prepare=lambda: export_pipeline_tokenizer(kl)),  # its start
        **{name: lambda name=name, pcfg=pcfg: measure_generator(
            name, seed, repa_generator(pcfg, repae), pcfg.run_dir / "study_repa.json", *common,
            prepare=lambda: tune_and_export(pcfg, kl)) for name, pcfg in (("repae", repae), ("repae_noalign", control))},
    }
    for arm in arms:
        t0 = time.perf_counter()
        report(measures[arm](), t0)
    tokenizers = []
    for name, pcfg in (("kl", kl), ("repae", repae), ("repae_noalign", control)):
        if name != "kl" and name not in arms:
            continue
        tokenizers.append(measure_study_tokenizer(name, seed, pcfg, *common))
        print(f"{name:<14} seed {seed}: PSNR {tokenizers[-1]['psnr']:.2f}  rFD_digits "
              f"{tokenizers[-1]['rfd_digits']:.2f}", flush=True)
    return records, tokenizers


def main_repae(args, seeds: list[int], settings: dict, weights: str | None) -> int:
    arms = parse_arms(args.arms, REPAE_ARMS)
    root, start, records, tokenizers = Path(args.run_root), time.perf_counter(), [], []
    cache_dir = root / args.mode / "fid_stats"
    for seed in seeds:
        recs, toks = measure_repae_seed(args.mode, root, seed, settings, cache_dir, weights, arms)
        records += recs
        tokenizers += toks
    wall = time.perf_counter() - start
    steps = records[0]["steps"]
    arm_table = arm_tables(records, steps, REPAE_ARMS, REPAE_PAIRS)
    tok_table = repae_tokenizer_tables(tokenizers)
    out = root / args.mode / "results_repae.json"
    out.write_text(json.dumps({"mode": args.mode, "settings": settings, "seeds": seeds, "runs": records,
                               "tokenizers": [{k: v for k, v in r.items() if k != "diagnostics"} |
                                              {"headline": tokenizer_headline(r)} for r in tokenizers]}, indent=2)
                   + "\n")
    per_arm = {a: np.mean([sum(r["seconds"].values()) for r in records if r["arm"] == a])
               for a in dict.fromkeys(r["arm"] for r in records)}
    timing = ("Time per seed, training + sampling as recorded when each arm ran (an arm's training includes the runs "
              "it was the first to need: plain the plain-KL pipeline, repae and repae_noalign their joint runs): " +
              ", ".join(f"{a} {s / 60:.1f} min" for a, s in per_arm.items()) + "; tokenizer measurements "
              f"{np.mean([sum(r['seconds'].values()) for r in tokenizers]) / 60:.1f} min.")
    print(arm_table, tok_table, timing, sep="\n\n")
    print(f"wrote {out}; wall time {wall / 60:.1f} min")
    if not args.no_docs:
        write_study_block(RBEGIN, REND, f"{study_header('repae', args, seeds, settings, wall)}\n\n{arm_table}\n\n"
                                        f"{tok_table}\n\n{timing}")
        print("wrote docs/replication.md (REPA-E block)")
    return 0


# ----------------------------------------------------------------------------------------------------------- main
def default_inception_weights() -> str | None:
    root = Path(os.environ.get("LDM_SHARED", REPO.parent / "shared"))
    path = root / "weights" / "fid_inception_v3_tf2015.pth"
    return str(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    for m in MODES:
        mode.add_argument(f"--{m}", dest="mode", action="store_const", const=m)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (>= 3 for the spread)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--run-root", default=str(REPO / "runs" / "replication"))
    p.add_argument("--inception", choices=["off", "rfid", "all"], default=None,
                   help="Inception-v3 FIDs: off, rFID only, or rFID and gFID (default: per mode)")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights (default: $LDM_SHARED or "
                   "../shared weights/fid_inception_v3_tf2015.pth when present)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/replication.md and assets/")
    p.add_argument("--study", choices=["tokenizers", "decoder_losses", "repae"], default="tokenizers",
                   help="tokenizers: plain vs EQ-VAE vs VA-VAE latents; decoder_losses: plain vs + LPL vs + pixel "
                        "post-training of the generator on the plain tokenizer (--arms); repae: REPA on the frozen "
                        "plain tokenizer vs REPA-E tuning of it, then generators on the tuned tokenizer")
    p.add_argument("--arms", default=None, help=f"comma list of arms (default: all): --study decoder_losses "
                   f"{list(DECODER_ARMS)}, --study repae {list(REPAE_ARMS)}")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; expected a subset of {list(VARIANTS)}")
    weights = args.inception_weights or default_inception_weights()
    settings = dict(MODES[args.mode])
    if args.inception is not None:
        settings["inception"] = args.inception
    if settings["inception"] != "off" and weights is None:
        print("Inception weights not found: Inception FIDs skipped (give --inception-weights)")
        settings["inception"] = "off"

    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.study == "decoder_losses":
        return main_decoder_losses(args, seeds, settings, weights)
    if args.study == "repae":
        return main_repae(args, seeds, settings, weights)
    root = Path(args.run_root)
    cache_dir = root / args.mode / "fid_stats"
    start = time.perf_counter()
    records = []
    for seed in seeds:
        for variant in variants:
            t0 = time.perf_counter()
            cfg = study_config(args.mode, root, variant, seed)
            rec = measure_run(cfg, variant, settings, cache_dir, weights)
            records.append(rec)
            print(f"{variant:<6} seed {seed}: PSNR {rec['psnr']:.2f}  rFD_digits {rec['rfd_digits']:.2f}  gFD_digits "
                  + " / ".join(f"{x:.2f}" for x in rec["gfd_digits"]) + f"  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    wall = time.perf_counter() - start
    steps = records[0]["steps"]
    agg = aggregate(records)
    out = root / args.mode / "results.json"
    out.write_text(json.dumps({"mode": args.mode, "settings": settings, "seeds": seeds, "aggregate": agg,
                               "runs": [{k: v for k, v in r.items() if k != "diagnostics"} | {"headline": headline(r)}
                                        for r in records]}, indent=2) + "\n")
    print(tables(agg, steps))
    print(f"wrote {out}; wall time {wall / 60:.1f} min")
    if not args.no_docs:
        title = f"{args.mode} mode, seeds {seeds}" + (" (SMOKE: meaningless)" if args.mode == "tiny" else "")
        plot_gfd(agg, steps, REPO / "assets" / "replication_gfid.png", f"gFD_digits vs steps ({title})")
        plot_latents(records, REPO / "assets" / "replication_latents.png", f"latent diagnostics ({title})")
        command = "python bench/replication/run.py --" + args.mode + ("" if args.seeds == "0,1,2" else
                                                                     f" --seeds {args.seeds}")
        write_docs(REPO / "docs" / "replication.md",
                   generated_block(args.mode, command, agg, records, steps, wall, settings, weights))
        print("wrote docs/replication.md, assets/replication_gfid.png, assets/replication_latents.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
