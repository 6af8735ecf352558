"""Device handling that CPU CI can check: one resolver, and code that follows its inputs.

On a GPU the suite runs with ``torch.set_default_device("cuda")``; library code
that created a tensor on the default device instead of its inputs' device, or
paired a CPU generator with it, crashed there. Here the default device is set to
``meta``, a device without data: any tensor the library creates on the default
device instead of following its inputs makes the run fail on the CPU as well.
"""

import pyro
import pytest
import torch

import pyrovae
from pyrovae import distributed
from pyrovae.distributed import check_device, resolve_device

from .common import default_device


@pytest.fixture
def foreign_default_device():
    with default_device("meta"):
        yield


def test_the_default_device_a_test_changes_is_put_back_as_it_was():
    """Not reset to the CPU: under PYROVAE_DEVICE=cuda that moved later tests off the GPU."""
    suite_default = torch.get_default_device()
    with default_device("meta"):
        with default_device("cpu"):
            assert torch.get_default_device().type == "cpu"
        assert torch.get_default_device().type == "meta"
    assert torch.get_default_device() == suite_default


def test_resolver_gives_indexed_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # equal to a parameter's device cuda:0
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_resolver_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", 0, None, "CPU"):
        with pytest.raises(ValueError, match="device must be"):
            check_device(bad)


def test_fit_and_load_run_follow_their_inputs_not_the_default_device(tmp_path, foreign_default_device):
    with torch.device("cpu"):
        splits = pyrovae.load_dataset("digits", binarize="static", subset=64)
        vae = pyrovae.VAE(splits.event_shape, latent_dim=2, hidden=(16,))
    result = pyrovae.fit(vae.model, vae.guide, splits, epochs=2, batch_size=16, progress=False, device="cpu",
                         run_dir=tmp_path)
    assert result.history[-1]["train_elbo"] < 0
    run = pyrovae.load_run(tmp_path)
    assert {p.device.type for p in run.vae.parameters()} == {"cpu"} and run.vae.prior_loc.device.type == "cpu"


def test_datasets_load_on_the_cpu_under_any_default_device(foreign_default_device):
    splits = pyrovae.load_dataset("digits", binarize="static", subset=16)
    assert {t.device.type for t in (splits.train, splits.val, splits.test, splits.train_labels)} == {"cpu"}


def test_the_process_group_device_is_the_resolved_one():
    assert distributed.setup("cpu").device == torch.device("cpu")


def test_log_marginal_and_export_follow_the_data_not_the_default_device(foreign_default_device):
    """Pyro's plates and the particle plate create tensors on the default device: they must follow the data."""
    with torch.device("cpu"):
        vae = pyrovae.VAE((6,), latent_dim=2, hidden=(8,))
        x = torch.bernoulli(torch.full((5, 6), 0.3))
    est = pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=40, chunk_size=16)
    assert est.log_marginal.device.type == "cpu" and torch.isfinite(est.log_marginal).all()
    assert est.khat.device.type == "cpu" and est.khat.numpy().shape == (5,)
    idata = pyrovae.diagnostics.to_inference_data(vae.model, vae.guide, x, num_samples=8, num_chains=2)
    assert idata.sample_stats["khat"].shape == (5,)


def test_a_network_on_another_device_than_the_data_is_refused_with_advice(tmp_path):
    """A closure network fit cannot move, on another device than the data: say what to move."""
    with torch.device("meta"):
        encoder = torch.nn.Linear(6, 4)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Normal(z.sum(-1, keepdim=True).expand(-1, 6), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, raw = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(loc, raw.exp()).to_event(1))

    x = torch.randn(8, 6, device="cpu")
    with pytest.raises(ValueError, match=r"(?s)mix devices: the data are on cpu.*module.to\(device\)"):
        pyrovae.fit(model, guide, x, epochs=1, progress=False, device="cpu")
