"""Classifier-free guidance: scale 1, interval, one batched forward vs two calls, first3 channels, peer conventions."""
import pytest
import torch

from ldm.diffusion.guidance import classifier_free_guidance, interval_from_sit_time
from ldm.diffusion.paths import get_path
from ldm.diffusion.samplers import make_denoiser, sample_euler, time_grid

NUM_CLASSES = 5


class TinyNet(torch.nn.Module):
    """A class-conditional net whose output depends on x, t and y (row NUM_CLASSES is the null class)."""

    def __init__(self, channels=4, out_channels=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, out_channels or channels, generator=g))
        self.proj = torch.nn.Parameter(torch.randn(out_channels or channels, channels, generator=g))
        self.calls = []

    def forward(self, x, t, y):  # x (B, C, H, W), t (B,), y (B,)
        self.calls.append(x.shape[0])
        h = torch.einsum("oc,bchw->bohw", self.proj, x)  # (B, C_out, H, W)
        return h * (1 + t.view(-1, 1, 1, 1)) + self.emb[y].view(*y.shape, -1, 1, 1)


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 2, 2, generator=g), torch.tensor([0.2, 0.5, 0.9])[:b], torch.tensor([0, 3, 4])[:b]


def test_scale_one_is_conditional():
    net = TinyNet()
    x, t, y = _inputs()
    out = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=1.0)(x, t)
    assert torch.equal(out, net(x, t, y))
    assert net.calls == [3, 3]  # a single conditional forward


def test_batched_equals_two_calls():
    net = TinyNet()
    x, t, y = _inputs()
    w = 4.0
    out = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w)(x, t)
    assert net.calls == [6]  # cond and uncond in ONE forward of 2B
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, NUM_CLASSES))
    assert torch.allclose(out, uncond + w * (cond - uncond), atol=1e-5)


def test_interval():
    net = TinyNet()
    x, t, y = _inputs()
    w = 3.0
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, NUM_CLASSES))
    out = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, interval=(0.3, 0.7))(x, t)
    # only t = 0.5 (sample 1) is inside [0.3, 0.7]
    assert torch.allclose(out[1], (uncond + w * (cond - uncond))[1], atol=1e-5)
    assert torch.allclose(out[[0, 2]], cond[[0, 2]])
    net.calls.clear()
    outside = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, interval=(0.0, 0.1))(x, t)
    assert torch.equal(outside, cond) and net.calls == [3]  # no unconditional forward outside the interval


def test_first3_and_learned_sigma():
    w = 2.5
    net = TinyNet()
    x, t, y = _inputs()
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, NUM_CLASSES))
    guided = uncond + w * (cond - uncond)
    out = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, channels="first3")(x, t)
    assert torch.allclose(out[:, :3], guided[:, :3], atol=1e-5) and torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)
    # DiT learned sigma: 8 output channels, the variance half is never guided
    net8 = TinyNet(out_channels=8)
    cond, uncond = net8(x, t, y), net8(x, t, torch.full_like(y, NUM_CLASSES))
    out = classifier_free_guidance(net8, y, num_classes=NUM_CLASSES, scale=w, learned_sigma=True)(x, t)
    assert torch.allclose(out[:, :4], (uncond + w * (cond - uncond))[:, :4], atol=1e-5)
    assert torch.allclose(out[:, 4:], cond[:, 4:], atol=1e-6)


def test_peer_intervals_in_our_time():
    assert interval_from_sit_time(0.11) == pytest.approx((0.0, 0.89))  # LightningDiT cfg_interval_start 0.11
    assert interval_from_sit_time(0.125) == pytest.approx((0.0, 0.875))
    lo, hi = interval_from_sit_time(0.11)
    # LightningDiT forward_with_cfg: unguided iff t_SiT < cfg_interval_start; at t = 1 - t_SiT ours agrees
    for t_sit in torch.linspace(0.0, 1.0, 41).tolist():
        t = 1.0 - t_sit
        if abs(t_sit - 0.11) > 1e-6:
            assert (lo <= t <= hi) == (not t_sit < 0.11)


def test_guided_sampling_runs_through_a_sampler():
    net = TinyNet()
    path = get_path("linear")
    x, _, y = _inputs()
    model_fn = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=2.0, interval=(0.0, 0.7))
    den = make_denoiser(model_fn, path=path, prediction="velocity")
    with torch.no_grad():
        out = sample_euler(den, x, time_grid(10), path=path)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.calls == [3, 3, 3] + [6] * 7  # t = 1.0, 0.9, 0.8 unguided; 0.7 .. 0.1 guided


def test_bad_input():
    net = TinyNet()
    _, _, y = _inputs()
    with pytest.raises(ValueError, match=r"ids in \[0, 4\]"):
        classifier_free_guidance(net, torch.tensor([5]), num_classes=NUM_CLASSES, scale=2.0)
    with pytest.raises(ValueError, match="first3"):
        classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=2.0, channels="first4")
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="class-conditional"):
        classifier_free_guidance(net, y, num_classes=0, scale=2.0)
