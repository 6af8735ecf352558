"""A user's DataLoader streams through fit, and a resumed run continues it bitwise."""

import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyrovae import distributed, fit
from pyrovae.data import LoaderBatches
from pyrovae.train import _check_loader_sampler

from .common import DEVICE, load_example, seeded_data


def _conditional_pair():
    """Pyro's conditional-VAE shape in miniature: model(xs, ys) with ys observed."""
    net = torch.nn.Linear(3, 1)
    enc = torch.nn.Linear(4, 2)

    def model(xs, ys):
        pyro.module("net", net)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(()), 1.0))
            pyro.sample("ys", dist.Normal(net(xs).squeeze(-1) + z, 0.5), obs=ys)

    def guide(xs, ys):
        pyro.module("enc", enc)
        loc, raw = enc(torch.cat([xs, ys.unsqueeze(-1)], -1)).unbind(-1)
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3))

    return model, guide


@seeded_data
def _dataset(n=60):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 3, generator=g)
    return TensorDataset(xs, xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(n, generator=g))


def _run(run_dir, *, stop_at_call=None, resume=False, workers=0):
    pyro.clear_param_store()
    torch.manual_seed(1)
    model, guide = _conditional_pair()
    calls = {"n": 0}

    def interrupted(xs, ys):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps
        return model(xs, ys)

    loader = DataLoader(_dataset(), batch_size=16, shuffle=True, num_workers=workers)
    return fit(interrupted, guide, loader, val_data=DataLoader(_dataset(20), batch_size=8), epochs=4, lr=0.02,
               progress=False, device=DEVICE, seed=2, run_dir=None if resume else run_dir,
               resume=run_dir if resume else None)


def test_a_dataloader_of_tuples_trains_a_conditional_pair():
    """A DataLoader used to be refused."""
    r = _run(None)
    assert len(r.history) == 4 and r.val_elbo[-1] > r.val_elbo[0], r.val_elbo
    assert {"param.net.weight", "param.enc.weight"} <= set(r.params)


def test_a_streamed_run_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full")
    # calls: 1 set-up, then per epoch 4 training steps; call 7 is epoch 2, step 2
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        _run(tmp_path / "part", stop_at_call=7)
    resumed = _run(tmp_path / "part", resume=True)
    for name in full.params:
        assert torch.equal(full.params[name], resumed.params[name]), name
    assert full.train_elbo == resumed.train_elbo


@pytest.mark.skipif(DEVICE != "cpu", reason="forked DataLoader workers cannot use CUDA, which the suite makes the "
                    "default device; with workers, leave the default device on the CPU")
def test_loader_workers_give_the_same_run():
    a, b = _run(None), _run(None, workers=2)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


def test_under_torchrun_a_loader_needs_a_distributed_sampler():
    group = distributed.Group(rank=0, world_size=2, device=torch.device("cpu"))
    data = LoaderBatches(DataLoader(_dataset(), batch_size=16, shuffle=True), "data")
    with pytest.raises(ValueError, match=r"sampler=DistributedSampler\(dataset"):
        _check_loader_sampler(data, group)
    sampler = DistributedSampler(_dataset(), num_replicas=2, rank=0, drop_last=True)
    _check_loader_sampler(LoaderBatches(DataLoader(_dataset(), batch_size=16, sampler=sampler), "data"), group)


def test_an_iterable_loader_without_length_is_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (torch.zeros(3) for _ in range(4))

    with pytest.raises(TypeError, match="no length"):
        model, guide = load_example("custom_model_guide").make_pair(3, 2)
        fit(model, guide, DataLoader(Stream(), batch_size=2), epochs=1, progress=False, device=DEVICE)
