"""Shared fixtures: small real data (scikit-learn digits) and small models trained on it."""

from __future__ import annotations

import os

import pytest
import torch

from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.models import build_model

#: under pytest-xdist (``-n N``) the cores are shared by N workers
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared, busy CPU two spinning threads per process are far
    slower than one. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    """Run ``robustfair ARGV`` in this process: (exit code, stdout, stderr)."""
    from robustfair.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture(scope="session")
def digits():
    """The digits bundle (8×8, 10 classes), with a validation split."""
    return load_data(DataConfig(name="digits", val_size=0.1))


def train_quick(model, data, epochs: int = 30, lr: float = 0.05, seed: int = 0, adv_eps=None):
    """Plain full-batch-ish training used by tests that need a trained model."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x = data.train.images()
    y = data.train.y
    from robustfair.attacks import build_attack

    pgd = build_attack("pgd5", "linf") if adv_eps else None
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            xb, yb = x[idx], y[idx]
            if pgd is not None:
                xb = pgd(model, xb, yb, adv_eps)
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """A SmallCNN trained normally on digits (about 97% clean accuracy)."""
    torch.manual_seed(0)
    m = build_model("smallcnn", 1, 10, 8, digits.mean, digits.std, dropout=0.0)
    return train_quick(m, digits, epochs=25)


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """An MLP trained normally on digits."""
    torch.manual_seed(0)
    m = build_model("mlp", 1, 10, 8, digits.mean, digits.std, hidden=[64])
    return train_quick(m, digits, epochs=30)


def write_cifar10(root, n_train=10, n_test=6):
    """Tiny random CIFAR-10 files in the standard layout (ROOT/cifar-10-batches-py); returns
    the test images and labels."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n_train)]},
                        f)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = list(range(n_test))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return test, labels
