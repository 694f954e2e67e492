"""The FID Inception-v3 against torch-fidelity and torchmetrics on real photographs (crops of ../shared/images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from ldm.eval.fid import frechet_distance, stats_from_features
from ldm.eval.inception import (
    INCEPTION_ENV,
    INCEPTION_FILENAMES,
    INCEPTION_URL,
    FIDInceptionV3,
    find_inception_weights,
    load_inception,
    resize_bilinear_tf1,
)
from ldm.eval.metrics import inception_score

WEIGHTS = "weights/fid_inception_v3_tf2015.pth"


def photo_crops(names: list[str], n: int, size: int, seed: int) -> torch.Tensor:
    """n random square crops (side >= 64 px) of the shared photos, bicubic-resized to size: uint8 (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.asarray(Image.open(shared_file(f"images/{names[i % len(names)]}")).convert("RGB"))
        h, w = img.shape[:2]
        s = int(rng.integers(64, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def weights() -> str:
    return str(shared_file(WEIGHTS))


@pytest.fixture(scope="module")
def sets() -> tuple[torch.Tensor, torch.Tensor]:
    a = photo_crops(["astronaut.png", "coffee.png", "chelsea.png"], 8, 64, seed=0)
    b = photo_crops(["rocket.jpg", "china.jpg", "flower.jpg"], 8, 64, seed=1)
    return a, b


@pytest.fixture(scope="module")
def features(weights, sets):
    """Ours and torch-fidelity's outputs on both sets, with the same random classifier head in both networks (the
    shared file has none) and torch-fidelity's Mixed_6d.branch1x1 output captured for sFID."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    peer = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=weights)
    ours = load_inception(weights, fold_batchnorm=False)
    fc = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    peer.fc.weight.data.copy_(fc)
    ours.fc.weight.data.copy_(fc)
    captured = []
    peer.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.cat(sets)
    with torch.inference_mode():
        unfolded = ours(x[:2])["pool"]
        ours.fold_batchnorm()  # what load_inception does by default
        mine = ours(x, outputs=("pool", "spatial", "logits"))
        pool, logits = peer(x)
    spatial = captured[0][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)  # ADM: NHWC map [..., :7], flattened
    return {"ours": mine, "unfolded": unfolded, "n": len(sets[0]),
            "peer": {"pool": pool, "logits": logits, "spatial": spatial}}


def test_resize_is_tf1_bilinear_bit_exact():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    g = torch.Generator().manual_seed(0)
    for h, w in ((32, 32), (64, 48), (500, 333)):
        x = torch.randint(0, 256, (2, 3, h, w), generator=g).float()
        ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert torch.equal(resize_bilinear_tf1(x, 299), ref)
    # hand check, 2 -> 4 px: TF samples at 0, 0.5, 1, 1.5 and clamps the right neighbour at the border
    row = resize_bilinear_tf1(torch.tensor([[[[0.0, 10.0], [0.0, 10.0]]]]), 4)[0, 0, 0]
    assert row.tolist() == [0.0, 5.0, 10.0, 10.0]


def test_pool_spatial_and_logits_match_torch_fidelity(features):
    mine, peer = features["ours"], features["peer"]
    assert mine["spatial"].shape == (16, 2023)
    assert (mine["pool"] - peer["pool"]).abs().max() < 1e-4
    assert (mine["spatial"] - peer["spatial"]).abs().max() < 1e-4
    assert (mine["logits"] - peer["logits"]).abs().max() < 1e-3 * peer["logits"].abs().max()


def test_inception_score_matches_torch_fidelity_on_the_same_logits(features):
    from torch_fidelity.metric_isc import isc_features_to_metric

    for shuffle in (False, True):
        theirs = isc_features_to_metric(features["peer"]["logits"], splits=4, shuffle=shuffle, rng_seed=2020)
        mean, std = inception_score(features["ours"]["logits"], splits=4, shuffle_seed=2020 if shuffle else None)
        assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
        assert std == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)


def test_unfolded_network_is_the_reference_network(features):
    assert (features["unfolded"] - features["peer"]["pool"][:2]).abs().max() < 1e-5


def test_fid_is_unmoved_by_the_feature_differences(features, sets, weights):
    # A 2048-d Fréchet distance takes seconds here and torch-fidelity's / torchmetrics' eigvals formulas take
    # ~20-35 s on 2 CPU cores, so the default run checks the chain in parts: the formulas agree with ours
    # (test_eval_fid.py), torch-fidelity's and torchmetrics' networks give our features (here), and the remaining
    # feature differences do not move FID (here). The end-to-end comparison is the slow test below.
    from torchmetrics.image.fid import FrechetInceptionDistance

    n, mine, peer = features["n"], features["ours"]["pool"].numpy(), features["peer"]["pool"].numpy()
    fid = frechet_distance(stats_from_features(mine[:n]), stats_from_features(mine[n:]))
    fid_peer_features = frechet_distance(stats_from_features(peer[:n]), stats_from_features(peer[n:]))
    assert fid > 50  # different photographs: a large distance, so agreement is not trivial
    assert abs(fid - fid_peer_features) < 1e-3
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False)
    with torch.inference_mode():
        tm_features = tm.inception(sets[0][:4])
    assert (tm_features - features["ours"]["pool"][:4]).abs().max() < 1e-4


@pytest.mark.slow
def test_fid_end_to_end_matches_torch_fidelity_and_torchmetrics(features, sets, weights):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    n, mine, peer = features["n"], features["ours"]["pool"].numpy(), features["peer"]["pool"]
    fid = frechet_distance(stats_from_features(mine[:n]), stats_from_features(mine[n:]))
    tf = fid_statistics_to_metric(fid_features_to_statistics(peer[:n]), fid_features_to_statistics(peer[n:]), False)
    # torchmetrics with the same weights and the TF1 resize (its default antialias=True is a different resize)
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False)
    tm.update(sets[0], real=True)
    tm.update(sets[1], real=False)
    assert abs(fid - tf["frechet_inception_distance"]) < 1e-3
    assert abs(fid - tm.compute().item()) < 1e-3


def test_random_network_shapes_and_state_dict_layout():
    net = FIDInceptionV3()
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.inference_mode():
        out = net(x, outputs=("pool", "spatial", "logits"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (2, 2048), "spatial": (2, 2023),
                                                           "logits": (2, 1008)}
    assert len(net.state_dict()) == 566  # pytorch-fid / torch-fidelity layout: 94 conv+BN layers (6 keys) + fc (2)
    net.fold_batchnorm()
    assert not any(p.requires_grad for p in net.parameters())  # frozen, folded or not: no autograd graph
    assert net(x[:1])["pool"].grad_fn is None
    with pytest.raises(ValueError, match="uint8 images"):
        net(x.float())
    with pytest.raises(ValueError, match="outputs=\\['mixed'\\]"):
        net(x, outputs=("mixed",))


def test_state_dict_keys_equal_the_reference_file(weights):
    ref = torch.load(weights, map_location="cpu", weights_only=True)
    assert set(FIDInceptionV3().state_dict()) == set(ref)


def test_missing_weights_error_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "env.pth"))
    hub = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as err:
        find_inception_weights()
    assert str(err.value) == (
        "FID Inception-v3 weights not found. Looked for:\n"
        f"  {tmp_path / 'env.pth'}\n  {hub / INCEPTION_FILENAMES[0]}\n  {hub / INCEPTION_FILENAMES[1]}\n"
        f"Get {INCEPTION_FILENAMES[0]} from {INCEPTION_URL} (or torch-fidelity's {INCEPTION_FILENAMES[1]}) and pass "
        f"its path (--inception-weights / eval.inception_weights), set {INCEPTION_ENV}=/path/to/file, or put it in "
        f"{hub}; on a machine with internet, --download-inception fetches it there.")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")
    # the torch hub cache is found under torch-fidelity's file name as well
    monkeypatch.delenv(INCEPTION_ENV)
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILENAMES[1]).write_bytes(b"")
    assert find_inception_weights() == hub / INCEPTION_FILENAMES[1]
