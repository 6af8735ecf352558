import json
import os
import signal

import pytest
import torch
import pyro

from pyrovae import VAE, NonFiniteLossError, fit, load_dataset, load_run
from pyrovae.runs import load_checkpoint

from .common import DEVICE, load_example, seeded_data


def ppca_pair(d=6, k=2):
    """A user's pair written with pyro.param and pyro.module, as Pyro's tutorials teach:
    the one in examples/custom_model_guide.py."""
    return load_example("custom_model_guide").make_pair(d, k)


@seeded_data
def toy_data(n=96, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    return z @ torch.randn(2, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def test_user_pair_trains_and_improves():
    model, guide = ppca_pair()
    x = toy_data()
    result = fit(model, guide, x, epochs=30, batch_size=32, lr=0.03, progress=False, device=DEVICE)
    first, last = result.train_elbo[0], result.train_elbo[-1]
    assert last > first + 1.0, (first, last)
    assert {"param.W", "param.b", "param.sigma"} <= set(result.params)
    assert {"param.encoder.weight", "param.encoder.bias"} <= set(result.params), list(result.params)  # no "$$$"


def _run(run_dir, *, resume=False, stop_at_call=None, how="exception"):
    """A 6-epoch run with a cosine schedule, optionally interrupted at a model call."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    model, guide = ppca_pair()
    calls = {"n": 0}

    def interrupted_model(x):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            if how == "exception":
                raise KeyboardInterrupt("simulated kill")
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps
        return model(x)

    return fit(interrupted_model, guide, toy_data(), val_data=toy_data(32, seed=5), epochs=6, batch_size=32,
               lr=0.02, seed=3, progress=False, device=DEVICE, run_dir=None if resume else run_dir,
               resume=run_dir if resume else None, lr_schedule="cosine")


def _assert_same(a, b):
    assert set(a.params) == set(b.params)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert [h["train_elbo"] for h in a.history] == [h["train_elbo"] for h in b.history]


@pytest.mark.parametrize("how, call", [("exception", 15), ("sigint", 9)])
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, how, call):
    full = _run(tmp_path / "full")
    # calls: 1 setup, then per epoch 3 training steps + 1 validation batch
    with pytest.raises(KeyboardInterrupt) as info:
        _run(tmp_path / "part", stop_at_call=call, how=how)
    if how == "sigint":
        assert "resume with" in str(info.value), str(info.value)
    resumed = _run(tmp_path / "part", resume=True)
    _assert_same(full, resumed)
    rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch,train_elbo,val_elbo"), rows


def test_vae_checkpoint_round_trip(tmp_path):
    s = load_dataset("digits", binarize="static", subset=64)
    vae = VAE(s.event_shape, latent_dim=2, hidden=(16,))
    fit(vae.model, vae.guide, s, epochs=2, batch_size=32, progress=False, device=DEVICE, run_dir=tmp_path)
    run = load_run(tmp_path)  # onto the CPU, wherever it was trained
    vae.cpu()
    for a, b in zip(vae.state_dict().values(), run.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(vae.reconstruct(s.test), run.vae.reconstruct(s.test))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["metadata"]["data"]["binarize"] == "static" and config["pair"]["type"] == "VAE"


def test_vae_with_kl_warmup_reloads(tmp_path):
    s = load_dataset("digits", binarize="static", subset=64)
    vae = VAE(s.event_shape, latent_dim=2, hidden=(16,))
    fit(vae.model, vae.guide, s, epochs=2, batch_size=32, kl_warmup_epochs=1, progress=False, device=DEVICE,
        run_dir=tmp_path)
    assert torch.equal(load_run(tmp_path).vae.reconstruct(s.test), vae.cpu().reconstruct(s.test))


def test_validation_does_not_touch_the_optimiser(tmp_path):
    model, guide = ppca_pair()
    fit(model, guide, toy_data(), val_data=toy_data(32, seed=5), epochs=2, batch_size=32, progress=False,
        device=DEVICE, run_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    steps = {int(s["step"]) for s in state.optimizer["state"].values()}
    assert steps == {2 * 3}, steps  # 2 epochs x 3 batches, no extra steps from validation
    assert all(h["val_elbo"] is not None for h in state.history)


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro's own warning precedes our error
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, guide = ppca_pair()
    calls = {"n": 0}

    def poisoned_model(x):
        calls["n"] += 1
        if calls["n"] > 8:  # 1 setup call, 6 steps in epochs 1-2, step 1 of epoch 3
            x = x * float("nan")
        return model(x)

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 3, step 2 .*last good checkpoint is kept .*checkpoint-000002.pt"):
        with pyro.validation_enabled(False):
            fit(poisoned_model, guide, toy_data(), epochs=5, batch_size=32, progress=False, device=DEVICE,
                run_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    assert state.epoch == 2 and all(torch.isfinite(v).all() for v in state.params.values())
    # and it resumes, with a lower learning rate
    pyro.clear_param_store()
    model, guide = ppca_pair()
    r = fit(model, guide, toy_data(), epochs=4, batch_size=32, lr=1e-4, progress=False, device=DEVICE, resume=tmp_path)
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4] and r.history[-1]["lr"] == 1e-4


def test_early_stopping_and_kl_warmup():
    model, guide = ppca_pair()
    r = fit(model, guide, toy_data(), val_data=toy_data(32, seed=5), epochs=200, batch_size=32, lr=0.05,
            patience=2, kl_warmup_epochs=2, progress=False, device=DEVICE)
    assert r.stopped_early and len(r.history) < 200
    assert r.history[0]["kl_weight"] < 1.0 and r.history[-1]["kl_weight"] == 1.0


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"epochs": 0}, ValueError, "epochs must be a positive int, got 0"),
        ({"batch_size": -3}, ValueError, "batch_size must be a positive int, got -3"),
        ({"lr": float("nan")}, ValueError, "lr must be a positive finite float, got nan"),
        ({"optimizer": "lbfgs"}, ValueError, "optimizer 'lbfgs' is not one of"),
        ({"elbo": "renyi"}, ValueError, "elbo 'renyi' is not one of"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"patience": 2}, ValueError, "patience .* needs val_data"),
        ({"epochs": 1.5}, TypeError, "epochs must be an int"),
    ],
)
def test_bad_options(kwargs, err, match):
    """Each bad option is named with its value."""
    model, guide = ppca_pair()
    with pytest.raises(err, match=match):
        fit(model, guide, toy_data(), progress=False, **kwargs)


@pytest.mark.parametrize(
    "data, err, match",
    [
        (torch.tensor([[1.0, float("nan")]] * 4), ValueError, r"data contains NaN or infinite values \(first at index 0\)"),
        (torch.zeros(0, 6), ValueError, "data is empty"),
        ("not data", TypeError, "data must be a tensor, numpy array, tuple or dict of tensors, or a map-style Dataset"),
    ],
)
def test_bad_data(data, err, match):
    model, guide = ppca_pair()
    with pytest.raises(err, match=match):
        fit(model, guide, data, progress=False, device=DEVICE)


def test_vae_data_checks():
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"data must have shape \(batch, \*\(1, 4, 4\)\), got \(8, 3, 3\)"):
        fit(vae.model, vae.guide, torch.zeros(8, 3, 3), progress=False, device=DEVICE)
    with pytest.raises(ValueError, match="data must be binary"):
        fit(vae.model, vae.guide, torch.rand(8, 1, 4, 4), progress=False, device=DEVICE)


def test_dataset_and_numpy_inputs():
    x = toy_data(40)
    torch.manual_seed(0)
    model, guide = ppca_pair()
    ds = torch.utils.data.TensorDataset(x)
    r1 = fit(model, guide, ds, epochs=1, batch_size=20, progress=False, device=DEVICE)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = ppca_pair()
    r2 = fit(model, guide, x.cpu().numpy(), epochs=1, batch_size=20, progress=False, device=DEVICE)
    assert r1.train_elbo == r2.train_elbo


def test_two_vaes_with_one_name_are_caught():
    x = torch.bernoulli(torch.full((8, 4), 0.5))
    a, b = VAE((4,), latent_dim=2, hidden=(8,)), VAE((4,), latent_dim=2, hidden=(8,))
    fit(a.model, a.guide, x, epochs=1, progress=False, device=DEVICE)
    with pytest.raises(ValueError, match=r"param store holds 'vae.encoder\$\$\$net.0.weight' for a different tensor"):
        fit(b.model, b.guide, x, epochs=1, progress=False, device=DEVICE)
    c = VAE((4,), latent_dim=2, hidden=(8,), name="second")
    fit(c.model, c.guide, x, epochs=1, progress=False, device=DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    model, guide = ppca_pair()
    with pytest.raises(ValueError, match="device='cuda' was asked for but CUDA is not available"):
        fit(model, guide, toy_data(), progress=False, device="cuda")


def test_dataset_of_tuples_passes_every_tensor_or_says_why():
    """A TensorDataset(xs, ys) used to lose ys silently; now ys reaches the programs, or the call is refused."""
    model, guide = ppca_pair()
    ds = torch.utils.data.TensorDataset(toy_data(40), torch.zeros(40))
    with pytest.raises(TypeError, match=r"passes each tensor as a positional argument"):
        fit(model, guide, ds, epochs=1, batch_size=20, progress=False, device=DEVICE)


def test_optimizer_options_reach_the_optimiser_are_validated_and_kept_on_resume(tmp_path):
    """Burda et al.'s Adam has eps = 1e-4: fit passes optimizer_options to the optimiser, checks them
    eagerly, stores them in config.json, and a resume may not change them."""
    model, guide = ppca_pair()
    x = toy_data()
    fit(model, guide, x, epochs=1, batch_size=32, progress=False, device=DEVICE, run_dir=tmp_path,
        optimizer_options={"eps": 1e-4, "betas": (0.9, 0.99)})
    ckpt = torch.load(next(tmp_path.glob("checkpoint-*.pt")), weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["fit"]["optimizer_options"] == {
        "eps": 1e-4, "betas": [0.9, 0.99]}
    fit(model, guide, x, epochs=2, batch_size=32, progress=False, device=DEVICE, resume=tmp_path,
        optimizer_options={"eps": 1e-4, "betas": (0.9, 0.99)})  # the same options: fine
    with pytest.raises(ValueError, match=r"optimizer_options \(\{'eps': 0.0001"):
        fit(model, guide, x, epochs=3, batch_size=32, progress=False, device=DEVICE, resume=tmp_path)
    for bad, error, message in [
        ({"lr": 0.1}, ValueError, r"may not set \['lr'\]: pass them as fit's own options"),
        ({"momentum": 0.9}, ValueError, r"\['momentum'\] are not options of Adam"),
        ({"eps": -1.0}, ValueError, "not valid for 'adam': Invalid epsilon value"),
        ([("eps", 1e-4)], TypeError, "optimizer_options must be a dict"),
    ]:
        with pytest.raises(error, match=message):
            fit(model, guide, x, epochs=1, progress=False, device=DEVICE, optimizer_options=bad)


@pytest.mark.parametrize("optimizer, options, fused", [
    ("adam", None, True), ("adamw", None, True), ("adam", {"fused": False}, False),
    ("adam", {"foreach": True}, None), ("sgd", None, None),
])
def test_adam_on_the_cpu_runs_fused_unless_the_options_choose(tmp_path, optimizer, options, fused):
    """One fused kernel per parameter on the CPU (about 5x faster than torch's default Adam step);
    an implementation chosen in optimizer_options is kept; CUDA keeps torch's default."""
    model, guide = ppca_pair()
    fit(model, guide, toy_data(), epochs=1, batch_size=32, progress=False, device=DEVICE, run_dir=tmp_path,
        optimizer=optimizer, optimizer_options=options)
    group = torch.load(next(tmp_path.glob("checkpoint-*.pt")), weights_only=True)["optimizer"]["param_groups"][0]
    expected = fused if torch.device(DEVICE).type == "cpu" else (options or {}).get("fused")
    assert group.get("fused") == expected
