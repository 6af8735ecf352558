"""Run folders survive every command, as a new user runs them (issue: "run folders that no resume can break")."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import CheckpointError, NonFiniteLossError, distributed, fit, load_run
from pyrovae.cli import main
from pyrovae.job import DataConfig
from pyrovae.runs import MANIFEST, RunFolder, load_checkpoint
from pyrovae.train import Trainer

from .common import DEVICE, load_example, seeded_data

TINY = ["--epochs", "3", "--eval-particles", "0", "--subset", "64", "--hidden", "16", "--latent-dim", "2",
        "--no-progress", "--device", "cpu"]


def _readable(run: Path):
    """Every command that reads a run folder works on it."""
    assert main(["evaluate", str(run), "--num-particles", "5", "--limit", "4", "--device", "cpu"]) == 0
    assert main(["sample", str(run), "--num", "4", "--device", "cpu"]) == 0
    RunFolder(run).config()  # checksum agrees with the manifest
    load_run(run)


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


# 1 ---------------------------------------------------------------------------------------------
def test_resume_with_fewer_epochs_is_refused_and_the_folder_stays_readable(run, capsys):
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
    assert "fewer than the 3 epochs" in capsys.readouterr().err
    _readable(run)


def test_resume_with_a_new_lr_keeps_the_folder_readable(run):
    assert main(["train", "--resume", str(run), "--epochs", "4", "--lr", "0.0005", "--no-progress"]) == 0
    _readable(run)
    assert RunFolder(run).config()["fit"]["lr"] == 0.0005
    assert load_checkpoint(run).epoch == 4


# 2 ---------------------------------------------------------------------------------------------
def _ppca_pair():
    return load_example("custom_model_guide").make_pair(6, 2)


@seeded_data
def _toy(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) @ torch.randn(2, 6, generator=g)


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_a_diverged_resume_leaves_a_readable_folder_and_its_advice_works(tmp_path):
    model, guide = _ppca_pair()
    fit(model, guide, _toy(), epochs=2, batch_size=32, progress=False, device=DEVICE, run_dir=tmp_path)
    pyro.clear_param_store()
    model, guide = _ppca_pair()
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        return model(x * float("nan") if calls["n"] > 2 else x)

    with pytest.raises(NonFiniteLossError, match="resume with a lower learning rate"):
        with pyro.validation_enabled(False):
            fit(poisoned, guide, _toy(), epochs=4, batch_size=32, lr=0.01, progress=False, device=DEVICE,
                resume=tmp_path)
    RunFolder(tmp_path).config()  # still matches its checksum
    pyro.clear_param_store()
    model, guide = _ppca_pair()
    r = fit(model, guide, _toy(), epochs=4, batch_size=32, lr=1e-4, progress=False, device=DEVICE, resume=tmp_path)
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]


# 3 ---------------------------------------------------------------------------------------------
def test_resume_with_another_run_dir_is_refused(run, tmp_path, capsys):
    assert main(["train", "--resume", str(run), "--run-dir", str(tmp_path / "other"), "--epochs", "4"]) == 2
    assert "differ" in capsys.readouterr().err and not (tmp_path / "other").exists()


# 4 ---------------------------------------------------------------------------------------------
def test_data_locations_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("x.npy", (rng.random((60, 1, 4, 4)) < 0.5).astype(np.float32))
    assert main(["train", "--dataset", "x.npy", "--run-dir", "run", *TINY]) == 0
    assert DataConfig(data_dir="here").data_dir == str(tmp_path / "here")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _readable(tmp_path / "run")


# 5 ---------------------------------------------------------------------------------------------
def test_commands_never_overwrite_training_outputs(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY[:2], "--eval-particles", "5", *TINY[4:]]) == 0
    report = json.loads((run / "report.json").read_text())
    assert "khat.png" in report["pictures"] and report["checkpoint"]["epoch"] == 3
    before = {p.name: p.read_bytes() for p in run.glob("*.png")}
    assert main(["evaluate", str(run), "--num-particles", "5", "--limit", "4", "--device", "cpu"]) == 0
    assert main(["sample", str(run), "--num", "4", "--seed", "3", "--device", "cpu"]) == 0
    assert main(["reconstruct", str(run), "--num", "4", "--device", "cpu"]) == 0
    assert {p.name: p.read_bytes() for p in run.glob("*.png")} == before
    assert (run / "sample" / "samples.png").exists() and (run / "reconstruct" / "reconstructions.png").exists()
    evaluation = json.loads((run / "evaluate" / "evaluation.json").read_text())
    assert evaluation["checkpoint"]["epoch"] == 3
    assert main(["sample", str(run), "--out", str(run / "samples.png")]) == 2  # a training picture
    # a resume moves the checkpoint on: the old evaluation goes, it no longer describes the run
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    assert not (run / "evaluate" / "evaluation.json").exists()
    assert "evaluate/evaluation.json" not in json.loads((run / MANIFEST).read_text())["files"]


def test_fit_refuses_a_folder_that_holds_a_run(run):
    model, guide = _ppca_pair()
    with pytest.raises(ValueError, match="already holds files; pass resume="):
        fit(model, guide, _toy(), epochs=1, progress=False, device=DEVICE, run_dir=run)


# 6 ---------------------------------------------------------------------------------------------
def _bn_pair():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                  torch.nn.Linear(8, 4))
    decoder = torch.nn.Linear(2, 6)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, raw = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))

    return model, guide, encoder


def _fit_bn(run_dir, epochs, resume=False):
    pyro.clear_param_store()
    model, guide, encoder = _bn_pair()
    fit(model, guide, _toy(), val_data=_toy(16), epochs=epochs, batch_size=16, progress=False, device=DEVICE,
        **({"resume": run_dir} if resume else {"run_dir": run_dir}))
    return encoder


def test_batchnorm_pair_resumes_bitwise_running_statistics_included(tmp_path):
    straight = _fit_bn(tmp_path / "a", 4)
    _fit_bn(tmp_path / "b", 2)
    resumed = _fit_bn(tmp_path / "b", 4, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(resumed[1].num_batches_tracked) == 4 * 4  # 4 epochs x 4 batches: validation did not count
    saved = load_checkpoint(tmp_path / "b").buffers
    assert torch.equal(saved["buffer.param.encoder.1.running_mean"], resumed[1].running_mean.cpu())


def test_load_run_restores_a_users_pair_and_refuses_a_missing_buffer(tmp_path):
    trained = _fit_bn(tmp_path, 2)
    pyro.clear_param_store()
    model, guide, encoder = _bn_pair()
    run = load_run(tmp_path, model=model, guide=guide)
    for (name, a), b in zip(trained.state_dict().items(), encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert run.model is model
    # a checkpoint without one of the buffers
    folder = RunFolder(tmp_path)
    ckpt = folder.load_checkpoint()
    del ckpt.buffers["buffer.param.encoder.1.running_var"]
    folder.commit(checkpoint=ckpt)
    pyro.clear_param_store()
    model, guide, _ = _bn_pair()
    with pytest.raises(CheckpointError, match=r"buffers missing \['buffer.param.encoder.1.running_var'\]"):
        load_run(tmp_path, model=model, guide=guide)


def test_load_run_of_a_custom_pair_without_programs_says_how(tmp_path):
    _fit_bn(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"load_run\(path, model=..., guide=...\)"):
        load_run(tmp_path)


def test_validation_runs_in_eval_mode_and_restores_the_mode():
    pyro.clear_param_store()
    model, guide, encoder = _bn_pair()
    from pyrovae.data import TensorBatches
    from pyrovae.pair import ModelGuidePair
    from pyrovae.train import FitConfig
    from pyro.infer import Trace_ELBO

    group = distributed.setup(DEVICE)
    trainer = Trainer(ModelGuidePair(model, guide), Trace_ELBO(), FitConfig(batch_size=8, progress=False,
                      device=DEVICE), TensorBatches(_toy(), "data"), TensorBatches(_toy(16), "val_data"),
                      group=group, folder=None)
    stats = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert trainer.validate() is not None
    assert encoder.training and encoder[1].training
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, stats[k]), k


# 7 ---------------------------------------------------------------------------------------------
def test_a_changed_batch_size_on_resume_is_refused(run, capsys):
    assert main(["train", "--resume", str(run), "--epochs", "4", "--batch-size", "7"]) == 2
    assert "batch_size" in capsys.readouterr().err
    model, guide = _ppca_pair()
    with pytest.raises(ValueError, match=r"cannot change: batch_size \(32 -> 16\)"):
        folder = Path(run).parent / "api"
        fit(model, guide, _toy(), epochs=1, batch_size=32, progress=False, device=DEVICE, run_dir=folder)
        pyro.clear_param_store()
        model, guide = _ppca_pair()
        fit(model, guide, _toy(), epochs=2, batch_size=16, progress=False, device=DEVICE, resume=folder)


# 8 ---------------------------------------------------------------------------------------------
class _RecordingGroup(distributed.Group):
    closed = 0

    def close(self):
        _RecordingGroup.closed += 1


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_the_process_group_is_closed_on_error_paths(monkeypatch):
    monkeypatch.setattr(distributed, "setup", lambda device: _RecordingGroup(device=distributed.resolve_device(device)))
    model, guide = _ppca_pair()
    with pytest.raises(NonFiniteLossError), pyro.validation_enabled(False):
        fit(lambda x: model(x * float("nan")), guide, _toy(), epochs=1, progress=False, device=DEVICE)
    assert _RecordingGroup.closed == 1
    with pytest.raises(ValueError, match="patience"):
        fit(model, guide, _toy(), epochs=1, progress=False, device=DEVICE, patience=2)  # refused before setup
    assert _RecordingGroup.closed == 1

    def broken(x):  # fails inside the trainer's set-up, after the group exists
        raise ValueError("the model is broken")

    with pytest.raises(ValueError, match="the model is broken"):
        fit(broken, guide, _toy(), epochs=1, progress=False, device=DEVICE)
    assert _RecordingGroup.closed == 2


# 9 ---------------------------------------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    run = tmp_path / "run"
    worker = Path(__file__).with_name("pause_worker.py")
    env = {**os.environ, "PYROVAE_TEST_PAUSE": "step:1"}
    p = subprocess.Popen([sys.executable, str(worker), "train", "--run-dir", str(run), *TINY],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:
            if line.startswith("PAUSED"):
                break
        p.send_signal(signal.SIGKILL)
    finally:
        p.communicate(timeout=60)
    assert json.loads((run / MANIFEST).read_text())["latest"] is None  # config committed, no checkpoint
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert load_checkpoint(run).epoch == 3
    _readable(run)


def test_resume_of_an_empty_folder_says_what_to_do(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert f"pyrovae train --run-dir {tmp_path / 'empty'}" in capsys.readouterr().err


def test_a_checkpoint_keeps_its_example_rows_not_the_training_set(tmp_path):
    """The example datapoints were saved as a view: torch.save wrote the whole training set into
    every checkpoint (190 MB for MNIST)."""
    model, guide = _ppca_pair()
    x = torch.randn(5000, 6)
    fit(model, guide, x, epochs=1, batch_size=1000, progress=False, device=DEVICE, run_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.example.shape == (2, 6)
    assert ckpt.example.untyped_storage().nbytes() == 2 * 6 * 4
    assert max(p.stat().st_size for p in tmp_path.glob("checkpoint-*.pt")) < 5000 * 6 * 4 // 2
