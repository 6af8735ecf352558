"""CUDA end to end; skipped without a GPU. Run the whole suite on a GPU with PYROVAE_DEVICE=cuda."""

import dataclasses

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


def test_static_graph_on_cuda_equals_eager():
    """Recorded steps on CUDA: the CUDA generator is saved and restored like the CPU one."""
    x = torch.bernoulli(torch.full((80, 12), 0.3))
    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,))
    results = {}
    for mode in (False, True):
        vae = VAE(config=dataclasses.replace(template.config, name=f"cuda{mode}"))
        vae.load_state_dict(template.state_dict())
        results[mode] = fit(vae.model, vae.guide, x, epochs=3, batch_size=32, device="cuda", progress=False,
                            static_graph=mode)
    assert results[True].static_graph, results[True].static_graph_off
    for name, p in results[False].params.items():
        assert p.is_cuda and torch.equal(p, results[True].params[name]), name
