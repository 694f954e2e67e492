"""REPA projector and alignment loss (ldm/diffusion/repa.py) on hand-made features, plus a tiny training run."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ldm.diffusion.repa import (
    DEFAULT_REPA_DEPTH,
    DEFAULT_REPA_WEIGHT,
    REPAProjector,
    build_projector,
    repa_loss,
    resize_token_grid,
)
from ldm.encoders import FrozenEncoder
from ldm.models.dit import DiT


def test_loss_is_minus_the_mean_token_cosine():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]]])  # (1, 4, 2): a 2 x 2 token grid
    e = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [4.0, 3.0]]])
    cosines = [1.0, 1 / math.sqrt(2), -1.0, 24 / 25]
    torch.testing.assert_close(repa_loss(h, e), torch.tensor([-sum(cosines) / 4]))
    both = repa_loss(torch.cat([h, 5 * e]), torch.cat([e, e]))  # per sample; scale-invariant
    torch.testing.assert_close(both, torch.tensor([-sum(cosines) / 4, -1.0]))
    assert DEFAULT_REPA_WEIGHT == 0.5 and DEFAULT_REPA_DEPTH == 8  # REPA train.py --proj-coeff, --encoder-depth


def test_gradient_reaches_the_projection_only():
    h = torch.randn(2, 4, 3, requires_grad=True)
    e = torch.randn(2, 4, 3, requires_grad=True)
    repa_loss(h, e).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0 and e.grad is None


def test_encoder_grid_is_averaged_down_and_interpolated_up():
    # 4 x 4 encoder grid made of constant 2 x 2 blocks -> a 2 x 2 generator grid sees exactly the block values
    blocks = torch.randn(1, 2, 2, 5)
    fine = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 16, 5)
    torch.testing.assert_close(resize_token_grid(fine, 4), blocks.reshape(1, 4, 5))
    # non-constant blocks: each coarse token is the mean of the 4 encoder tokens it covers
    fine = torch.randn(1, 16, 5)
    grid = fine.reshape(1, 4, 4, 5)
    torch.testing.assert_close(resize_token_grid(fine, 4)[0, 3], grid[0, 2:, 2:].mean(dim=(0, 1)))
    one = torch.randn(1, 1, 5)
    torch.testing.assert_close(resize_token_grid(one, 9), one.expand(1, 9, 5))  # enlarging a constant field
    h = torch.randn(1, 1, 5)
    torch.testing.assert_close(repa_loss(h, fine), -F.cosine_similarity(h[0, 0], fine[0].mean(0), dim=0)[None])
    with pytest.raises(ValueError, match="square"):
        resize_token_grid(fine, 8)
    with pytest.raises(ValueError, match="feature width"):
        repa_loss(torch.randn(1, 4, 5), torch.randn(1, 4, 6))


def test_projector_is_a_three_layer_silu_mlp():
    proj = REPAProjector(32, 24)
    linears = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 2048), (2048, 2048), (2048, 24)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in proj.mlp) == 2
    x = torch.randn(2, 4, 32)
    a = F.silu(linears[0](x))
    b = F.silu(linears[1](a))
    torch.testing.assert_close(proj(x), linears[2](b))


@pytest.fixture
def one_thread():
    """Tiny models: thread hand-offs cost more than they save (and the CI machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_repa_training_aligns_hidden_tokens_with_a_tiny_encoder(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 56, 56, generator=g) * 2 - 1
    latents = torch.cat([F.avg_pool2d(images, 7), images.mean(1, keepdim=True)[:, :, ::7, ::7]], dim=1)  # (16, 4, 8, 8)
    vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    encoder = FrozenEncoder(vit, image_size=56, patch_size=14, feature_dim=24, num_prefix_tokens=1)
    target = encoder(images)  # (16, 16, 24)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=0,
              repa_depth=1)
    proj = build_projector(32, 24, hidden_dim=64)
    opt = torch.optim.Adam([*net.parameters(), *proj.parameters()], lr=2e-3)
    history = []
    for step in range(40):
        idx = torch.randint(0, 16, (8,), generator=g)
        x0, eps, t = latents[idx], torch.randn(8, 4, 8, 8, generator=g), torch.rand(8, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps  # linear path, t = 0 data
        out, hidden = net(xt, t, return_hidden=True)
        align = repa_loss(proj(hidden), target[idx]).mean()
        loss = (out - (eps - x0)).square().mean() + DEFAULT_REPA_WEIGHT * align
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(align.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.1, (first, last)  # the projection loss (-cos) falls clearly (-0.06 -> -0.22)
