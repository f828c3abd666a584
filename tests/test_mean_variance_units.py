"""Mean-variance outputs back in the field's unit (issue 9 item 8): the network predicts a
z-scored mean m and log-variance s; in the unit the mean is m·sd + mean and the variance
exp(s)·sd², checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from biometry.learn.bundle import ModelBundle, predict


class _Fixed(nn.Module):
    """Ignores the image; outputs (mean, log-variance) per field in z units."""

    def __init__(self, out):
        super().__init__()
        self.register_buffer("out", torch.tensor(out, dtype=torch.float32))

    def forward(self, x):
        return self.out.expand(x.shape[0], -1)


def test_mean_and_variance_are_de_standardised():
    # field 1: mean 10, sd 2, output (0.5, log 4); field 2: mean 70, sd 5, output (-1, 0)
    net = _Fixed([0.5, np.log(4.0), -1.0, 0.0])
    bundle = ModelBundle(model=net, head="mean_variance", field_keys=["a", "b"],
                         mean=np.array([10.0, 70.0]), std=np.array([2.0, 5.0]), input_size=None,
                         in_channels=2, config={})
    out = predict(bundle, np.zeros((3, 2, 8, 8), dtype=np.uint8), device="cpu")
    assert out.shape == (3, 2, 2)
    np.testing.assert_allclose(out[0, :, 0], [10 + 0.5 * 2, 70 - 1 * 5], rtol=1e-6)  # 11, 65
    np.testing.assert_allclose(out[0, :, 1], [4 * 2 ** 2, 1 * 5 ** 2], rtol=1e-6)  # 16, 25
    regression = ModelBundle(model=_Fixed([0.5, -1.0]), head="regression", field_keys=["a", "b"],
                             mean=np.array([10.0, 70.0]), std=np.array([2.0, 5.0]),
                             input_size=None, in_channels=2, config={})
    assert predict(regression, np.zeros((1, 2, 8, 8), np.uint8), device="cpu")[0].tolist() == \
        pytest.approx([11.0, 65.0])
