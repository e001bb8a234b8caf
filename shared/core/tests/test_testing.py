import pytest
import torch

from verger.core.testing import assert_close, relative_rms_error


def test_relative_rms_error_known_value():
    expected = torch.tensor([3.0, 4.0])  # norm 5
    actual = expected + torch.tensor([0.0, 0.5])
    assert relative_rms_error(actual, expected) == pytest.approx(0.1)


def test_assert_close_catches_shape_nan_and_error():
    x = torch.randn(8, 8)
    assert_close(x + 1e-7, x, rtol=1e-5)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(x[:4], x)
    y = x.clone()
    y[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(y, x)
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close(x * 1.01, x, rtol=1e-3)
