import json
import os
import pickle

import pytest
import torch

from pyrovae import VAE, CheckpointError, fit, load_run
from pyrovae.runs import MANIFEST

from .common import DEVICE


@pytest.fixture
def run_dir(tmp_path):
    vae = VAE((4,), latent_dim=2, hidden=(8,))
    fit(vae.model, vae.guide, torch.bernoulli(torch.full((16, 4), 0.5)), epochs=2, batch_size=8,
        progress=False, device=DEVICE, run_dir=tmp_path)
    return tmp_path


def _checkpoint(run_dir):
    return run_dir / json.loads((run_dir / MANIFEST).read_text())["latest"]["file"]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(run_dir, tmp_path_factory):
    marker = tmp_path_factory.mktemp("m") / "pwned"
    payload = _Payload()
    payload.marker = marker
    ckpt = _checkpoint(run_dir)
    data = pickle.dumps({"format": "pyrovae-checkpoint", "version": 1, "x": payload})
    torch.save({"format": "pyrovae-checkpoint", "version": 1, "evil": payload}, ckpt)
    # make the checksum agree so that only weights_only stands in the way
    import hashlib
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["latest"]["sha256"] = manifest["best"]["sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"refused to unpickle"):
        load_run(run_dir)
    assert not marker.exists(), "the payload ran"
    assert data  # the payload really is a pickle that would run os.system


def test_truncated_checkpoint(run_dir):
    ckpt = _checkpoint(run_dir)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{ckpt.name} does not match the SHA-256"):
        load_run(run_dir)


def test_tampered_config(run_dir):
    cfg = run_dir / "config.json"
    cfg.write_text(cfg.read_text().replace('"latent_dim": 2', '"latent_dim": 3'))
    with pytest.raises(CheckpointError, match="config.json does not match the SHA-256"):
        load_run(run_dir)


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "checkpoint-000001.pt/../../x"])
def test_manifest_cannot_point_outside(run_dir, name):
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["latest"]["file"] = name
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the run folder"):
        load_run(run_dir)


def test_wrong_version_and_missing(run_dir, tmp_path):
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["version"] = 99
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_run(run_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nope")
    (run_dir / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_run(run_dir)


def test_rotation_keeps_latest_and_best(tmp_path):
    vae = VAE((4,), latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((16, 4), 0.5))
    fit(vae.model, vae.guide, x, val_data=x, epochs=6, batch_size=8, progress=False, device=DEVICE, run_dir=tmp_path)
    ckpts = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(ckpts) == {manifest["latest"]["file"], manifest["best"]["file"]} and len(ckpts) <= 2
    assert not list(tmp_path.glob(".*.tmp"))


def _rewrite(run_dir, data: bytes):
    """Replace the latest checkpoint and make the manifest's checksum agree with it."""
    import hashlib

    ckpt = _checkpoint(run_dir)
    ckpt.write_bytes(data)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    for key in ("latest", "best"):
        if manifest.get(key) and manifest[key]["file"] == ckpt.name:
            manifest[key]["sha256"] = hashlib.sha256(data).hexdigest()
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    return ckpt


def test_truncated_checkpoint_with_matching_checksum(run_dir):
    ckpt = _rewrite(run_dir, _checkpoint(run_dir).read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"checkpoint .*{ckpt.name} is truncated or corrupt"):
        load_run(run_dir)


def test_wrong_checkpoint_version(run_dir):
    import io

    buf = io.BytesIO()
    torch.save({"format": "pyrovae-checkpoint", "version": 99, "params": {}}, buf)
    ckpt = _rewrite(run_dir, buf.getvalue())
    with pytest.raises(CheckpointError, match=f"{ckpt.name} has format version 99"):
        load_run(run_dir)
