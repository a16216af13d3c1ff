"""Datasets: embedded data, the seeded splits, imbalance, augmentation, and the readers of the
standard file formats (tiny files written here in those formats)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import write_cifar10 as _write_cifar10

from robustfair.config import DataConfig
from robustfair.data import augment_batch, load_data
from robustfair.data.core import ArrayData, imbalance, stratified_holdout
from robustfair.errors import UserError


def test_mnist5k_split_is_fixed_and_disjoint():
    a = load_data(DataConfig(name="mnist5k", val_size=0.1))
    b = load_data(DataConfig(name="mnist5k", val_size=0.1))
    assert (len(a.train), len(a.val), len(a.test)) == (3600, 400, 1000)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 28, 28)
    # 100 test images per class (stratified)
    assert torch.bincount(a.test.y).tolist() == [100] * 10
    # splits are disjoint: no test image appears in train
    tr = {bytes(t.numpy()) for t in a.train.x}
    assert not any(bytes(t.numpy()) in tr for t in a.test.x[:200])


def test_digits_images_in_unit_range(digits):
    x = digits.train.images()
    assert x.min() >= 0 and x.max() <= 1 and x.shape[1:] == (1, 8, 8)
    assert digits.num_classes == 10


def test_step_and_exp_imbalance():
    y = torch.arange(10).repeat_interleave(100)
    d = ArrayData(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), y)
    step = torch.bincount(imbalance(d, "step", 10, 10).y, minlength=10).tolist()
    assert step == [100] * 5 + [10] * 5
    exp = torch.bincount(imbalance(d, "exp", 100, 10).y, minlength=10).tolist()
    assert exp[0] == 100 and exp[-1] == 1 and all(a >= b for a, b in zip(exp, exp[1:], strict=False))


def test_holdout_counts():
    y = torch.arange(4).repeat_interleave(25)
    d = ArrayData(torch.zeros(100, 1, 2, 2), y)
    keep, hold = stratified_holdout(d, 0.2)
    assert len(hold) == 20 and torch.bincount(hold.y).tolist() == [5, 5, 5, 5]
    with pytest.raises(UserError):
        stratified_holdout(d, 100)


def test_augment_crop_flip_keeps_shape_and_content():
    x = torch.rand(16, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, "crop_flip", g)
    assert out.shape == x.shape
    # a crop is a shifted copy: every output pixel is either padding (0) or from the input
    assert torch.isin(out[0].flatten(), torch.cat([x[0].flatten(), torch.zeros(1)])).all()
    assert torch.equal(augment_batch(x, "none"), x)


def test_cifar10_reader(tmp_path):
    test, labels = _write_cifar10(tmp_path)
    b = load_data(DataConfig(name="cifar10", root=str(tmp_path), val_size=0.0))
    assert len(b.train) == 50 and len(b.test) == 6
    assert b.test.x.shape == (6, 3, 32, 32)
    assert torch.equal(b.test.x[2], torch.from_numpy(test[2].reshape(3, 32, 32)))
    assert b.test.y.tolist() == labels and b.class_names[3] == "c3"
    assert b.augment == "crop_flip"


def test_cifar_refuses_code_in_pickle(tmp_path):
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(UserError, match="refusing to load"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.tobytes())


def test_mnist_reader(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 256, (20, 28, 28))
    _idx(raw / "train-images-idx3-ubyte", xtr)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", [3, 1, 4, 1, 5])
    b = load_data(DataConfig(name="mnist", root=str(tmp_path), val_size=0.0))
    assert b.train.x.shape == (20, 1, 28, 28) and b.test.y.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(b.train.x[7, 0], torch.from_numpy(xtr[7].astype(np.uint8)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(UserError, match="not an IDX file"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="data.root is not set"):
        load_data(DataConfig(name="cifar10"))
    with pytest.raises(UserError, match="not found"):
        load_data(DataConfig(name="svhn", root=str(tmp_path)))
