"""Inference transformations keep the network's function."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from utils.optimize import fold_batchnorm


def test_fold_batchnorm_matches_eager(d0_model, d0_vectors):
    folded = fold_batchnorm(d0_model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.from_numpy(d0_vectors["input"])
    with torch.no_grad():
        _, reg, cls, anchors = folded(x)
    np.testing.assert_allclose(reg.numpy(), d0_vectors["regression"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(cls.numpy(), d0_vectors["classification"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(anchors.numpy(), d0_vectors["anchors"], atol=0, rtol=0)
    # The original model is untouched.
    assert any(isinstance(m, nn.BatchNorm2d) for m in d0_model.modules())
