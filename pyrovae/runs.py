"""Run folders: the on-disk format, atomic commits through a manifest, and safe loading.

A run folder holds::

    manifest.json            format version; latest and best checkpoint; SHA-256 of every file below
    config.json              the pair, the data and the training configuration (JSON)
    checkpoint-000012.pt     tensors and plain values (numbered by write), read with weights_only=True
    metrics.csv              one row per epoch
    report.json, *.png       the summary and pictures of ``pyrovae train``
    evaluate/, sample/, ...  what later commands wrote, each in its own folder

**One commit point.** Every change goes through :meth:`RunFolder.commit`:
the new files are written under temporary names, flushed and renamed into
place, and the new ``manifest.json`` (renamed last) names them with their
checksums. A checkpoint gets a fresh file name, so a kill at any moment leaves
the previous manifest and everything it names intact. A JSON file that the
manifest checks is never rewritten outside a commit, so it always matches.

**Safe loading.** Checkpoints are read with ``torch.load(weights_only=True)``,
which refuses pickled code, after their SHA-256 is checked; JSON is parsed as
JSON; file names in the manifest cannot point outside the folder. Problems
raise :class:`CheckpointError` naming the file.

**Format versions.** :class:`Checkpoint` is the checkpoint's format, in one
place. Version 2 stores parameters and optimiser state by stable name (see
:mod:`pyrovae.pair`) and the modules' buffers. Version 1 files are migrated
when read: ``pyro.module`` names lose Pyro's internal separator, optimiser
state is matched to parameter names by the order they were saved in, and the
missing buffers are recorded as unknown, so restoring a model that has buffers
is refused rather than guessed.
"""

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyro
import torch

from ._checks import CheckpointError, check_path
from ._compat import split_module_param_name
from .data import to_device
from .pair import ModelGuidePair, batch_arguments
from .vae import VAE, VAEConfig

__all__ = ["CheckpointError", "Checkpoint", "RunFolder", "Run", "load_run", "load_checkpoint", "read_manifest",
           "FORMAT_VERSION", "MANIFEST", "CONFIG"]

#: version of the run-folder and checkpoint format written by this pyrovae
FORMAT_VERSION = 2
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d{6,}\.pt$")
_FILE_NAME = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TEMP_NAME = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?\.[A-Za-z0-9_.-]+\.tmp$")
MANIFEST = "manifest.json"
CONFIG = "config.json"


# ------------------------------------------------------------------ low-level file operations
def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` on disk (flushed) under a temporary name beside ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # e.g. Windows: directories cannot be opened
        pass


def json_bytes(obj) -> bytes:
    """``obj`` as the JSON text pyrovae writes (sorted keys, no NaN)."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


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
    path = check_path("run folder", run_dir)
    if not path.exists():
        raise CheckpointError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"run folder {path} is not a folder")
    return path


# ------------------------------------------------------------------ the checkpoint format
@dataclass
class Checkpoint:
    """One checkpoint: the whole training state, as tensors and plain values.

    :ivar int epoch: completed epochs.
    :ivar int step: steps done in the epoch after that (a mid-epoch checkpoint), else 0.
    :ivar int global_step: optimiser steps since the run began.
    :ivar dict params: trainable tensors by stable name (:mod:`pyrovae.pair`), on the CPU.
    :ivar dict buffers: module buffers by stable name, or None where the writer
        did not record them (format 1).
    :ivar dict optimizer: the optimiser's state dict, its tensors keyed by parameter name.
    :ivar dict scheduler: the LR scheduler's state dict, or None.
    :ivar list rng_ranks: every process's random state (:func:`pyrovae.rng.capture`).
    :ivar list history: one dict per completed epoch.
    :ivar dict best: best validation ELBO, its epoch, and epochs since it.
    :ivar perm: the batch order of the interrupted epoch (mid-epoch checkpoints).
    :ivar tuple partial: (loss sum, datapoints) of the interrupted epoch.
    :ivar dict fit: the training options (:class:`pyrovae.train.FitConfig` as a dict).
    :ivar dict data_state: the state of the data sources (samplers), by source name.
    :ivar example: the programs' arguments for one or two datapoints (a tensor, tuple
        or dict of tensors), so that :func:`load_run` can find a user's parameters by
        running the programs once.
    """

    epoch: int
    step: int
    global_step: int
    params: Dict[str, torch.Tensor]
    buffers: Optional[Dict[str, torch.Tensor]]
    optimizer: dict
    scheduler: Optional[dict]
    rng_ranks: List[dict]
    history: List[dict]
    best: dict
    perm: Optional[torch.Tensor] = None
    partial: Tuple[float, int] = (0.0, 0)
    fit: dict = field(default_factory=dict)
    data_state: dict = field(default_factory=dict)
    example: object = None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": "pyrovae-checkpoint", "version": FORMAT_VERSION, **asdict(self)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "Checkpoint":
        payload = _safe_torch_load(data, path)
        version = payload.pop("version")
        payload.pop("format")
        if version == 1:
            payload = _migrate_v1(payload)
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(payload)
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
        return cls(**{k: v for k, v in payload.items() if k in names})


def _stable_name(name: str) -> str:
    """Format 1 named pyro.module parameters ``param.<module>$$$<path>``."""
    if not name.startswith("param."):
        return name
    module, path = split_module_param_name(name[len("param."):])
    return name if module is None else f"param.{module}.{path}"


def _migrate_v1(payload: dict) -> dict:
    """Format 1 → 2: stable names, optimiser state by name, buffers unknown, rng of every rank."""
    old_names = list(payload["params"])
    payload["params"] = {_stable_name(k): v for k, v in payload["params"].items()}
    names = [_stable_name(k) for k in old_names]
    opt = payload.get("optimizer") or {"state": {}, "param_groups": []}
    payload["optimizer"] = {
        "state": {names[int(i)]: s for i, s in opt["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in opt["param_groups"]],
    }
    payload["buffers"] = None
    payload["rng_ranks"] = payload.get("rng_ranks") or [payload["rng"]]
    payload["fit"] = payload.pop("config", {})
    return payload


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


# ------------------------------------------------------------------ the manifest
def _check_entry(path: Path, key: str, entry) -> None:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("file"), str)
        or not _CHECKPOINT_NAME.match(entry["file"])
        or not isinstance(entry.get("sha256"), str)
    ):
        raise CheckpointError(f"{path}: entry {key!r} is malformed or names a file outside the run folder: {entry!r}")


def read_manifest(run_dir) -> dict:
    """Read and validate ``manifest.json`` of a run folder.

    Checkpoint names in it must be plain ``checkpoint-NNNNNN.pt`` and other
    file names plain names at most one folder down: a manifest cannot point
    outside its folder.
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
        if manifest.get(key) is not None or (key == "latest" and version == 1):
            _check_entry(path, key, manifest.get(key))
    files = manifest.get("files", {})
    if version == 1 and "config_sha256" in manifest:
        files = {CONFIG: manifest["config_sha256"]}
    if not isinstance(files, dict) or not all(isinstance(k, str) and _FILE_NAME.match(k) and ".." not in k
                                              and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{path}: 'files' is malformed or names a file outside the run folder")
    pending = manifest.get("pending", {})
    if not isinstance(pending, dict) or not all(
            isinstance(k, str) and k in files and isinstance(v, str) and _TEMP_NAME.match(v) and ".." not in v
            and v.rpartition("/")[0] == k.rpartition("/")[0] for k, v in pending.items()):
        raise CheckpointError(f"{path}: 'pending' is malformed or names a file outside the run folder")
    manifest["files"] = files
    return manifest


class RunFolder:
    """A run folder: every write commits through the manifest; every read is checked.

    :param path: the folder.

    >>> import tempfile
    >>> run = RunFolder(tempfile.mkdtemp())
    >>> run.commit(files={"config.json": json_bytes({"a": 1})})
    >>> run.read_json("config.json")
    {'a': 1}
    """

    def __init__(self, path):
        self.path = check_path("run folder", path)

    def exists(self) -> bool:
        """True once a manifest has been committed."""
        return (self.path / MANIFEST).exists()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def manifest(self) -> dict:
        """The manifest, after finishing a commit that a killed process left half done."""
        manifest = read_manifest(self.path)
        if manifest.get("pending"):
            self._publish(manifest)
        return manifest

    def _publish(self, manifest: dict) -> None:
        """Rename a commit's files into place, then drop the list of pending renames from the manifest."""
        for name, tmp in manifest["pending"].items():
            try:
                os.replace(self.path / tmp, self.path / name)
            except FileNotFoundError:  # renamed already, by the writer or an earlier reader
                pass
        for folder in {(self.path / name).parent for name in manifest["pending"]}:
            _fsync_dir(folder)
        manifest.pop("pending")
        _atomic_write(self.path / MANIFEST, json_bytes(manifest))

    # ---------------------------------------------------------- writing
    def commit(self, *, checkpoint: Optional[Checkpoint] = None, is_best: bool = False,
               files: Optional[Dict[str, bytes]] = None, remove: Tuple[str, ...] = ()) -> Optional[Path]:
        """Write ``files`` (name → bytes) and ``checkpoint``, then publish them in a new manifest.

        :param Checkpoint checkpoint: a new latest checkpoint (``is_best``: also the best).
        :param dict files: files to write or replace, by name relative to the folder.
        :param remove: files the new manifest no longer names; deleted after it is written.
        :returns: the new checkpoint's path, or None.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.manifest() if self.exists() else {"seq": 0, "latest": None, "best": None, "files": {}}
        manifest = {"format": "pyrovae-run", "version": FORMAT_VERSION, "seq": old.get("seq", 0),
                    "latest": old.get("latest"), "best": old.get("best"),
                    "files": {k: v for k, v in old["files"].items() if k not in remove}}
        # The files go to disk under temporary names first. The manifest that names them and
        # lists the renames still to do is the commit point: a kill before it leaves the old
        # manifest and the old files; a kill after it is finished by the next reader (manifest()).
        pending = {}
        for name, data in (files or {}).items():
            if not _FILE_NAME.match(name) or ".." in name:
                raise ValueError(f"file name {name!r} must be a plain name, at most one folder down")
            (self.path / name).parent.mkdir(exist_ok=True)
            tmp = _write_temporary(self.path / name, data)
            pending[name] = (Path(name).parent / tmp.name).as_posix()
            manifest["files"][name] = _sha256(data)
        written = None
        if checkpoint is not None:
            written = self._write_checkpoint(checkpoint, manifest, is_best)
        if pending:
            manifest["pending"] = pending
        _atomic_write(self.path / MANIFEST, json_bytes(manifest))
        if pending:
            self._publish(manifest)
        self._clean(manifest, remove)
        return written

    def _write_checkpoint(self, checkpoint: Checkpoint, manifest: dict, is_best: bool) -> Path:
        data = checkpoint.to_bytes()
        # A fresh sequence number per write: a new checkpoint never overwrites a file
        # that the current manifest names, even when a restarted run repeats an epoch.
        seq = int(manifest["seq"]) + 1
        while (self.path / f"checkpoint-{seq:06d}.pt").exists():
            seq += 1
        name = f"checkpoint-{seq:06d}.pt"
        _atomic_write(self.path / name, data)
        entry = {"file": name, "sha256": _sha256(data), "epoch": checkpoint.epoch, "step": checkpoint.step}
        manifest.update(seq=seq, latest=entry, best=entry if is_best else manifest["best"])
        return self.path / name

    def _clean(self, manifest: dict, remove) -> None:
        keep = {(manifest["latest"] or {}).get("file"), (manifest["best"] or {}).get("file")}
        for f in self.path.glob("checkpoint-*.pt"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
        for name in remove:
            if name not in manifest["files"]:
                (self.path / name).unlink(missing_ok=True)
        for f in [*self.path.glob(".*.tmp"), *self.path.glob("*/.*.tmp")]:
            f.unlink(missing_ok=True)

    # ---------------------------------------------------------- reading
    def read_bytes(self, name: str) -> bytes:
        """A file the manifest names, checked against its SHA-256."""
        manifest = self.manifest()
        expected = manifest["files"].get(name)
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        if expected is not None and _sha256(data) != expected:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded in {self.path / MANIFEST}: "
                                  "it was modified after it was written")
        return data

    def read_json(self, name: str):
        try:
            obj = json.loads(self.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path / name} is not valid JSON: {e}") from None
        return obj

    def config(self) -> dict:
        """``config.json``, checked against the manifest."""
        config = self.read_json(CONFIG)
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path / CONFIG} must hold a JSON object")
        return config

    def checkpoint_entry(self, which: str = "latest") -> dict:
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        manifest = self.manifest()
        entry = manifest.get(which) or manifest.get("latest")
        if entry is None:
            raise CheckpointError(f"run folder {self.path} holds no checkpoint yet (it stopped before the first one)")
        return entry

    def load_checkpoint(self, which: str = "latest") -> Checkpoint:
        """The ``"latest"`` or ``"best"`` checkpoint, checked against its SHA-256 and loaded safely."""
        entry = self.checkpoint_entry(which)
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} named by {self.path / MANIFEST} is missing") from None
        if _sha256(data) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} does not match the SHA-256 recorded in {self.path / MANIFEST}: "
                "it was modified or corrupted after it was written"
            )
        return Checkpoint.from_bytes(data, path)


def load_checkpoint(run_dir, which: str = "latest") -> Checkpoint:
    """The ``"latest"`` or ``"best"`` :class:`Checkpoint` of a run folder, loaded safely."""
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    return RunFolder(_check_run_dir(run_dir)).load_checkpoint(which)


# ------------------------------------------------------------------ reloading a run
@dataclass(frozen=True)
class Run:
    """A reloaded run folder.

    :ivar path: the folder.
    :ivar config: the parsed ``config.json``.
    :ivar vae: the :class:`~pyrovae.VAE` with trained weights (on the CPU) when
        the run trained one, else None.
    :ivar model: the model program, its parameters restored (``vae.model``, or the one passed in).
    :ivar guide: the guide program, its parameters restored.
    :ivar checkpoint: the loaded :class:`Checkpoint`.
    :ivar history: per-epoch metrics.
    """

    path: Path
    config: dict
    vae: Optional[torch.nn.Module]
    model: object
    guide: object
    checkpoint: Checkpoint
    history: list


def _build_vae(run_dir: Path, description: dict) -> VAE:
    try:
        with torch.device("cpu"):  # a reloaded run lives on the CPU, whatever the default device
            return VAE(config=VAEConfig(**description["config"]))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{run_dir / CONFIG}: invalid VAE config: {e}") from None


def load_run(path, *, model=None, guide=None, which: str = "latest") -> Run:
    """Reload a run folder written by :func:`pyrovae.fit` or ``pyrovae train``.

    A run of the built-in :class:`~pyrovae.VAE` is rebuilt from ``config.json``.
    For a pair of your own, pass the same ``model`` and ``guide`` (freshly
    built): they are run once on the datapoints the checkpoint keeps as an
    example, to find their parameters, and every parameter and buffer is then
    restored in place. A checkpoint that lacks any of them, or has extra ones,
    is refused.

    :param path: the run folder.
    :param model: the model program of a custom pair (None for a VAE run).
    :param guide: the guide program of a custom pair.
    :param str which: ``"latest"`` or ``"best"`` checkpoint.
    :returns: :class:`Run`.
    """
    folder = RunFolder(_check_run_dir(path))
    config = folder.config()
    state = folder.load_checkpoint(which)
    description = config.get("pair") or config.get("model") or {}
    vae = None
    if (model is None) != (guide is None):
        raise TypeError("pass both model= and guide=, or neither")
    if model is None:
        if description.get("type") != "VAE":
            raise CheckpointError(
                f"{folder.path} trained a custom model/guide pair ({description.get('model', '?')}); "
                "reload it with load_run(path, model=..., guide=...)"
            )
        vae = _build_vae(folder.path, description)
        model, guide = vae.model, vae.guide
    if state.example is None:
        raise CheckpointError(f"checkpoint in {folder.path} keeps no example batch to find the parameters with")
    pair = ModelGuidePair(model, guide)
    # A pair of the user's is run where its networks were built: on the default device.
    example = state.example if vae is not None else to_device(state.example, torch.get_default_device())
    args, kwargs = batch_arguments(example)
    # The built-in VAE keeps every parameter in its modules: find them in a scratch param store,
    # so that reloading never collides with a VAE of the same name registered in this process.
    with (pyro.get_param_store().scope() if vae is not None else contextlib.nullcontext()):
        pair.discover(*args, **kwargs)
    pair.load_state(state.params, state.buffers, source=f"checkpoint in {folder.path}")
    return Run(path=folder.path, config=config, vae=vae, model=model, guide=guide, checkpoint=state,
               history=list(state.history))
