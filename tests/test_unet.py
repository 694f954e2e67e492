"""UNet adapter over diffusers.UNet2DModel (ldm/models/unet.py): the DiT forward interface and time map."""

import pytest
import torch

from ldm.models.unet import UNetGenerator

SMALL = dict(input_size=8, in_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=8)


def inputs(B=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g), torch.tensor([0, 4, 9])[:B]


def test_forward_interface_shapes_and_time_map():
    torch.manual_seed(0)
    net = UNetGenerator(num_classes=10, **SMALL).eval()
    x, t, y = inputs()
    out = net(x, t, y)
    assert out.shape == (3, 4, 8, 8) and net.out_channels == 4
    # the diffusers UNet called directly with timestep 1000 t and the same labels
    torch.testing.assert_close(out, net.unet(x, 1000 * t, class_labels=y).sample)
    flipped = UNetGenerator(num_classes=10, t_scale=-1.0, t_shift=1.0, **SMALL).eval()
    flipped.load_state_dict(net.state_dict())
    torch.testing.assert_close(flipped(x, t, y), net.unet(x, 1 - t, class_labels=y).sample)
    torch.testing.assert_close(net(x, t[0], y), net(x, t[0].expand(3), y))


def test_class_conditioning_null_label_and_dropout():
    torch.manual_seed(0)
    net = UNetGenerator(num_classes=10, **SMALL).eval()
    assert net.unet.class_embedding.num_embeddings == 11  # + the null label
    x, t, y = inputs()
    assert not torch.allclose(net(x, t, y), net(x, t, (y + 1) % 10))
    null = torch.full((3,), 10)
    torch.testing.assert_close(net(x, t, None), net(x, t, null))
    torch.testing.assert_close(net(x, t, y, force_drop=torch.ones(3, dtype=torch.bool)), net(x, t, null))
    net.train()
    seen = []
    net.unet.class_embedding.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    big = torch.randint(0, 10, (1500,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net(torch.zeros(1500, 4, 8, 8), torch.full((1500,), 0.5), big, generator=torch.Generator().manual_seed(2))
    assert abs(seen[0].eq(10).float().mean().item() - 0.1) < 0.04  # std of the rate is 0.0077


def test_learned_sigma_unconditional_and_hidden_tokens():
    net = UNetGenerator(num_classes=0, learn_sigma=True, **SMALL).eval()
    x, t, _ = inputs()
    out, hidden = net(x, t, return_hidden=True)
    assert out.shape == (3, 8, 8, 8)
    assert hidden.shape == (3, 16, 32) and net.hidden_size == 32  # mid block at 4 x 4 with 32 channels
    assert net.unet.class_embedding is None
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.tensor([1, 2, 3]))


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetGenerator(**{**SMALL, "block_out_channels": (12, 32)})
    with pytest.raises(ValueError, match="attention"):
        UNetGenerator(**SMALL, attention=[True])
    net = UNetGenerator(num_classes=10, **SMALL)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="expected \\(B, 4, 8, 8\\)"):
        net(torch.zeros(3, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="labels must lie in"):
        net(x, t, torch.tensor([0, 11, 2]))
