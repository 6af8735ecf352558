"""CUDA end to end; skipped without a GPU. Run the whole suite on a GPU with PYROVAE_DEVICE=cuda."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from pyrovae import VAE, fit, load_run, log_marginal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_fit_and_log_marginal_on_cuda(tmp_path):
    x = torch.bernoulli(torch.full((64, 1, 4, 4), 0.3))
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(16,))
    result = fit(vae.model, vae.guide, x, epochs=2, batch_size=16, device="cuda", progress=False, run_dir=tmp_path)
    assert result.device.startswith("cuda") and all(p.is_cuda for p in vae.parameters())
    est = log_marginal(vae.model, vae.guide, x.cuda(), num_particles=100)
    assert est.log_marginal.is_cuda and torch.isfinite(est.log_marginal).all()
    run = load_run(tmp_path)  # loads onto the CPU; the user moves it
    assert not next(run.vae.parameters()).is_cuda


def _fit_copies(options):
    """Two copies of one VAE trained 3 epochs on CUDA, with ``options(False)`` and ``options(True)``."""
    x = torch.bernoulli(torch.full((80, 12), 0.3))
    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,))
    results = {}
    for mode in (False, True):
        vae = VAE(config=dataclasses.replace(template.config, name=f"cuda{mode}"))
        vae.load_state_dict(template.state_dict())
        results[mode] = fit(vae.model, vae.guide, x, epochs=3, batch_size=32, device="cuda", progress=False,
                            **options(mode))
    return results


def test_static_graph_on_cuda_equals_eager():
    """Recorded steps on CUDA: the CUDA generator is saved and restored like the CPU one."""
    results = _fit_copies(lambda mode: dict(static_graph=mode, cuda_graph=False))
    assert results[True].static_graph, results[True].static_graph_off
    for name, p in results[False].params.items():
        assert p.is_cuda and torch.equal(p, results[True].params[name]), name


def test_cuda_graph_steps_match_static_steps():
    """Replayed as CUDA graphs (the default on CUDA): checked bitwise against the same step run eagerly on
    the first batch of each shape. Against a run without graphs, the optimiser differs only in how Adam
    computes its bias correction (on the device, capturable=True): equal to 1e-5 after 3 epochs."""
    results = _fit_copies(lambda mode: dict(static_graph=True, cuda_graph=mode))
    on = results[True]
    assert on.cuda_graph and on.cuda_graph_off is None, on.cuda_graph_off
    for name, p in results[False].params.items():
        torch.testing.assert_close(on.params[name], p, rtol=0, atol=1e-5)
    assert on.train_elbo == pytest.approx(results[False].train_elbo, abs=1e-4)


def test_cli_trains_on_cuda_and_the_run_loads_on_a_machine_without_cuda(tmp_path):
    from pyrovae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--epochs", "2", "--eval-particles", "10", "--subset", "64",
                 "--hidden", "16", "--latent-dim", "2", "--no-progress", "--device", "cuda"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["device"] == "cuda"
    code = ("import pyrovae, torch; assert not torch.cuda.is_available(); r = pyrovae.load_run(%r); "
            "x = torch.bernoulli(torch.full((4, *r.vae.config.event_shape), 0.3)); "
            "print(float(pyrovae.log_marginal(r.vae.model, r.vae.guide, x, num_particles=20).log_marginal.mean()))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code % str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 0
