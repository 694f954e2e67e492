"""Benchmark: FID feature extraction, ours vs torch-fidelity vs torchmetrics, and end-to-end `ldm eval fid`.

    python bench/bench_eval.py                       # extraction images/s, CPU, 64 crops of 64 px, batch 32
    python bench/bench_eval.py --device cuda --n 512 --batch 128
    python bench/bench_eval.py --e2e 1000            # + evaluate_samples (FID, sFID, P/R) on 1000 vs 1000 images
    python bench/bench_eval.py --parity 32           # + FID of 32 vs 32 crops by ours, torch-fidelity, torchmetrics
    python bench/bench_eval.py --frechet             # + seconds per 2048-d Fréchet distance, per formula

All three extractors run in this process on the same uint8 images (random crops of the photographs in ../shared/images,
or $LDM_SHARED/images), with the same weights file (../shared/weights/fid_inception_v3_tf2015.pth or --weights). Runs
are interleaved (ours, torch-fidelity, torchmetrics, ours, ...) so machine load hits all of them alike; the table
reports the best of --repeats timed passes after one warm-up pass, and the ratio to torch-fidelity.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shared_dir() -> Path:
    return Path(os.environ.get("LDM_SHARED", REPO.parent / "shared"))


def photo_crops(n: int, size: int, seed: int, names: list[str] | None = None) -> np.ndarray:
    """n random square crops of the shared photos (all, or `names`), resized to size: uint8 (n, size, size, 3)."""
    files = sorted(p for p in (shared_dir() / "images").iterdir() if p.suffix in (".png", ".jpg"))
    files = [p for p in files if names is None or p.name in names]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.integers(64, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def extractors(weights: str, device: torch.device, names: tuple[str, ...] | None = None) -> dict:
    """{name: images_uint8 -> 2048-d features} for each implementation in `names` (default all), same weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ldm.eval.extractors import InceptionExtractor
    from ldm.eval.inception import load_inception

    def ours(fold: bool = True, outputs: tuple[str, ...] = ("features",)):
        net = InceptionExtractor(load_inception(weights, device=device, fold_batchnorm=fold))
        return lambda x: net(x, outputs=outputs)["features"]

    def torch_fidelity():
        tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        tf = tf.to(device)
        return lambda x: tf(x)[0]

    def torchmetrics():
        tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False)
        tm = tm.to(device)
        return lambda x: tm.inception(x)

    factories = {
        "ours": ours,
        "ours (BN unfolded)": lambda: ours(fold=False),
        "ours (pool+spatial+logits)": lambda: ours(outputs=("features", "spatial", "logits")),
        "torch-fidelity 0.4": torch_fidelity,
        "torchmetrics (antialias=False)": torchmetrics,
    }
    return {name: make() for name, make in factories.items() if names is None or name in names}


@torch.inference_mode()
def bench_extraction(images: np.ndarray, batch: int, repeats: int, weights: str, device: torch.device) -> dict:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    fns = extractors(weights, device)
    times = {k: [] for k in fns}
    feats = {}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = [fn(x[i:i + batch].to(device)) for i in range(0, len(x), batch)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep > 0:
                times[name].append(time.perf_counter() - start)
            feats[name] = torch.cat(out).float().cpu()
    ref = feats["torch-fidelity 0.4"]
    return {name: {"img_s": len(x) / min(t), "max_diff": float((feats[name] - ref).abs().max())}
            for name, t in times.items()}


@torch.inference_mode()
def parity(n: int, weights: str, device: torch.device) -> dict:
    """FID of n vs n crops (different photographs) by each implementation end to end, with its own formula."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ldm.eval.fid import frechet_distance, stats_from_features
    from ldm.eval.inception import load_inception

    files = sorted(p.name for p in (shared_dir() / "images").iterdir() if p.suffix in (".png", ".jpg"))
    a = torch.from_numpy(photo_crops(n, 64, seed=0, names=files[:3])).permute(0, 3, 1, 2).to(device)
    b = torch.from_numpy(photo_crops(n, 64, seed=1, names=files[3:])).permute(0, 3, 1, 2).to(device)
    ours = load_inception(weights, device=device)
    fa, fb = ours(a)["pool"].cpu(), ours(b)["pool"].cpu()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    tf = tf.to(device)
    ta, tb = tf(a)[0].cpu(), tf(b)[0].cpu()
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False).to(device)
    tm.update(a, real=True)
    tm.update(b, real=False)
    fid = frechet_distance(stats_from_features(fa.numpy()), stats_from_features(fb.numpy()))
    fid_sqrtm = frechet_distance(stats_from_features(fa.numpy()), stats_from_features(fb.numpy()), "sqrtm")
    fid_tf = fid_statistics_to_metric(fid_features_to_statistics(ta), fid_features_to_statistics(tb), False)
    tm_feats = torch.cat([tm.inception(a), tm.inception(b)]).cpu()
    return {"fid": fid, "fid_sqrtm": fid_sqrtm, "fid_torch_fidelity": fid_tf["frechet_inception_distance"],
            "fid_torchmetrics": tm.compute().item(),
            "max_feature_diff_torch_fidelity": float((torch.cat([fa, fb]) - torch.cat([ta, tb])).abs().max()),
            "max_feature_diff_torchmetrics": float((torch.cat([fa, fb]) - tm_feats).abs().max())}


def bench_frechet(dim: int = 2048, n: int = 4096) -> dict:
    """Seconds per Fréchet distance of two full-rank dim-d Gaussians: our eigh path, ADM's sqrtm path, and the
    eigvals-of-the-product formula torch-fidelity and torchmetrics use."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from ldm.eval.fid import frechet_distance, stats_from_features

    rng = np.random.default_rng(0)
    a = stats_from_features(rng.standard_normal((n, dim)))
    b = stats_from_features(rng.standard_normal((n, dim)) * 1.1 + 0.1)
    out = {}
    for name, fn in (("eigh (ours, default)", lambda: frechet_distance(a, b)),
                     ("sqrtm (ADM path)", lambda: frechet_distance(a, b, "sqrtm")),
                     ("eigvals (torch-fidelity)", lambda: fid_statistics_to_metric(
                         {"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
                      ["frechet_inception_distance"])):
        start = time.perf_counter()
        value = fn()
        out[name] = (time.perf_counter() - start, value)
    return out


def bench_e2e(n: int, weights: str, device: torch.device, batch: int) -> dict:
    from ldm.eval.evaluate import evaluate_samples
    from ldm.eval.extractors import build_extractor

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "samples.npz", arr_0=photo_crops(n, 64, seed=1))
        np.savez(Path(tmp) / "ref.npz", arr_0=photo_crops(n, 64, seed=2))
        ext = build_extractor("inception", weights)
        start = time.perf_counter()
        res = evaluate_samples(str(Path(tmp) / "samples.npz"), str(Path(tmp) / "ref.npz"), extractor=ext,
                               metrics=("fd", "sfid", "pr"), batch_size=batch, use_cache=False, device=device,
                               progress=False)
        res["seconds"] = time.perf_counter() - start
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images per timed pass")
    p.add_argument("--size", type=int, default=64, help="input side in px (resized to 299 inside the networks)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default=str(shared_dir() / "weights" / "fid_inception_v3_tf2015.pth"))
    p.add_argument("--e2e", type=int, default=0, help="also time evaluate_samples on N samples vs N references")
    p.add_argument("--parity", type=int, default=0, help="also compare FID end to end on N vs N crops with the peers")
    p.add_argument("--frechet", action="store_true", help="also time the 2048-d Fréchet distance formulas")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.n} images of {args.size} px, batch {args.batch}, "
          f"best of {args.repeats}")
    res = bench_extraction(photo_crops(args.n, args.size, seed=0), args.batch, args.repeats, args.weights, device)
    base = res["torch-fidelity 0.4"]["img_s"]
    print(f"{'extractor':<32s} {'images/s':>9s} {'vs torch-fidelity':>18s} {'max |feature diff|':>19s}")
    for k, v in res.items():
        print(f"{k:<32s} {v['img_s']:9.2f} {v['img_s'] / base:17.2f}x {v['max_diff']:19.2e}")
    if args.parity:
        par = parity(args.parity, args.weights, device)
        print(f"FID parity, {args.parity} vs {args.parity} crops: ours {par['fid']:.6f} (sqrtm path "
              f"{par['fid_sqrtm']:.6f}), torch-fidelity {par['fid_torch_fidelity']:.6f} (delta "
              f"{par['fid'] - par['fid_torch_fidelity']:+.2e}), torchmetrics {par['fid_torchmetrics']:.6f} (delta "
              f"{par['fid'] - par['fid_torchmetrics']:+.2e}); max |feature diff| torch-fidelity "
              f"{par['max_feature_diff_torch_fidelity']:.2e}, torchmetrics {par['max_feature_diff_torchmetrics']:.2e}")
    if args.frechet:
        for k, (sec, value) in bench_frechet().items():
            print(f"Fréchet distance 2048-d, {k:<26s} {sec:7.2f} s  (value {value:.9f})")
    if args.e2e:
        out = bench_e2e(args.e2e, args.weights, device, args.batch)
        print(f"evaluate_samples (FID + sFID + precision/recall), {args.e2e} samples vs {args.e2e} references: "
              f"{out['seconds']:.1f} s  (fid {out['fid']:.3f}, sfid {out['sfid']:.3f}, "
              f"precision {out['precision']:.3f}, recall {out['recall']:.3f})")


if __name__ == "__main__":
    main()
