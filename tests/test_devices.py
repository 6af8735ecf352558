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


@pytest.fixture
def foreign_default_device():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


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
