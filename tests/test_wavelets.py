"""The orthonormal 2-D Haar DWT (ldm/tokenizers/wavelets.py): hand-computed 2x2 blocks, PyWavelets' documented Haar
example, orthogonality of the transform matrix, exact multi-level analysis / synthesis, and the block-mean closed
form of the multi-level LL band."""

import pytest
import torch
import torch.nn.functional as F

from ldm.tokenizers.wavelets import (
    SUBBANDS,
    haar_dwt2,
    haar_idwt2,
    haar_wavedec2,
    haar_waverec2,
)


def test_a_hand_computed_2x2_block():
    # one image, two channels; channel 0 = [[a, b], [c, d]] = [[1, 2], [3, 4]], channel 1 = [[4, 0], [0, 0]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    y = haar_dwt2(x)
    assert y.shape == (1, 8, 1, 1) and SUBBANDS == ("LL", "HL", "LH", "HH")
    # channel 0: LL = (1+2+3+4)/2 = 5, HL = (1+2-3-4)/2 = -2, LH = (1-2+3-4)/2 = -1, HH = (1-2-3+4)/2 = 0
    # channel 1: LL = HL = LH = HH = 4/2 = 2; sub-band major: [LL0, LL1, HL0, HL1, LH0, LH1, HH0, HH1]
    assert y.flatten().tolist() == [5.0, 2.0, -2.0, 2.0, -1.0, 2.0, 0.0, 2.0]
    assert torch.equal(haar_idwt2(y), x)


def test_pywavelets_documented_haar_example():
    """pywt docs: pywt.dwt([1, 2, 3, 4, 5, 6], 'db1') -> cA = [2.1213, 4.9497, 7.7782], cD = [-0.7071] * 3. An image
    whose two rows both are that signal has LL = sqrt(2) * cA = [3, 7, 11] and LH (pywt's cV, detail along the width)
    = sqrt(2) * cD = [-1, -1, -1]; nothing varies along the height, so HL = HH = 0."""
    row = torch.arange(1.0, 7.0, dtype=torch.float64)
    y = haar_dwt2(row.expand(1, 1, 2, 6))  # (1, 4, 1, 3)
    ca = torch.tensor([2.12132034, 4.94974747, 7.77817459], dtype=torch.float64)
    cd = torch.tensor([-0.70710678] * 3, dtype=torch.float64)
    torch.testing.assert_close(y[0, 0, 0], 2 ** 0.5 * ca, atol=1e-7, rtol=0)  # 8 printed digits
    torch.testing.assert_close(y[0, 2, 0], 2 ** 0.5 * cd, atol=1e-7, rtol=0)
    assert torch.equal(y[0, 1], torch.zeros(1, 3, dtype=torch.float64)) and torch.equal(y[0, 3], y[0, 1])


def test_the_transform_matrix_is_orthogonal():
    basis = torch.eye(16, dtype=torch.float64).view(16, 1, 4, 4)  # every one-hot 4x4 image
    m = haar_dwt2(basis).flatten(1)  # (16, 16): column j of the transform = row j here
    assert set(m.abs().unique().tolist()) == {0.0, 0.5}
    assert torch.equal(m @ m.T, torch.eye(16, dtype=torch.float64))  # entries +-1/2: exact in binary floating point


def test_one_level_round_trip():
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(3, 5, 16, 12, generator=g)
    assert (haar_idwt2(haar_dwt2(x32)) - x32).abs().max() < 1e-6
    x64 = torch.randn(3, 5, 16, 12, generator=g, dtype=torch.float64)
    assert (haar_idwt2(haar_dwt2(x64)) - x64).abs().max() < 1e-14
    dyadic = torch.randint(-512, 512, (2, 3, 8, 8), generator=g).double() / 256  # sums and halvings stay exact
    assert torch.equal(haar_idwt2(haar_dwt2(dyadic)), dyadic)
    # Parseval: the orthonormal transform keeps the sum of squares
    torch.testing.assert_close(haar_dwt2(x64).square().sum(), x64.square().sum(), atol=1e-10, rtol=0)


def test_multi_level_analysis_and_synthesis():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 24, generator=g, dtype=torch.float64)
    coeffs = haar_wavedec2(x, 3)
    assert [tuple(c.shape) for c in coeffs] == [(2, 12, 16, 12), (2, 12, 8, 6), (2, 12, 4, 3)]
    for level, c in enumerate(coeffs, start=1):
        # LL of level l = 2^l * the mean of each 2^l x 2^l block (sqrt(2) per axis and level)
        torch.testing.assert_close(c[:, :3], 2 ** level * F.avg_pool2d(x, 2 ** level), atol=1e-12, rtol=0)
    # the deepest level whole plus the details of the others carry all the energy
    energy = coeffs[-1].square().sum() + sum(c[:, 3:].square().sum() for c in coeffs[:-1])
    torch.testing.assert_close(energy, x.square().sum(), atol=1e-10, rtol=0)
    assert (haar_waverec2(coeffs) - x).abs().max() < 1e-13
    x32 = x.float()
    assert (haar_waverec2(haar_wavedec2(x32, 3)) - x32).abs().max() < 1e-6
    dyadic = torch.randint(-512, 512, (1, 3, 16, 16), generator=g).double() / 256
    assert torch.equal(haar_waverec2(haar_wavedec2(dyadic, 4)), dyadic)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="even H and W"):
        haar_dwt2(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="3 Haar levels need .* multiples of 8"):
        haar_wavedec2(torch.zeros(1, 3, 12, 16), 3)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        haar_wavedec2(torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"\(B, 4C, h, w\)"):
        haar_idwt2(torch.zeros(1, 6, 2, 2))
