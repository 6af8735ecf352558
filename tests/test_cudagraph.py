"""The CUDA-graph path's logic, checked on the CPU.

A CUDA graph cannot be captured without a GPU, so here the capture is replaced
by a stand-in that replays the captured step's body (the recorded graph, the
gradient hand-over, the device-side sums and the optimiser update) eagerly.
Everything else runs as on a GPU: when graphs are planned, the check of the
first step of each shape, the loss read once per epoch, and the undoing of an
epoch whose loss became non-finite. ``tests/test_cuda.py`` runs the real thing.
"""

import dataclasses

import pytest
import torch

from pyrovae import VAE, cudagraph, fit
from pyrovae.train import NonFiniteLossError

from .common import DEVICE


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replay runs the captured body."""

    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the real CUDA graphs run in tests/test_cuda.py")

    def capture(self, x):
        self.static_x = x.detach().clone()
        self.cuda_graph = _EagerGraph(lambda: self._eager(self.static_x))

    monkeypatch.setattr(cudagraph.GraphedStep, "_capture", capture)
    monkeypatch.setattr(cudagraph, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(cudagraph, "make_capturable", lambda opt, on: None)  # CPU Adam is not capturable
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def _vae(template, name):
    vae = VAE(config=dataclasses.replace(template.config, name=name))
    vae.load_state_dict(template.state_dict())
    return vae


def _data(n=90, d=12):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(0))


def test_graphed_steps_equal_static_steps_and_read_the_loss_once_per_epoch(graphs_on_cpu):
    x = _data()
    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,))
    results = {}
    for mode in (False, True):
        vae = _vae(template, f"graph{mode}")
        results[mode] = fit(vae.model, vae.guide, x, epochs=3, batch_size=32, progress=False, device="cpu",
                            static_graph=True, cuda_graph=mode, seed=1)
    on, off = results[True], results[False]
    assert on.cuda_graph and on.cuda_graph_off is None, on.cuda_graph_off
    assert not off.cuda_graph and off.cuda_graph_off == "cuda_graph=False"
    for name, p in off.params.items():
        assert torch.equal(p, on.params[name]), name
    # the same losses, summed on the "device" in float64 instead of on the host
    assert on.train_elbo == pytest.approx(off.train_elbo, rel=1e-12)


def test_a_non_finite_loss_undoes_its_epoch_and_names_the_step(graphs_on_cpu, tmp_path):
    x = _data()
    calls = {"n": 0}

    def poison_at_step_8(batch):  # 3 steps per epoch: epoch 3, step 2 (fit's data check is call 1)
        calls["n"] += 1
        return batch * float("nan") if calls["n"] == 1 + 8 else batch

    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,))
    good = _vae(template, "good")
    fit(good.model, good.guide, x, epochs=2, batch_size=32, progress=False, device="cpu", static_graph=True,
        cuda_graph=True, seed=1)
    vae = _vae(template, "bad")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 2 \(global step 8\); found at the end of the epoch.*put back to the "
                                                  r"start of epoch 3.*last good checkpoint"):
        fit(vae.model, vae.guide, x, epochs=4, batch_size=32, progress=False, device="cpu", static_graph=True,
            cuda_graph=True, seed=1, transform=poison_at_step_8, run_dir=tmp_path)
    for (name, p), q in zip(vae.named_parameters(), good.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name  # the parameters after epoch 2


def test_a_graph_that_disagrees_with_the_eager_step_is_turned_off(graphs_on_cpu, monkeypatch):
    def wrong_capture(self, x):
        self.static_x = x.detach().clone()

        def body():
            self._eager(self.static_x)
            with torch.no_grad():
                self.params[0].add_(1e-3)  # a replay that does something else

        self.cuda_graph = _EagerGraph(body)

    monkeypatch.setattr(cudagraph.GraphedStep, "_capture", wrong_capture)
    x = _data()
    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,))
    results = {}
    for mode in ("auto", False):
        vae = _vae(template, f"wrong{mode}")
        results[mode] = fit(vae.model, vae.guide, x, epochs=2, batch_size=32, progress=False, device="cpu",
                            static_graph=True, cuda_graph=mode, seed=1)
    assert not results["auto"].cuda_graph and "differs from the same step run eagerly" in results["auto"].cuda_graph_off
    for name, p in results[False].params.items():  # the check's step stood as the eager one
        assert torch.equal(p, results["auto"].params[name]), name


def test_what_cannot_run_as_a_cuda_graph_is_named():
    p = torch.zeros(2, requires_grad=True)
    cuda = torch.device("cuda", 0)
    ok = dict(clip_norm=None, lr_schedule=None, several_sources=False, distributed=False)
    assert cudagraph.unsupported(torch.optim.Adam([p]), cuda, **ok) is None
    assert cudagraph.unsupported(torch.optim.AdamW([p]), cuda, **ok) is None
    assert "not on CUDA" in cudagraph.unsupported(torch.optim.Adam([p]), torch.device("cpu"), **ok)
    assert "SGD has no capturable" in cudagraph.unsupported(torch.optim.SGD([p], lr=0.1), cuda, **ok)
    assert "clip_norm" in cudagraph.unsupported(torch.optim.Adam([p]), cuda, **{**ok, "clip_norm": 1.0})
    assert "lr schedule" in cudagraph.unsupported(torch.optim.Adam([p]), cuda, **{**ok, "lr_schedule": "cosine"})


def test_cuda_graph_option_is_validated_and_refused_where_impossible():
    if DEVICE != "cpu":
        pytest.skip("on the CPU only")
    vae = VAE((12,), latent_dim=3, hidden=(16,))
    x = _data()
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto', got 'yes'"):
        fit(vae.model, vae.guide, x, epochs=1, progress=False, device="cpu", cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph=True: not on CUDA"):
        fit(vae.model, vae.guide, x, epochs=1, progress=False, device="cpu", static_graph=True, cuda_graph=True)


def test_a_capturable_optimizer_resumed_on_the_cpu_is_made_plain():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p], capturable=False)
    p.grad = torch.ones(3)
    opt.step()
    cudagraph.make_capturable(opt, True)
    assert opt.param_groups[0]["capturable"]
    cudagraph.make_capturable(opt, False)
    assert not opt.param_groups[0]["capturable"] and opt.state[p]["step"].device.type == "cpu"
    opt.step()  # a plain CPU step works again
