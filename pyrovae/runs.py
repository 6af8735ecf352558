"""Run folders: atomic checkpoints, a checksummed manifest, and safe loading.

A run folder holds::

    manifest.json            format version, latest and best checkpoint, their SHA-256
    config.json              model, data and training configuration (JSON)
    checkpoint-000012.pt     tensors (numbered by write, not by epoch) and plain values only (loaded with weights_only=True)
    metrics.csv              one row per epoch
    report.json              summary written at the end of a run
    *.png                    pictures

Writes are crash-safe: every file is written to a temporary name in the same
folder, flushed to disk and renamed over the old one (``os.replace`` is atomic
on POSIX and Windows). A new checkpoint gets a new file name, and only the
rename of ``manifest.json`` makes it current, so a kill at any moment leaves
the previous checkpoint and its manifest intact. Old checkpoints are removed
only after the manifest stops naming them; the latest and the best are kept.

Loading never unpickles arbitrary objects: checkpoints are read with
``torch.load(weights_only=True)``, which refuses pickled code, and JSON files
are parsed as JSON. Problems raise :class:`CheckpointError` naming the file.
"""

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["CheckpointError", "Run", "load_run", "load_checkpoint", "read_manifest", "FORMAT_VERSION"]

#: version of the run-folder and checkpoint format written by this pyrovae
FORMAT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d{6,}\.pt$")
MANIFEST = "manifest.json"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be loaded safely or correctly."""


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # e.g. Windows: directories cannot be opened
        pass


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON, atomically."""
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path, what: str):
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None


def _check_run_dir(run_dir) -> Path:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run folder must be a path, got {run_dir!r}")
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"run folder {path} is not a folder")
    return path


def read_manifest(run_dir) -> dict:
    """Read and validate ``manifest.json`` of a run folder.

    File names in it must be plain checkpoint names (``checkpoint-NNNNNN.pt``):
    a manifest cannot point outside its folder.
    """
    path = _check_run_dir(run_dir) / MANIFEST
    manifest = _read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != "pyrovae-run":
        raise CheckpointError(f"{path} is not a pyrovae run manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{path} has format version {version!r}; this pyrovae reads versions 1..{FORMAT_VERSION}"
        )
    for key in ("latest", "best"):
        entry = manifest.get(key)
        if entry is None and key == "best":
            continue
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not _CHECKPOINT_NAME.match(entry["file"])
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{path}: entry {key!r} is malformed or names a file outside the run folder: {entry!r}")
    return manifest


def save_checkpoint(run_dir, state: dict, *, epoch: int, step: int = 0, is_best: bool = False) -> Path:
    """Write ``state`` as a new checkpoint, then commit it in the manifest.

    :param dict state: tensors and plain Python values only.
    :param int epoch: completed epochs, recorded in the manifest with ``step``.
    :returns: the checkpoint's path.
    """
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    torch.save({"format": "pyrovae-checkpoint", "version": FORMAT_VERSION, **state}, buf)
    data = buf.getvalue()
    old = None
    if (run_dir / MANIFEST).exists():
        try:
            old = read_manifest(run_dir)
        except CheckpointError:
            old = None
    # A fresh sequence number per write: a new checkpoint never overwrites a file
    # that the current manifest names, even when a restarted run repeats an epoch.
    seq = int((old or {}).get("seq", 0)) + 1
    while (run_dir / f"checkpoint-{seq:06d}.pt").exists():
        seq += 1
    name = f"checkpoint-{seq:06d}.pt"
    _atomic_write(run_dir / name, data)
    entry = {"file": name, "sha256": _sha256(data), "epoch": epoch, "step": step}
    best = entry if is_best else (old or {}).get("best")
    manifest = {"format": "pyrovae-run", "version": FORMAT_VERSION, "seq": seq, "latest": entry, "best": best}
    config = run_dir / CONFIG
    if config.exists():
        manifest["config_sha256"] = _sha256(config.read_bytes())
    write_json(run_dir / MANIFEST, manifest)
    keep = {entry["file"], (best or {}).get("file")}
    for f in run_dir.glob("checkpoint-*.pt"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    for f in run_dir.glob(".*.tmp"):
        f.unlink(missing_ok=True)
    return run_dir / name


def load_checkpoint(run_dir, which: str = "latest") -> dict:
    """Load the ``"latest"`` or ``"best"`` checkpoint of a run folder, safely.

    The file must match the SHA-256 the manifest recorded, and is read with
    ``torch.load(weights_only=True)``: a file that would run code on load is
    refused with :class:`CheckpointError` and the code does not run.
    """
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    run_dir = _check_run_dir(run_dir)
    manifest = read_manifest(run_dir)
    entry = manifest.get(which) or manifest["latest"]
    path = run_dir / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} named by {run_dir / MANIFEST} is missing") from None
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} does not match the SHA-256 recorded in {run_dir / MANIFEST}: "
            "it was modified or corrupted after it was written"
        )
    return _safe_torch_load(data, path)


def _safe_torch_load(data: bytes, path: Path) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects that are not plain tensors or values; "
            f"refused to unpickle it (weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != "pyrovae-checkpoint":
        raise CheckpointError(f"{path} is not a pyrovae checkpoint")
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this pyrovae reads 1..{FORMAT_VERSION}")
    return state


@dataclass(frozen=True)
class Run:
    """A reloaded run folder.

    :ivar path: the folder.
    :ivar config: the parsed ``config.json``.
    :ivar vae: the :class:`~pyrovae.VAE` with trained weights (on the CPU), or
        None when the run trained a user's own model/guide pair (restore those
        with :func:`pyrovae.train.restore_params`).
    :ivar checkpoint: the loaded checkpoint dictionary.
    :ivar history: per-epoch metrics.
    """

    path: Path
    config: dict
    vae: Optional[torch.nn.Module]
    checkpoint: dict
    history: list


def load_config(run_dir) -> dict:
    """Read ``config.json``, checking it against the manifest's checksum."""
    run_dir = _check_run_dir(run_dir)
    manifest = read_manifest(run_dir)
    path = run_dir / CONFIG
    expected = manifest.get("config_sha256")
    if expected is not None and path.exists() and _sha256(path.read_bytes()) != expected:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in {run_dir / MANIFEST}")
    config = _read_json(path, "config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def load_run(path, *, which: str = "latest") -> Run:
    """Reload a run folder written by :func:`pyrovae.fit` or ``pyrovae train``.

    :param path: the run folder.
    :param str which: ``"latest"`` or ``"best"`` checkpoint.
    :returns: a :class:`Run`; its ``vae`` is rebuilt from ``config.json`` when
        the run trained a :class:`~pyrovae.VAE`.
    """
    from .vae import VAE, VAEConfig  # runs.py is imported by vae users; avoid a cycle

    config = load_config(path)
    state = load_checkpoint(path, which)
    vae = None
    model_cfg = config.get("model")
    if isinstance(model_cfg, dict) and model_cfg.get("type") == "VAE":
        try:
            vae = VAE(config=VAEConfig(**model_cfg["config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{Path(path) / CONFIG}: invalid VAE config: {e}") from None
        prefix = "model."
        weights = {k[len(prefix):]: v for k, v in state["params"].items() if k.startswith(prefix)}
        try:
            vae.load_state_dict(weights, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint in {path} does not fit the VAE in config.json: {e}") from None
        missing = {n for n, _ in vae.named_parameters()} - set(weights)
        if missing:
            raise CheckpointError(f"checkpoint in {path} lacks VAE parameters {sorted(missing)[:5]}")
    return Run(path=Path(path), config=config, vae=vae, checkpoint=state, history=list(state.get("history", [])))
