import gzip
import struct

import numpy as np
import pytest
import torch

from pyrovae.data import from_arrays, load_dataset, read_amat, read_idx

from .common import data_dir, requires_binarized_mnist, requires_mnist


def test_digits_default_splits_are_fixed_and_recorded():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    info = a.info()
    assert info["sizes"] == {"train": 1259, "val": 179, "test": 359}
    assert info["binarize"] == "dynamic" and "RandomState(0)" in info["split"]
    # dynamic: train keeps intensities, evaluation splits are binary and fixed
    assert ((a.train > 0) & (a.train < 1)).any()
    assert set(a.test.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("mode", ["none", "static", "threshold"])
def test_binarize_modes(mode):
    s = load_dataset("digits", binarize=mode)
    binary = set(s.train.unique().tolist()) <= {0.0, 1.0}
    assert binary == (mode != "none"), mode
    assert (s.batch_transform is None)


def _write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + payload)


def test_idx_roundtrip_and_malformed(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", 2051, (2, 3, 4), imgs.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.gz"), imgs)
    _write_idx(tmp_path / "magic.gz", 1234, (2, 3, 4), imgs.tobytes())
    with pytest.raises(ValueError, match=r"magic.gz has magic number 1234"):
        read_idx(tmp_path / "magic.gz")
    _write_idx(tmp_path / "short.gz", 2051, (2, 3, 4), imgs.tobytes()[:-5])
    with pytest.raises(ValueError, match=r"short.gz header says \(2, 3, 4\).*holds 19"):
        read_idx(tmp_path / "short.gz")
    _write_idx(tmp_path / "count.gz", 2051, (5, 3, 4), imgs.tobytes())
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "count.gz")
    (tmp_path / "notgz.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "notgz.gz")


def test_amat_parse_and_malformed(tmp_path):
    rows = np.random.RandomState(0).randint(0, 2, size=(3, 784))
    text = "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "a.amat").write_text(text)
    np.testing.assert_array_equal(read_amat(tmp_path / "a.amat").reshape(3, 784), rows)
    (tmp_path / "b.amat").write_text("0 1 1\n")
    with pytest.raises(ValueError, match="784 values per line"):
        read_amat(tmp_path / "b.amat")
    (tmp_path / "c.amat").write_text(text.replace("1", "2", 1))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        read_amat(tmp_path / "c.amat")
    (tmp_path / "d.amat").write_text(" ".join(["x"] * 784) + "\n")
    with pytest.raises(ValueError, match="other than 0 and 1 .line 1: 'x'"):
        read_amat(tmp_path / "d.amat")


def test_missing_data_dir_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    with pytest.raises(ValueError, match="needs its files: pass root=DIR"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match=r"not found in"):
        load_dataset("mnist", root=str(tmp_path))


def test_user_arrays_and_files(tmp_path):
    x = np.random.rand(40, 2, 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    s = load_dataset(str(tmp_path / "x.npy"), binarize="none")
    assert s.event_shape == (2, 3) and sum(s.info()["sizes"].values()) == 40
    np.savez(tmp_path / "x.npz", x=x, labels=np.arange(40))
    assert load_dataset(str(tmp_path / "x.npz"), binarize="static").train_labels is not None
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="without pickle"):
        load_dataset(str(tmp_path / "obj.npy"))


@pytest.mark.parametrize(
    "x, err, match",
    [
        (np.array([[np.nan, 1.0]] * 5), ValueError, "NaN"),
        (np.zeros((0, 3)), ValueError, "empty"),
        (np.zeros(5), ValueError, r"shape \(n, \*event_shape\)"),
        (np.array([["a", "b"]] * 5), TypeError, "numeric"),
    ],
)
def test_from_arrays_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        from_arrays(x)


def test_bad_options():
    with pytest.raises(ValueError, match="binarize must be one of"):
        load_dataset("digits", binarize="sometimes")
    with pytest.raises(ValueError, match="'cifar' is not one of"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="no training examples left"):
        from_arrays(np.random.rand(10, 2), val_fraction=0.5, test_fraction=0.5)


@requires_mnist
def test_mnist_from_shared_files():
    s = load_dataset("mnist", root=str(data_dir()), binarize="none", subset=100)
    assert s.train.shape == (100, 1, 28, 28) and s.test.shape == (100, 1, 28, 28)
    assert 0.0 <= s.train.min() and s.train.max() <= 1.0
    assert s.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published first test labels


@requires_binarized_mnist
def test_binarized_mnist_from_shared_files():
    s = load_dataset("binarized-mnist", root=str(data_dir()), binarize="static", subset=50)
    assert s.info()["binarize"] == "static" and set(s.train.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="already statically binarised"):
        load_dataset("binarized-mnist", root=str(data_dir()), binarize="dynamic")
