"""The torch k-hat of :func:`pyrovae.diagnostics.psis_khat` against ArviZ's ``psislw``, its reference.

ArviZ 0.23's ``psislw(lw, reff=1.0)[1]`` is what ``psis_khat`` computed
before it was written in torch. The two agree to ``ATOL`` wherever both are
finite, and have the same ``inf``/NaN entries elsewhere, on every datapoint
that ``psis_khat`` does not read as constant (its ``-inf``: ArviZ fits a
shape to round-off there). ``ATOL`` is far above the differences seen (about
1e-13 on shapes of order 1 to 100): they come from the order of the sums in
the means and from ``exp``/``log1p`` of torch and numpy differing by an ulp.
"""

import ast
import inspect
import math
import textwrap
import warnings

import numpy as np
import pytest
import torch

from pyrovae import diagnostics
from pyrovae.diagnostics import psis_khat

from .common import default_device

ATOL = 1e-10
SIZES = (21, 25, 50, 100, 1000, 5000)


def arviz_khat(lw: torch.Tensor) -> torch.Tensor:
    """ArviZ's k-hat of each column of ``lw`` (taken in float64, as ``psis_khat`` takes it)."""
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short tails, high k-hat, inf - inf
        _, khat = az.psislw(lw.detach().to("cpu", torch.float64).T.numpy(), reff=1.0)
    return torch.as_tensor(np.asarray(khat, dtype=np.float64), device="cpu").reshape(-1)


def assert_matches_arviz(lw: torch.Tensor, khat=None, name: str = "") -> float:
    """Check ``psis_khat(lw)`` against ArviZ on the non-constant columns; return the largest difference."""
    khat = psis_khat(lw) if khat is None else khat
    fitted = khat != -math.inf
    ours, ref = khat[fitted], arviz_khat(lw)[fitted]
    finite = torch.isfinite(ours) & torch.isfinite(ref)
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    assert (finite | same).all(), (name, ours[~(finite | same)], ref[~(finite | same)])
    diff = (ours - ref)[finite].abs().max().item() if finite.any() else 0.0
    assert diff <= ATOL, (name, diff)
    return diff


def normal(g, k, n, scale):
    return torch.randn(k, n, generator=g, dtype=torch.float64, device="cpu") * scale


def student_t(g, k, n, df, scale):
    """Log weights ``scale * t_df``: heavy right tails of the weights for small df."""
    z = torch.randn(k, n, generator=g, dtype=torch.float64, device="cpu")
    chi2 = torch.randn(k, n, df, generator=g, dtype=torch.float64, device="cpu").pow(2).sum(-1)
    return scale * z / torch.sqrt(chi2 / df)


def lognormal(g, k, n, sigma):
    """Log weights that are themselves lognormal: weights ``exp(exp(sigma z))``, very heavy tails."""
    return torch.exp(sigma * torch.randn(k, n, generator=g, dtype=torch.float64, device="cpu"))


def with_zero_weights(g, k, finite_counts):
    """One column per count: that many finite log weights, the rest ``-inf`` (the tail is that short)."""
    lw = normal(g, k, len(finite_counts), 1.0)
    for col, count in enumerate(finite_counts):
        lw[torch.randperm(k, generator=g, device="cpu")[count:], col] = -math.inf
    return lw


def below_cutoffmin(g, k, n, top):
    """``top`` log weights within 5 nats of the maximum, the rest more than 750 below it.

    The ``M + 1``-th largest then lies below ``log(tiny)``, so the cutoff is
    ``log(tiny)`` and the tail has ``top`` weights (when ``top <= M``).
    """
    lw = -750.0 - 100 * torch.rand(k, n, generator=g, dtype=torch.float64, device="cpu")
    lw[:top] = -5 * torch.rand(top, n, generator=g, dtype=torch.float64, device="cpu")
    return lw


def tied(g, k, n, step):
    """Log weights rounded to a grid of ``step`` nats: ties at the cutoff shorten the tail."""
    return torch.round(normal(g, k, n, 1.5) / step) * step


def mixed(g, k):
    """Columns of every kind above in one batch: several tail lengths, so several groups."""
    parts = [normal(g, k, 6, 1.0), normal(g, k, 3, 30.0), student_t(g, k, 4, 2, 1.0), lognormal(g, k, 4, 1.0),
             tied(g, k, 4, 0.5), tied(g, k, 3, 2.0), with_zero_weights(g, k, [1, 2, 4, 5, 6, 7, k // 2]),
             below_cutoffmin(g, k, 3, min(7, k // 5)), torch.zeros(k, 2, dtype=torch.float64, device="cpu")]
    return torch.cat(parts, 1)[:, torch.randperm(sum(p.shape[1] for p in parts), generator=g, device="cpu")]


def cases(k: int):
    """Named (K, N) log weights for K draws, from a generator seeded by K."""
    g = torch.Generator(device="cpu").manual_seed(k)
    n = 16 if k < 5000 else 6
    yield "normal", torch.cat([normal(g, k, n, s) for s in (0.01, 0.3, 1.0, 3.0, 10.0, 100.0)], 1)
    yield "student_t", torch.cat([student_t(g, k, n, df, s) for df, s in ((1, 0.1), (2, 1.0), (5, 3.0))], 1)
    yield "lognormal", torch.cat([lognormal(g, k, n, s) for s in (0.3, 1.0, 2.0)], 1)
    yield "tied", torch.cat([tied(g, k, n, s) for s in (0.01, 0.5, 2.0)], 1)
    yield "repeated", torch.randint(0, 4, (k, n), generator=g, device="cpu").double() * 0.7
    yield "zero_weights", with_zero_weights(g, k, [2, 3, 4, 5, 6, 7, 9, 15, k - 3])
    yield "below_cutoffmin", torch.cat([below_cutoffmin(g, k, 3, t) for t in (3, 4, 5, 6, 8)], 1)
    yield "mixed", mixed(g, k)


@pytest.mark.parametrize("k", SIZES)
def test_matches_arviz(k):
    for name, lw in cases(k):
        assert_matches_arviz(lw, name=name)


def test_the_mixed_batch_has_several_tail_lengths_and_matches_column_by_column():
    lw = mixed(torch.Generator(device="cpu").manual_seed(1), 100)
    khat = psis_khat(lw)
    assert_matches_arviz(lw, khat)
    x = lw - lw.amax(0)
    cutoff = x.sort(0).values[-diagnostics._psis_tail_length(100) - 1].clamp_min(math.log(np.finfo(float).tiny))
    assert len(set((x > cutoff).sum(0).tolist())) >= 5
    one_by_one = torch.cat([psis_khat(lw[:, j:j + 1]) for j in range(lw.shape[1])])
    torch.testing.assert_close(khat, one_by_one, rtol=0, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("finite,expected", [(4, "inf"), (5, "fit"), (6, "fit")])
def test_short_tails_of_zero_weights(finite, expected):
    """With only ``finite`` weights above zero the tail has that many: 4 or fewer is ``inf``."""
    lw = with_zero_weights(torch.Generator(device="cpu").manual_seed(finite), 1000, [finite] * 5)
    khat = psis_khat(lw)
    assert bool(torch.isinf(khat).all()) == (expected == "inf"), khat
    assert_matches_arviz(lw, khat)


def test_float32_and_non_contiguous_inputs():
    g = torch.Generator(device="cpu").manual_seed(3)
    lw = torch.cat([normal(g, 500, 20, 1.0), student_t(g, 500, 20, 2, 1.0)], 1)
    assert_matches_arviz(lw.float())
    torch.testing.assert_close(psis_khat(lw.float()), psis_khat(lw.float().double()), rtol=0, atol=0)
    wide = normal(g, 60, 1000, 2.0)  # (N, K): its transpose is a non-contiguous (K, N)
    assert not wide.T.is_contiguous() and not wide.T[::2, 1::3].is_contiguous()
    for view in (wide.T, wide.T[::2, 1::3]):
        khat = psis_khat(view)
        assert_matches_arviz(view, khat)
        torch.testing.assert_close(khat, psis_khat(view.contiguous()), rtol=0, atol=0)


def test_degenerate_tail_gets_arviz_value():
    """Distinct top weights within 1e-16 nats of each other: every exceedance is 0 and the
    profile likelihood is NaN; ArviZ then keeps no grid weight, so b = 0 and k = 5 / (n + 10)."""
    lw = normal(torch.Generator(device="cpu").manual_seed(4), 100, 3, 1.0) - 10
    lw[:25] = -torch.arange(25, dtype=torch.float64, device="cpu")[:, None] * 1e-18
    khat = psis_khat(lw)
    torch.testing.assert_close(khat, torch.full((3,), 5 / 30, dtype=torch.float64, device="cpu"), rtol=0, atol=1e-15)
    assert_matches_arviz(lw, khat)


def test_gpd_fit_in_slices_equals_one_slice(monkeypatch):
    lw = student_t(torch.Generator(device="cpu").manual_seed(5), 1000, 50, 3, 1.0)
    whole = psis_khat(lw)
    monkeypatch.setattr(diagnostics, "_GPD_FIT_ELEMENTS", 1)  # one datapoint a slice
    torch.testing.assert_close(psis_khat(lw), whole, rtol=0, atol=1e-15)


def test_special_columns():
    lw = normal(torch.Generator(device="cpu").manual_seed(6), 100, 7, 1.0)
    lw[3, 0] = math.inf  # inf - inf in ArviZ leaves no tail: inf, unreliable, here too
    lw[:, 1] = 0.0
    lw[5, 1] = math.inf  # constant finite weights but one infinite: unreliable, not constant
    lw[:, 2] = -math.inf  # every weight zero
    lw[:, 3] = 2.5  # constant: reliable
    lw[:, 4] = math.inf
    lw[:50, 5] = -math.inf
    khat = psis_khat(lw)
    assert khat[:5].tolist() == [math.inf, math.inf, math.inf, -math.inf, math.inf]
    assert torch.isfinite(khat[5:]).all()
    assert_matches_arviz(lw, khat)
    lw[7, 6] = math.nan
    with pytest.raises(ValueError, match=r"contain NaN \(datapoints \[6\]\)"):
        psis_khat(lw)


def test_result_is_float64_on_the_input_device_whatever_the_default_device():
    lw = normal(torch.Generator(device="cpu").manual_seed(7), 200, 5, 1.0)
    with default_device("meta"):
        khat = psis_khat(lw.float(), tol=1e-6)
        tolerances = psis_khat(lw, tol=torch.full((5,), 1e-9, device="cpu"))
    assert khat.device.type == "cpu" and khat.dtype == torch.float64 and khat.numpy().shape == (5,)
    assert tolerances.device.type == "cpu"
    assert_matches_arviz(lw.float(), khat)


def code_without_docstrings(function) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_library_path_is_device_agnostic_and_free_of_arviz():
    functions = (psis_khat, diagnostics._psis_khat_columns, diagnostics._gpd_shape, diagnostics._gpd_shape_slice,
                 diagnostics._psis_tail_length)
    for function in functions:
        code = code_without_docstrings(function)
        for word in (".cpu()", ".numpy()", "'cpu'", "_arviz", "np."):
            assert word not in code, (function.__name__, word)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    lw = mixed(torch.Generator(device="cpu").manual_seed(8), 1000)
    khat = psis_khat(lw.to("cuda"))
    assert khat.device.type == "cuda" and khat.dtype == torch.float64
    torch.testing.assert_close(khat.cpu(), psis_khat(lw), rtol=0, atol=ATOL, equal_nan=True)


def test_log_marginal_does_not_import_arviz():
    """k-hat no longer needs ArviZ, whose import takes seconds: a fresh process that estimates
    log p(x) with k-hat never loads it."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys, torch, pyro, pyro.distributions as dist, pyrovae
        def model(x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        def guide(x):
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Normal(x / 2, 0.8))
        est = pyrovae.log_marginal(model, guide, torch.zeros(3, device="cpu"), num_particles=200)
        assert torch.isfinite(est.khat).all()
        print("arviz" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
