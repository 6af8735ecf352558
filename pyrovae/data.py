"""Datasets with fixed, recorded splits and explicit binarisation.

Every loader returns a :class:`DataSplits`: float32 tensors of shape
``(n, C, H, W)`` (or ``(n, *event_shape)`` for user arrays) with values in
``[0, 1]``, fixed train/validation/test splits, and a JSON-able
:meth:`DataSplits.info` that run folders store next to every figure.

Binarisation is never implicit:

* ``"none"``: keep grayscale intensities in ``[0, 1]``;
* ``"static"``: draw ``x ~ Bernoulli(intensity)`` once, with a recorded seed;
* ``"dynamic"``: draw a new binarisation of each training batch every time it
  is used (:meth:`DataSplits.batch_transform`); validation and test sets are
  binarised once, statically, so that evaluations are comparable;
* ``"threshold"``: ``x > 0.5``.

Sources: ``digits`` (scikit-learn's 8x8 digits, no files needed), ``mnist``
(the four IDX ``.gz`` files), ``binarized-mnist`` (Larochelle's ``.amat`` or
``.amat.gz`` files, already binary), and user arrays (``.npy``/``.npz``
files or in-memory arrays through :func:`from_arrays`).
"""

import contextlib
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ._checks import check_int

__all__ = [
    "DataSplits",
    "BINARIZATIONS",
    "DATASETS",
    "load_dataset",
    "from_arrays",
    "read_idx",
    "read_amat",
    "dynamic_binarize",
    "to_device",
]

BINARIZATIONS = ("none", "static", "dynamic", "threshold")
_DATA_ENV = "PYROVAE_DATA"


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test tensors of one dataset, with their provenance.

    :ivar torch.Tensor train: shape ``(n_train, *event_shape)``, float32.
    :ivar torch.Tensor val: shape ``(n_val, *event_shape)``; may have 0 rows.
    :ivar torch.Tensor test: shape ``(n_test, *event_shape)``; may have 0 rows.
    :ivar train_labels: int64 labels of shape ``(n_train,)`` or None (same for val, test).
    :ivar str binarize: one of :data:`BINARIZATIONS`.
    :ivar str split: how the splits were made, in words.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    binarize: str
    seed: int
    split: str
    train_labels: Optional[torch.Tensor] = None
    val_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    source: str = ""

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def batch_transform(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Per-batch transform for training: :func:`dynamic_binarize` or None."""
        return dynamic_binarize if self.binarize == "dynamic" else None

    def info(self) -> dict:
        """JSON-able provenance: name, sizes, binarisation, seed, split rule."""
        return {
            "name": self.name,
            "source": self.source,
            "event_shape": list(self.event_shape),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "binarize": self.binarize,
            "seed": self.seed,
            "split": self.split,
        }


def dynamic_binarize(x: torch.Tensor) -> torch.Tensor:
    """A fresh Bernoulli draw of intensities ``x`` in ``[0, 1]`` (uses torch's global RNG)."""
    return torch.bernoulli(x)


def _check_binarize(binarize):
    if binarize not in BINARIZATIONS:
        raise ValueError(f"binarize must be one of {BINARIZATIONS}, got {binarize!r}")


def _check_images(name: str, x: np.ndarray) -> None:
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (n, *event_shape) with n >= 1, got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape}")
    if 0 in x.shape[1:]:
        raise ValueError(f"{name} has an empty event dimension: shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _binarize_static(x: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    if mode in ("none",):
        return x
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same binarisation on every device
    return torch.bernoulli(x.cpu(), generator=gen).to(x.device)


def _make_splits(
    name, x, labels, *, binarize, seed, val_fraction, test_fraction, source, subset
) -> DataSplits:
    """Split one array by a seeded permutation into train/val/test."""
    n = len(x)
    for arg, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (0.0 <= frac < 1.0):
            raise ValueError(f"{arg} must be in [0, 1), got {frac!r}")
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    if n - n_val - n_test < 1:
        raise ValueError(f"no training examples left: n={n}, val_fraction={val_fraction}, test_fraction={test_fraction}")
    perm = np.random.RandomState(seed).permutation(n)
    parts = np.split(perm, [n - n_val - n_test, n - n_test])
    split = (
        f"numpy RandomState({seed}).permutation({n}): first {len(parts[0])} train, "
        f"next {len(parts[1])} val, last {len(parts[2])} test"
    )
    arrays = [x[p] for p in parts]
    labs = [None if labels is None else labels[p] for p in parts]
    return _finish(name, arrays, labs, binarize=binarize, seed=seed, split=split, source=source, subset=subset)


def _finish(name, arrays, labels, *, binarize, seed, split, source, subset) -> DataSplits:
    _check_binarize(binarize)
    if subset is not None:
        check_int("subset", subset)
        arrays = [a[:subset] for a in arrays]
        labels = [None if l is None else l[:subset] for l in labels]
        split += f"; each split cut to its first {subset}"
    # Data from files or arrays lives on the CPU, whatever the default device: fit moves it.
    tensors = [torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device="cpu") for a in arrays]
    if binarize != "none" and any(((t < 0) | (t > 1)).any() for t in tensors):
        raise ValueError(f"binarize={binarize!r} needs intensities in [0, 1]")
    # train keeps intensities under "dynamic"; evaluation splits are fixed once.
    offsets = {"train": 0, "val": 1, "test": 2}
    out = []
    for key, t in zip(offsets, tensors):
        mode = "none" if (binarize == "dynamic" and key == "train") else binarize
        mode = "static" if mode == "dynamic" else mode
        out.append(_binarize_static(t, mode, seed + offsets[key]))
    labs = [None if l is None else torch.tensor(np.asarray(l), dtype=torch.int64, device="cpu") for l in labels]
    return DataSplits(
        name=name,
        train=out[0],
        val=out[1],
        test=out[2],
        binarize=binarize,
        seed=seed,
        split=split,
        train_labels=labs[0],
        val_labels=labs[1],
        test_labels=labs[2],
        source=source,
    )


def from_arrays(
    x,
    labels=None,
    *,
    name: str = "array",
    binarize: str = "none",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    subset: Optional[int] = None,
) -> DataSplits:
    """Splits from a user array of shape ``(n, *event_shape)``.

    :param x: numpy array or tensor of numbers; with ``binarize != "none"``
        values must be in ``[0, 1]``.
    :param labels: optional integer labels of shape ``(n,)``.

    >>> s = from_arrays(np.random.rand(50, 3, 4), val_fraction=0.2, test_fraction=0.2)
    >>> s.info()["sizes"], s.event_shape
    ({'train': 30, 'val': 10, 'test': 10}, (3, 4))
    """
    _check_binarize(binarize)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"x must be a numeric array, got dtype {x.dtype}")
    x = x.astype(np.float64)
    _check_images("x", x)
    limit = float(np.finfo(np.float32).max)
    if x.size and np.abs(x).max() > limit:
        raise ValueError(f"x has values beyond the float32 range (|x| up to {np.abs(x).max():.3g})")
    x = x.astype(np.float32)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
    return _make_splits(
        name, x, labels, binarize=binarize, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, source="user array", subset=subset,
    )


def _load_digits(root, *, binarize, seed, subset):
    from sklearn.datasets import load_digits  # ships its data; no download

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _make_splits(
        "digits", x, d.target, binarize=binarize, seed=seed, val_fraction=0.1,
        test_fraction=0.2, source="sklearn.datasets.load_digits (8x8, 0..16 scaled to [0, 1])",
        subset=subset,
    )


# ---------------------------------------------------------------- file formats


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) of uint8 images or labels.

    Checks the magic number, the dimensions and that the payload size matches
    the header; any mismatch is a :class:`ValueError` naming the file.

    :returns: uint8 array of shape ``(n, rows, cols)`` for images or ``(n,)`` for labels.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is too short ({len(raw)} bytes) for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise ValueError(
            f"IDX file {path} has magic number {int.from_bytes(raw[:4], 'big')}, "
            "expected 2049 (uint8 labels) or 2051 (uint8 images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header
    if payload != expected:
        raise ValueError(
            f"IDX file {path} header says {dims} ({expected} bytes of data) but it holds {payload}: "
            "truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_amat(path) -> np.ndarray:
    """Read Larochelle's binarized-MNIST ``.amat`` (or ``.amat.gz``) text file.

    :returns: uint8 array of shape ``(n, 28, 28)`` with values 0 or 1.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"cannot read amat file {path}: {e}") from None
    # The fast path needs every line to be exactly 784 single-digit tokens.
    if raw and len(raw) % 1568 == 0:
        rows = np.frombuffer(raw, np.uint8).reshape(-1, 1568)
        if (rows[:, 1::2] == ord(" ")).sum(1).min() == 783 and (rows[:, -1] == ord("\n")).all():
            x = rows[:, 0::2] - ord("0")
            if (x <= 1).all():
                return x.reshape(-1, 28, 28)
    # Slow path: any whitespace layout, but strictly 784 values of 0 or 1 per line.
    try:
        lines = [line for line in raw.decode("ascii").split("\n") if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"amat file {path} is not ASCII text") from None
    if not lines:
        raise ValueError(f"amat file {path} is empty")
    rows = []
    for i, line in enumerate(lines):
        tokens = line.split()
        if len(tokens) != 784:
            raise ValueError(f"amat file {path} must have 784 values per line; line {i + 1} has {len(tokens)}")
        if not set(tokens) <= {"0", "1"}:
            bad = next(t for t in tokens if t not in ("0", "1"))
            raise ValueError(f"amat file {path} holds values other than 0 and 1 (line {i + 1}: {bad[:20]!r})")
        rows.append(np.array(tokens, dtype=np.uint8))
    x = np.stack(rows)
    return x.astype(np.uint8).reshape(-1, 28, 28)


def _find(root: Optional[str], sub: str, names, dataset: str) -> list:
    """Locate files by name in root, root/sub, $PYROVAE_DATA and $PYROVAE_DATA/sub."""
    bases = []
    if root is not None:
        bases.append(Path(root))
    elif os.environ.get(_DATA_ENV):
        bases.append(Path(os.environ[_DATA_ENV]))
    if not bases:
        raise ValueError(
            f"dataset {dataset!r} needs its files: pass root=DIR (CLI: --data-dir DIR) "
            f"or set {_DATA_ENV}"
        )
    tried = []
    for base in bases:
        for folder in (base, base / sub):
            found = []
            for name in names:
                for candidate in (folder / name, folder / (name + ".gz")):
                    if candidate.is_file():
                        found.append(candidate)
                        break
            if len(found) == len(names):
                return found
            tried.append(str(folder))
    raise ValueError(f"dataset {dataset!r}: files {list(names)} (or .gz) not found in {tried}")


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _download_mnist(root):
    try:
        import torchvision  # optional extra; never imported at module level
    except Exception as e:  # broken CUDA/CPU pairs raise more than ImportError
        raise ValueError(f"download=True needs torchvision (pip install 'pyrovae[vision]'): {e}") from None
    torchvision.datasets.MNIST(root, download=True)
    return str(Path(root) / "MNIST" / "raw")


def _load_mnist(root, *, binarize, seed, subset, download=False):
    if download:
        root = _download_mnist(root or ".")
    paths = _find(root, "mnist", _MNIST_FILES, "mnist")
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in paths)
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise ValueError(f"MNIST image and label counts differ: {len(tr_x)}/{len(tr_y)}, {len(te_x)}/{len(te_y)}")
    n_val = min(10000, len(tr_x) // 6)
    scale = lambda a: (a.astype(np.float32) / 255.0)[:, None]
    arrays = [scale(tr_x[:-n_val]), scale(tr_x[-n_val:]), scale(te_x)]
    labels = [tr_y[:-n_val], tr_y[-n_val:], te_y]
    split = f"official test set; last {n_val} training images as validation"
    return _finish("mnist", arrays, labels, binarize=binarize, seed=seed, split=split,
                   source=f"IDX files in {paths[0].parent}", subset=subset)


def _load_binarized_mnist(root, *, binarize, seed, subset):
    if binarize not in ("none", "static"):
        raise ValueError(f"binarized-mnist is already statically binarised; binarize must be 'static' or 'none', got {binarize!r}")
    names = [f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")]
    paths = _find(root, "binarized-mnist", names, "binarized-mnist")
    arrays = [read_amat(p)[:, None].astype(np.float32) for p in paths]
    split = "Larochelle & Murray (2011) splits: 50000 train, 10000 valid, 10000 test"
    # Already binary, so a Bernoulli draw returns the data unchanged; "static"
    # records what it is: Larochelle's fixed binarisation.
    return _finish("binarized-mnist", arrays, [None] * 3, binarize="static", seed=seed, split=split,
                   source=f"amat files in {paths[0].parent} (static binarisation by Larochelle)",
                   subset=subset)


def _load_array_file(path, *, binarize, seed, subset):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {path} as .npy/.npz without pickle: {e}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "x" not in loaded.files:
                raise ValueError(f"{path} must hold an array named 'x' (and optionally 'labels'), has {loaded.files}")
            x = loaded["x"]
            labels = loaded["labels"] if "labels" in loaded.files else None
    else:
        x, labels = loaded, None
    return from_arrays(x, labels, name=path.name, binarize=binarize, seed=seed, subset=subset)


#: dataset loaders by name; a path ending in .npy or .npz loads a user array
DATASETS = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "binarized-mnist": _load_binarized_mnist,
}


def load_dataset(
    name: str = "digits",
    *,
    root: Optional[str] = None,
    binarize: str = "dynamic",
    seed: int = 0,
    subset: Optional[int] = None,
    download: bool = False,
) -> DataSplits:
    """Load a dataset by name with fixed splits.

    :param str name: ``"digits"``, ``"mnist"``, ``"binarized-mnist"`` or a path
        to a ``.npy``/``.npz`` file (``.npz`` with arrays ``x`` and optionally ``labels``).
    :param str root: folder with the dataset's files (or a parent holding
        ``mnist/`` / ``binarized-mnist/``); default ``$PYROVAE_DATA``.
    :param str binarize: one of :data:`BINARIZATIONS` (binarized-mnist is
        always the published static binarisation).
    :param int seed: seed of splits and static binarisations.
    :param int subset: keep only the first ``subset`` examples of each split.
    :param bool download: MNIST only: fetch the files with torchvision (optional extra).

    >>> s = load_dataset("digits", binarize="static")
    >>> s.info()["sizes"], s.event_shape
    ({'train': 1259, 'val': 179, 'test': 359}, (1, 8, 8))
    """
    _check_binarize(binarize)
    check_int("seed", seed, minimum=-2**63)
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a path, got {name!r}")
    name = str(name)
    if name.endswith((".npy", ".npz")):
        return _load_array_file(name, binarize=binarize, seed=seed, subset=subset)
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not one of {sorted(DATASETS)} nor a .npy/.npz path")
    if name == "digits" and root is not None:
        raise ValueError("dataset 'digits' ships with scikit-learn; root= is not used")
    kwargs = {"download": download} if name == "mnist" else {}
    if download and name != "mnist":
        raise ValueError(f"download=True is only supported for 'mnist', not {name!r}")
    return DATASETS[name](root, binarize=binarize, seed=seed, subset=subset, **kwargs)


# --------------------------------------------------------------------------- training batches
class TensorBatches:
    """Training data held in memory as the pair's arguments, with one datapoint per leading row.

    ``data`` is what :func:`pyrovae.fit` accepts: a tensor or NumPy array (one
    argument, ``model(x)``), a tuple of them (``model(*batch)``), a dict
    (``model(**batch)``), or a map-style ``Dataset`` whose items are tensors,
    tuples or dicts (read once and stacked into the same forms). Every
    tensor must have the same number of rows; a batch takes the same rows of
    each. Floating-point tensors must be finite. A single integer tensor is
    converted to float32 (images stored as integers); tensors inside a tuple
    or dict keep their dtype (labels stay integers).

    :param data: the data, in one of the forms above.
    :param str name: the argument's name, for messages.

    >>> xs, ys = torch.zeros(5, 3), torch.arange(5)
    >>> data = TensorBatches((xs, ys), "data")
    >>> len(data), [t.shape for t in data.take(torch.tensor([0, 2]))]
    (5, [torch.Size([2, 3]), torch.Size([2])])
    """

    def __init__(self, data, name: str):
        self.name = name
        self.structure = _as_structure(data, name)
        sizes = {k: len(t) for k, t in self._items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{name}: every tensor needs one row per datapoint, got rows {sizes}")
        self._len = next(iter(sizes.values()))
        for key, t in self._items():
            label = name if key is None else f"{name}[{key!r}]"
            if t.dim() < 1 or len(t) == 0:
                raise ValueError(f"{label} is empty: shape {tuple(t.shape)}")
            if t.is_complex():
                raise TypeError(f"{label} must hold real numbers, got dtype {t.dtype}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero()[0].item()
                raise ValueError(f"{label} contains NaN or infinite values (first at index {bad})")

    def _items(self):
        s = self.structure
        if isinstance(s, torch.Tensor):
            return [(None, s)]
        return list(s.items()) if isinstance(s, dict) else list(enumerate(s))

    def __len__(self) -> int:
        return self._len

    def _map(self, fn):
        s = self.structure
        if isinstance(s, torch.Tensor):
            return fn(s)
        if isinstance(s, dict):
            return {k: fn(v) for k, v in s.items()}
        return tuple(fn(v) for v in s)

    def to(self, device) -> "TensorBatches":
        self.structure = self._map(lambda t: t.to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self._items()[0][1].device

    def take(self, idx: torch.Tensor):
        """The batch of rows ``idx``, in the data's form."""
        return self._map(lambda t: t.index_select(0, idx))

    def head(self, n: int):
        """The first ``n`` rows."""
        return self._map(lambda t: t[:n])

    def event_shapes(self):
        return self._map(lambda t: tuple(t.shape[1:]))


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be numeric, got a numpy array of dtype object")
        return torch.as_tensor(np.array(value), device="cpu")
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")


def _as_structure(data, name: str):
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = _as_tensor(data, name)
        return x if x.is_floating_point() or x.is_complex() else x.float()
    if isinstance(data, tuple):
        if not data:
            raise ValueError(f"{name} is an empty tuple")
        return tuple(_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(data))
    if isinstance(data, dict):
        if not data or not all(isinstance(k, str) for k in data):
            raise ValueError(f"{name} must be a non-empty dict with str keys (the programs' keyword arguments)")
        return {k: _as_tensor(v, f"{name}[{k!r}]") for k, v in data.items()}
    if isinstance(data, list):
        raise TypeError(f"{name} is a list: pass a tuple of tensors (the programs' arguments, model(*batch)), "
                        "a stacked tensor, or a Dataset")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
        return _stack_dataset(data, name)
    raise TypeError(f"{name} must be a tensor, numpy array, tuple or dict of tensors, or a map-style Dataset, "
                    f"got {type(data).__name__}")


def _item(value) -> torch.Tensor:
    """A Dataset item as a tensor: a tensor keeps its device, anything else lands on the CPU."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device="cpu")


def _stack_dataset(dataset, name: str):
    """Read a map-style Dataset once; items that are tuples or dicts keep their form."""
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    items = [dataset[i] for i in range(len(dataset))]
    first = items[0]
    if isinstance(first, dict):
        return {k: torch.stack([_item(it[k]) for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.stack([_item(it[j]) for it in items]) for j in range(len(first)))
    x = torch.stack([_item(it) for it in items])
    return x if x.is_floating_point() else x.float()


def _batch_form(batch, name: str):
    """A collated batch as the programs' arguments: lists (default_collate of tuples) become tuples."""
    if isinstance(batch, list):
        batch = tuple(batch)
    if isinstance(batch, torch.Tensor) and not (batch.is_floating_point() or batch.is_complex()):
        batch = batch.float()
    if isinstance(batch, tuple) and not all(isinstance(t, torch.Tensor) for t in batch) or \
            isinstance(batch, dict) and not all(isinstance(t, torch.Tensor) for t in batch.values()):
        raise TypeError(f"{name} yields batches that are not tensors, tuples or dicts of tensors")
    return batch


def _rows(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def to_device(batch, device):
    """A batch (a tensor, a tuple or a dict of tensors) on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(v.to(device) for v in batch)
    return batch.to(device)


def _on_cpu():
    """The CPU as the default device while a DataLoader draws: its samplers pair CPU generators
    with tensors that the default device creates (``torch.set_default_device("cuda")`` breaks
    ``shuffle=True`` otherwise). A no-op when the CPU is the default already."""
    if torch.get_default_device().type == "cpu":
        return contextlib.nullcontext()
    return torch.device("cpu")


def _cpu_batches(iterator):
    while True:
        with _on_cpu():
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


class LoaderBatches:
    """A user's ``DataLoader`` as a source of batches, streamed: the data need not fit in memory.

    Each batch is moved to the training device as it arrives. A mid-epoch
    resume replays the epoch's batch order and skips the batches already
    trained on: the order is fixed by the random state at the start of the
    epoch (torch's global generator, which the loader draws its shuffling
    seed from, and the sampler's own generator if it has one), which the
    checkpoint records.

    :param loader: a ``torch.utils.data.DataLoader`` of tensors, tuples or dicts.
    :param str name: the argument's name, for messages.
    """

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name
        try:
            self.steps = len(loader)
            self._len = len(loader.dataset)
        except TypeError:
            raise TypeError(f"{name}: an iterable-style DataLoader has no length; pyrovae needs a map-style "
                            "Dataset (or a sampler with a length) to know where an epoch ends") from None
        if self.steps == 0:
            raise ValueError(f"{name} yields no batches")
        self.batch_size = loader.batch_size or 1
        self.device = torch.device("cpu")
        self._first = None

    def __len__(self) -> int:
        return self._len

    def to(self, device) -> "LoaderBatches":
        self.device = torch.device(device)
        return self

    def first(self):
        """The first batch of a fresh pass, drawn without moving any random state."""
        if self._first is None:
            with torch.random.fork_rng(devices=[]), _on_cpu():
                self._first = _batch_form(next(iter(self.loader)), self.name)
        return to_device(self._first, self.device)

    def head(self, n: int):
        batch = self.first()
        if isinstance(batch, dict):
            return {k: v[:n] for k, v in batch.items()}
        return tuple(v[:n] for v in batch) if isinstance(batch, tuple) else batch[:n]

    def epoch_state(self) -> dict:
        """The random state that fixes this epoch's batch order (store it at the epoch's start)."""
        sampler_gen = getattr(getattr(self.loader, "sampler", None), "generator", None)
        return {"torch": torch.get_rng_state(),
                "sampler": None if sampler_gen is None else sampler_gen.get_state()}

    def batches(self, epoch: int, state: dict, skip: int):
        """This epoch's batches from index ``skip`` on, in the order ``state`` fixes."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        sampler_gen = getattr(sampler, "generator", None)
        if sampler_gen is not None and state.get("sampler") is not None:
            sampler_gen.set_state(state["sampler"])
        current = torch.get_rng_state()
        torch.set_rng_state(state["torch"])
        with _on_cpu():
            iterator = iter(self.loader)  # draws the epoch's shuffling seed from the generator set above
        if skip:
            torch.set_rng_state(current)
        for i, batch in enumerate(_cpu_batches(iterator)):
            if i >= skip:
                batch = _batch_form(batch, self.name)
                yield to_device(batch, self.device), _rows(batch)
