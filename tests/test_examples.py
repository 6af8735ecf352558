"""Every example runs with tiny arguments; an example not listed here fails the suite.

The tiny runs are seeded, so each assertion below is deterministic on one
machine; the margins are set so that they hold for any reasonable seed too
(checked on seeds 0-4 when the tests were written).
"""

import math

import pytest
import torch

from .common import EXAMPLES, data_dir, load_example, requires_mnist

LISTED = {
    "custom_model_guide.py": ["--n", "200", "--epochs", "30", "--num-particles", "200"],
    "vae_mnist.py": ["--data-dir", str(data_dir()), "--subset", "256", "--epochs", "1", "--hidden", "32",
                     "--latent-dim", "4", "--num-particles", "20", "--eval-images", "50", "--device", "cpu", "--quiet"],
    "conditional_vae.py": ["--epochs", "4", "--baseline-epochs", "3", "--hidden", "32", "--num-particles", "30",
                           "--eval-images", "40", "--export-samples", "8"],
    "ss_vae_m2.py": ["--epochs", "3", "--lr", "3e-3", "--hidden", "64", "--num-particles", "30",
                     "--eval-images", "30", "--export-samples", "8", "--quiet"],
    "iwae_vae.py": ["--epochs", "4", "--hidden", "32", "--num-particles", "100", "--eval-images", "120",
                    "--export-samples", "8"],
    "flow_guide.py": ["--epochs", "3", "--flows", "2", "--hidden", "32", "--num-particles", "60",
                      "--eval-images", "60", "--export-samples", "8"],
    "two_layer_vae.py": ["--epochs", "4", "--kl-warmup-epochs", "2", "--num-particles", "60", "--eval-images", "60",
                         "--export-samples", "8"],
}


def _run(name, extra=()):
    """The examples are CPU scripts (device="cpu"): under PYROVAE_DEVICE=cuda they still build on the CPU."""
    module = load_example(name[:-3])
    with torch.device("cpu"):
        return module.main(module.parser().parse_args([*LISTED[name], *extra]))


def _improved(result):
    elbo = result.train_elbo
    return elbo[-1] > elbo[0] and all(math.isfinite(e) for e in elbo)


def _check_export(out, site, num_datapoints, num_draws):
    posterior = out["idata"].posterior[site]
    assert posterior.sizes["data"] == num_datapoints and posterior.sizes["chain"] * posterior.sizes["draw"] == num_draws
    assert len(out["summary"]) > 0 and out["summary"]["mean"].notna().all(), out["summary"]


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(LISTED)


def test_custom_model_guide():
    result, est, exact = _run("custom_model_guide.py")
    assert result.train_elbo[-1] > result.train_elbo[0]
    z = (est.log_marginal - exact).abs() / est.stderr
    assert (z < 4).double().mean() > 0.95, z  # range check: ~0 false failures expected at 4 SE


@requires_mnist
def test_vae_mnist():
    result, est = _run("vae_mnist.py")
    assert len(result.history) == 1 and len(est) == 50


def test_conditional_vae():
    out = _run("conditional_vae.py")
    assert _improved(out["baseline"]) and _improved(out["fit"])
    est = out["log_marginal"]
    # Boolean-mask indexing cannot take a particle dimension: the particles ran one at a time, and it says why.
    assert est.sequential and "mask" in est.fallback_reason, est.fallback_reason
    assert torch.isfinite(est.log_marginal).all() and len(est) == 40
    # log p(y|x) <= 0 for binary y, and the IWAE ladder of the same weights rises towards the estimate.
    assert (est.log_marginal <= 0).all()
    assert est.bounds[1].mean() <= est.bounds[5].mean() <= est.log_marginal.mean() + 1e-9, est.bounds
    assert torch.isfinite(out["baseline_log_p"]).all()
    _check_export(out, "z", 4, 8)


def test_conditional_vae_long_enough_for_a_static_graph():
    # 8 epochs of 20 batches reach STATIC_GRAPH_MIN_STEPS (150 on the CPU, 50 on CUDA), where
    # static_graph="auto" considers recording.
    out = _run("conditional_vae.py", ["--baseline-epochs", "8", "--epochs", "1"])
    assert _improved(out["baseline"])


def test_ss_vae_m2():
    out = _run("ss_vae_m2.py")
    result = out["fit"]
    assert _improved(result)
    assert set(result.history[-1]["sources"]) == {"labelled", "classify"}
    # 359 test images: chance is 0.1 with standard deviation 0.016; seeds 0-4 gave 0.38 to 0.55.
    assert out["accuracy"] > 0.3, out["accuracy"]
    est = out["log_marginal"]
    assert torch.isfinite(est.log_marginal).all() and not est.sequential
    _check_export(out, "y", 4, 8)
    draws = out["idata"].posterior["y"].values  # one-hot draws of the label
    assert ((draws == 0) | (draws == 1)).all() and (draws.sum(-1) == 1).all()


def test_iwae_vae():
    out = _run("iwae_vae.py")
    assert all(_improved(r) for r in out["fit"].values())
    for objective, est in out["log_marginal"].items():
        assert torch.isfinite(est.log_marginal).all(), objective
        ladder = [float(est.bounds[k].mean()) for k in (1, 5, 50)] + [float(est.log_marginal.mean())]
        assert ladder == sorted(ladder), (objective, ladder)
    # The signature of IWAE training: it gives up ELBO for a guide that covers the posterior, so the gap
    # between its IWAE-5 bound and its ELBO is wider than the ELBO-trained model's (by 0.17 to 0.29 nats
    # on seeds 0-4, against gaps of about 0.3).
    gap = {o: float(e.bounds[5].mean() - e.bounds[1].mean()) for o, e in out["log_marginal"].items()}
    assert gap["iwae"] > gap["trace"] + 0.05, gap
    # After 4 epochs on 8x8 digits the gain in log p(x) is small and not significant on every seed (the
    # benchmark measures it on MNIST); here the paired difference must at least not be a significant loss.
    diff, se = out["difference"]
    assert math.isfinite(diff) and se > 0 and diff > -3 * se, (diff, se)


def test_flow_guide():
    out = _run("flow_guide.py")
    assert all(_improved(r) for r in out["fit"].values())
    flows = out["models"]["iaf2"].flows
    assert len(flows) == 2
    # The flows' weights are found through pyro.module and trained: every tensor moved from its initial value.
    moved, total = out["flow_tensors_trained"]["iaf2"]
    assert moved == total > 0, (moved, total)
    trained = out["fit"]["iaf2"].params
    flow_params = [name for name in trained if ".flows." in name]
    assert len(flow_params) == len(list(flows.parameters())), sorted(trained)
    for name, est in out["log_marginal"].items():
        gap = (est.log_marginal - est.bounds[1]).double()
        assert torch.isfinite(est.log_marginal).all(), name
        # log p(x) >= ELBO in expectation: the mean gap may fall below 0 only by Monte Carlo error.
        assert gap.mean() > -3 * gap.std() / math.sqrt(len(gap)), (name, gap.mean())
    _check_export(out, "z", 4, 8)


def test_two_layer_vae():
    out = _run("two_layer_vae.py")
    assert _improved(out["fit"])
    est = out["log_marginal"]
    assert torch.isfinite(est.log_marginal).all()
    assert est.bounds[1].mean() <= est.bounds[5].mean() <= est.log_marginal.mean() + 1e-9, est.bounds
    assert out["per_layer"]["z1"] >= 1, out["active_units"]
    assert set(out["idata"].posterior.data_vars) == {"z1", "z2"}
    _check_export(out, "z2", 4, 8)
