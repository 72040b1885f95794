"""Shared fixtures. Tests that need ``../shared`` (conformance vectors, datasets) skip where it is
absent (a user's clone) and fail under ``CI=true``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EFFDET_SHARED", REPO.parent / "shared"))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found: the shared conformance data sits beside the checkout in CI"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def project_yaml(project_name: str, obj_list, train_set: str = "train", val_set: str = "val") -> str:
    """A project YAML in the published format (published anchors, ImageNet mean/std)."""
    names = ", ".join(repr(str(n)) for n in obj_list)
    return (f"project_name: {project_name}\ntrain_set: {train_set}\nval_set: {val_set}\nnum_gpus: 1\n"
            "mean: [0.485, 0.456, 0.406]\nstd: [0.229, 0.224, 0.225]\n"
            "anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'\n"
            "anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'\n"
            f"obj_list: [{names}]\n")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small (128-256 px) forwards: as fast, and no stall when the 2 cores
    are busy. Restores the caller's count (thread counts change float round-off in later tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (skip where absent, fail under CI=true)."""
    return _shared_path()


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    return _shared_path("conformance")


@pytest.fixture(scope="session")
def d0_weights(conformance_dir):
    """The seeded D0 state_dict (90 classes) of ``conformance/d0_weights.npz``."""
    import numpy as np
    import torch

    data = np.load(conformance_dir / "d0_weights.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="session")
def d0_vectors(conformance_dir):
    """``conformance/d0_vectors.npz`` as a dict of numpy arrays."""
    import numpy as np

    data = np.load(conformance_dir / "d0_vectors.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def d0_model(d0_weights):
    """D0 (90 classes) with the conformance weights, in eval mode. Do not modify it in a test."""
    from backbone import EfficientDet

    model = EfficientDet(num_classes=90, compound_coef=0).eval()
    model.load_state_dict(d0_weights, strict=True)
    return model


@pytest.fixture(scope="session")
def bundle_dir(conformance_dir) -> Path:
    """The official-format D0 TensorFlow checkpoint bundle (``conformance/official_d0_ckpt``)."""
    return conformance_dir / "official_d0_ckpt"


@pytest.fixture(scope="session")
def reader(bundle_dir):
    """A :class:`utils.weights.tf_checkpoint.TFCheckpointReader` of that bundle."""
    from utils.weights.tf_checkpoint import TFCheckpointReader

    return TFCheckpointReader(bundle_dir)
