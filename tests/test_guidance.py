"""Classifier-free guidance: scale 1, interval, one batched forward vs two calls, first3 channels, the step-start rule,
peer conventions, and the peers' guided samplers (REPA's Heun, LightningDiT's official Euler) transcribed."""
import dataclasses

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


def test_step_start_rule_reads_the_step_start():
    net = TinyNet()
    x, t, y = _inputs()
    w = 3.0
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, NUM_CLASSES))
    guided = uncond + w * (cond - uncond)
    per_eval = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, interval=(0.3, 0.7))
    step_start = classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, interval=(0.3, 0.7),
                                          rule="step_start")
    starts = torch.tensor([0.4, 0.8, 0.9])  # the steps of samples 0, 1, 2 started at these times
    assert torch.equal(per_eval(x, t, starts), per_eval(x, t))  # per_eval ignores the step start
    out = step_start(x, t, starts)  # only sample 0's step started inside [0.3, 0.7]
    assert torch.allclose(out[0], guided[0], atol=1e-5) and torch.allclose(out[1:], cond[1:])
    assert torch.equal(step_start(x, t), per_eval(x, t))  # no step start: the evaluation's own time
    with pytest.raises(ValueError, match="guidance rule"):
        classifier_free_guidance(net, y, num_classes=NUM_CLASSES, scale=w, rule="step_end")


class Recorder(torch.nn.Module):
    """TinyNet in float64 that records (batch size, t) of every call; 2B rows = a guided (cond + uncond) call."""

    def __init__(self, sign=1.0, flip_time=False):
        super().__init__()
        self.net, self.sign, self.flip_time, self.calls = TinyNet().double(), sign, flip_time, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        return self.sign * self.net(x.double(), 1 - t.double() if self.flip_time else t.double(), y).to(x.dtype)


def repa_euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                       guidance_high=1.0, null_id=1000):
    """sihyun-yu/REPA samplers.py euler_sampler, transcribed (model returns the velocity itself, not a tuple)."""
    if cfg_scale > 1.0:
        y_null = torch.tensor([null_id] * y.size(0), device=y.device)
    _dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if cfg_scale > 1.0 and t_cur <= guidance_high and t_cur >= guidance_low:
            model_input, y_cur = torch.cat([x_cur] * 2, dim=0), torch.cat([y, y_null], dim=0)
        else:
            model_input, y_cur = x_cur, y
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
        d_cur = model(model_input.to(dtype=_dtype), time_input.to(dtype=_dtype), y_cur).to(torch.float64)
        if cfg_scale > 1. and t_cur <= guidance_high and t_cur >= guidance_low:
            d_cur_cond, d_cur_uncond = d_cur.chunk(2)
            d_cur = d_cur_uncond + cfg_scale * (d_cur_cond - d_cur_uncond)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and (i < num_steps - 1):
            if cfg_scale > 1.0 and t_cur <= guidance_high and t_cur >= guidance_low:  # t_cur, not t_next
                model_input, y_cur = torch.cat([x_next] * 2), torch.cat([y, y_null], dim=0)
            else:
                model_input, y_cur = x_next, y
            time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_next
            d_prime = model(model_input.to(dtype=_dtype), time_input.to(dtype=_dtype), y_cur).to(torch.float64)
            if cfg_scale > 1.0 and t_cur <= guidance_high and t_cur >= guidance_low:
                d_prime_cond, d_prime_uncond = d_prime.chunk(2)
                d_prime = d_prime_uncond + cfg_scale * (d_prime_cond - d_prime_uncond)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_repa_heun_is_heun_with_the_step_start_rule():
    from ldm.config import SampleCfg
    from ldm.eval.generator import sample_latents

    x, _, y = _inputs()
    x = x.double()
    # REPA's data is at t = 0 and its network predicts the velocity d x_t / dt, as ours: no conversion. The interval
    # ends fall inside steps (0.7 -> 0.6 and 0.3 -> 0.2), where the two rules guide the corrector differently.
    steps, w, lo, hi = 10, 4.0, 0.25, 0.65
    theirs = Recorder()
    expected = repa_euler_sampler(theirs, x, y, num_steps=steps, heun=True, cfg_scale=w, guidance_low=lo,
                                  guidance_high=hi, null_id=NUM_CLASSES)
    results = {}
    for rule in ("step_start", "per_eval"):
        ours = Recorder()
        cfg = SampleCfg(sampler="heun", steps=steps, cfg_scale=w, interval=[lo, hi], guidance_rule=rule)
        results[rule] = sample_latents(ours, x, y, path=get_path("linear"), prediction="velocity", sample_cfg=cfg,
                                       num_classes=NUM_CLASSES)
        if rule == "step_start":
            assert ours.calls == theirs.calls  # the same evaluations, times and guided calls, in the same order
    torch.testing.assert_close(results["step_start"], expected, rtol=1e-12, atol=1e-12)
    assert (results["per_eval"] - expected).abs().max() > 1e-3  # the rule decides the images


def lightningdit_sample(model, z, y, *, num_sampling_steps, timestep_shift, cfg_scale, cfg_interval_start, null_id):
    """hustvl/LightningDiT's official sampling, transcribed in its time (t = 0 noise, t = 1 data): inference.py with
    sample.mode ODE, sampling_method euler -> transport Sampler.sample_ode (t0 = 0, t1 = 1 for a Linear velocity
    model) -> integrators.ode: th.linspace(t0, t1, num_steps), each point through compute_tm (timestep_shift), then
    torchdiffeq odeint(method="euler"), which steps y1 = y0 + (t1 - t0) f(t0, y0) between consecutive points;
    f = models/lightningdit.py forward_with_cfg(x, t, y, cfg_scale, cfg_interval=True, cfg_interval_start)."""
    t = torch.linspace(0, 1, num_sampling_steps)
    if timestep_shift > 0:
        t = torch.tensor([timestep_shift * t_n / (1 + (timestep_shift - 1) * t_n) for t_n in t])
    x = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([null_id] * len(z))], 0)

    def forward_with_cfg(x, t, y):
        half = x[: len(x) // 2]
        model_out = model(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if t[0] < cfg_interval_start:
            half_eps = cond_eps
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    for t0, t1 in zip(t[:-1], t[1:]):
        x = x + (t1 - t0) * forward_with_cfg(x, torch.ones(x.size(0)) * t0, y)
    return x.chunk(2)[0], t


def test_lightningdit_official_defaults_reproduce_its_sampler():
    from ldm.diffusion.samplers import sampler_times
    from ldm.eval.generator import official_run_config, sample_latents

    x, _, y = _inputs()
    theirs = Recorder()
    expected, their_grid = lightningdit_sample(theirs, x, y, num_sampling_steps=250, timestep_shift=0.3, cfg_scale=10.0,
                                               cfg_interval_start=0.11, null_id=NUM_CLASSES)
    # the importer hands us their network with the time and the velocity flipped (ldm/models/checkpoints.py)
    ours = Recorder(sign=-1.0, flip_time=True)
    cfg = official_run_config("lightningdit")
    path = get_path(cfg.diffusion.path)
    sample_cfg = dataclasses.replace(cfg.sample, cfg_scale=10.0)
    out = sample_latents(ours, x, y, path=path, prediction=cfg.diffusion.prediction, sample_cfg=sample_cfg,
                         num_classes=NUM_CLASSES)
    grid = sampler_times(sample_cfg, path)
    assert len(grid) == len(their_grid) == 250 and len(ours.calls) == len(theirs.calls) == 249  # 249 Euler steps
    torch.testing.assert_close(grid, 1 - their_grid.double(), rtol=0, atol=1e-6)  # t = 1 - t_theirs
    their_guided = [float(t) >= 0.11 for t in their_grid[:-1]]
    assert [n == 2 * len(x) for n, _ in ours.calls] == their_guided and 0 < sum(their_guided) < 249
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_lightningdit_transcription_steps_as_torchdiffeq_euler():
    """The loop above is what torchdiffeq's fixed-grid Euler does on that grid (LightningDiT calls odeint)."""
    odeint = pytest.importorskip("torchdiffeq").odeint
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    t = torch.tensor([0.3 * t_n / (1 - 0.7 * t_n) for t_n in torch.linspace(0, 1, 7)])
    x0 = torch.randn(2, 4, generator=g)
    x = x0
    for t0, t1 in zip(t[:-1], t[1:]):
        x = x + (t1 - t0) * torch.tanh(x @ a) * (1 + t0)
    torch.testing.assert_close(odeint(lambda t, x: torch.tanh(x @ a) * (1 + t), x0, t, method="euler")[-1], x)
