"""The Bayesian workflow: SBC, reweighted posterior predictive checks, model comparison,
collapse diagnostics, honest summaries, and ``check_run`` / ``compare_runs`` on run folders.

Tolerances: SBC and the PPC use seeded draws, so each test is deterministic; the
bounds are chosen so that a correct implementation would fail them with
probability ~1e-3 or less over seeds (stated where each is used).
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import pyro
import pyro.distributions as dist

import pyrovae
from pyrovae import log_marginal
from pyrovae.diagnostics import (SBCResult, UnreliableEstimateWarning, active_units, compare, khat_min_draws,
                                 latent_usage, psis_khat, reweighted_predictive, sbc)
from pyrovae.importance import LogMarginalSummary
from pyrovae.workflow import CHECK_FORMAT, CHECK_SCHEMA, check_run, compare_runs, validate_check_report

from .common import DEVICE, PPCA

DOCS = Path(__file__).resolve().parents[1] / "docs" / "workflow.md"


def _mvn_guide(m, *, scale=1.0, shift=0.0):
    """An amortised guide N(posterior mean + shift * posterior sd, scale^2 * posterior covariance)."""
    sd = m.post_cov.diagonal().sqrt()

    def guide(x):
        mean, cov = m.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean + shift * sd, covariance_matrix=scale**2 * cov))

    return guide


# ---------------------------------------------------------------------- SBC
def test_sbc_exact_guide_is_calibrated():
    m = PPCA()
    result = sbc(m.model, m.exact_guide, m.sample(250), num_simulations=1000)
    assert result.ranks.shape == (1000, 2) and result.names == ("z[0]", "z[1]")
    assert ((result.ranks >= 0) & (result.ranks <= 99)).all()
    # Bonferroni over the 2 dimensions; fails for a calibrated guide with probability 0.01.
    assert result.pvalue > 0.01, result.pvalues
    # Coverage of calibrated ranks: binomial sd sqrt(l(1-l)/1000) <= 0.016; 4 sd plus the rank grid's 1/100.
    levels = torch.tensor([0.5, 0.8, 0.95], device="cpu")  # SBC's summaries live on the CPU
    tol = 4 * (levels * (1 - levels) / 1000).sqrt() + 0.01
    assert ((result.expected_coverage(levels) - levels).abs() < tol).all(), result.expected_coverage(levels)
    central = result.expected_coverage(levels, region="central")
    assert central.shape == (3, 2) and ((central - levels[:, None]).abs() < tol[:, None]).all(), central


@pytest.mark.parametrize("scale, shift, overconfident", [(0.5, 0.0, True), (1.0, 0.5, False)],
                         ids=["half-scale", "shifted-half-sd"])
def test_sbc_flags_miscalibrated_guides(scale, shift, overconfident):
    m = PPCA()
    result = sbc(m.model, _mvn_guide(m, scale=scale, shift=shift), m.sample(250), num_simulations=1000)
    assert result.pvalue < 1e-3, result.pvalues
    if overconfident:  # too narrow: the truth falls outside q's 80% region far more than 20% of the time
        assert float(result.expected_coverage([0.8])) < 0.6, result.expected_coverage([0.8])


def test_sbc_is_seeded_and_leaves_the_callers_generator_alone():
    m = PPCA()
    state = torch.get_rng_state()
    a = sbc(m.model, m.exact_guide, m.sample(50), num_simulations=60, num_draws=9, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = sbc(m.model, m.exact_guide, m.sample(50), num_simulations=60, num_draws=9, seed=3)
    assert torch.equal(a.ranks, b.ranks) and torch.equal(a.hpd_ranks, b.hpd_ranks)
    assert a.ranks.shape == (60, 2)  # two rounds of 50 simulations, cut to 60


def test_sbc_statistics_keyword_batches_and_arguments():
    def model(x, *, covariate):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + covariate, 1.0), obs=x)

    def guide(x, *, covariate):  # exact: z | x ~ N((x - c) / 2, 1/2)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal((x - covariate) / 2, 0.5**0.5))

    batch = {"x": torch.zeros(100), "covariate": torch.linspace(-1, 1, 100)}
    result = sbc(model, guide, batch, num_simulations=300, statistics=lambda v: v["z"].abs())
    assert result.names == ("z", "statistic") and result.ranks.shape == (300, 2)
    assert result.pvalue > 0.001, result.pvalues  # fails for a calibrated guide with probability 0.001
    # Substituting by hand gives the same ranks as the default substitution.
    by_hand = sbc(model, guide, batch, num_simulations=300, statistics=lambda v: v["z"].abs(),
                  arguments=lambda sims: ((), {"x": sims["x"], "covariate": batch["covariate"]}))
    if DEVICE == "cpu":  # CUDA's generator advances per kernel, so other shapes of the same draws shift it
        assert torch.equal(by_hand.ranks, result.ranks)
    assert by_hand.pvalue > 0.001, by_hand.pvalues


def test_sbc_refuses_what_it_cannot_do():
    m = PPCA()
    x = m.sample(10)
    with pytest.raises(ValueError, match="num_simulations must be >= 2"):
        sbc(m.model, m.exact_guide, x, num_simulations=1)
    with pytest.raises(TypeError, match="statistics must be callable"):
        sbc(m.model, m.exact_guide, x, num_simulations=10, statistics=3)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        sbc(m.model, m.exact_guide, x, num_simulations=10, seed=1.5)

    def model(x, y):  # observes y + 0, a new tensor equal to neither argument when x != y
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y + 0)

    def guide(x, y):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(y / 2, 0.5**0.5))

    with pytest.raises(ValueError, match="pass arguments="):
        sbc(model, guide, torch.zeros(5), torch.zeros(5), num_simulations=10)


def test_ecdf_band_holds_whole_uniform_ecdfs_at_its_level():
    # 300 sets of calibrated ranks: the fraction of ECDFs entirely inside the 95% band is
    # binomial with sd sqrt(.95 * .05 / 300) = 0.0126; 4 sd allowed.
    g = torch.Generator().manual_seed(0)
    template = SBCResult(torch.zeros(200, 1, dtype=torch.long), 49, ("z",))
    band = template.ecdf_band(level=0.95)
    inside = 0
    for _ in range(300):
        r = SBCResult(torch.randint(0, 50, (200, 1), generator=g, device="cpu"), 49, ("z",))
        d = r.ecdf_difference(band)[0]
        inside += bool(((d >= band.lower - 1e-12) & (d <= band.upper + 1e-12)).all())
    assert abs(inside / 300 - 0.95) < 4 * 0.0126, inside


# ---------------------------------------------------------------------- reweighted PPC
def test_reweighted_ppc_matches_the_exact_posterior_predictive():
    m = PPCA()
    sd = m.post_cov.diagonal().sqrt()

    def guide(x):  # mean shifted by one posterior sd, spread 1.5 times too wide: q misses, weights stay tame
        mean, _ = m.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean + sd, 1.5 * sd).to_event(1))

    x = m.sample(20)
    ppc = reweighted_predictive(m.model, guide, x, num_samples=4000)
    assert (ppc.khat < 0.5).all(), ppc.khat
    mean, cov = m.posterior(x)
    exact = (mean @ m.W.T + m.b).sum(-1)  # E[sum of x_rep] under the exact posterior predictive
    total = lambda t: t.sum(-1)
    reweighted, raw = ppc.mean(total), ppc.mean(total, weighted=False)
    z_reweighted = (reweighted.mean - exact) / reweighted.stderr
    z_raw = (raw.mean - exact) / raw.stderr
    # Every datapoint within 4 standard errors (each fails w.p. 6e-5); raw q misses every one.
    assert (z_reweighted.abs() < 4).all(), z_reweighted
    assert (z_raw.abs() > 4).all(), z_raw


def test_reweighted_ppc_pvalues_replicates_and_checks():
    m = PPCA()
    x = m.sample(30)
    ppc = reweighted_predictive(m.model, m.diag_guide, x, num_samples=200, seed=1)
    assert ppc.replicates["x"].shape == (200, 30, 5) and torch.equal(ppc.observed["x"], x)
    torch.testing.assert_close(ppc.log_weights.exp().sum(0), torch.ones(30, dtype=torch.float64))
    p = ppc.pvalues(lambda t: t.pow(2).sum(-1))
    assert p.shape == (30,) and ((p >= 0) & (p <= 1)).all()
    reps = ppc.resample(7, seed=0)["x"]
    assert reps.shape == (7, 30, 5)
    assert 0 <= ppc.data_pvalue(lambda t: t.std(-2).sum(-1)) <= 1
    check = ppc.check(lambda t: t.mean(-1), name="mean", num_replicates=50)
    assert check.replicated.shape == (50, 30) and check.to_dict()["name"] == "mean"
    idata = ppc.to_inference_data(num_samples=40)
    assert idata.posterior_predictive["x"].shape == (1, 40, 30, 5)
    with pytest.raises(ValueError, match="statistic must reduce the event dims only"):
        ppc.mean(lambda t: t)


# ---------------------------------------------------------------------- collapse
def _two_of_eight(split_sites: bool):
    """Model z ~ N(0, I_8), x ~ N(z[:2] A, 0.5^2); a guide whose mean moves with x in exactly 2 of 8 dims."""
    a = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]])

    def model(x):
        with pyro.plate("data", len(x)):
            if split_sites:
                u = pyro.sample("u", dist.Normal(torch.zeros(2), 1.0).to_event(1))
                pyro.sample("v", dist.Normal(torch.zeros(6), 1.0).to_event(1))
            else:
                u = pyro.sample("z", dist.Normal(torch.zeros(8), 1.0).to_event(1))[:, :2]
            pyro.sample("x", dist.Normal(u @ a, 0.5).to_event(1), obs=x)

    def guide(x):
        loc = x @ a.T * 0.8
        with pyro.plate("data", len(x)):
            if split_sites:  # two sites: E_q[z|x] is estimated from draws
                pyro.sample("u", dist.Normal(loc, 0.3).to_event(1))
                pyro.sample("v", dist.Normal(torch.full((len(x), 6), 0.1), 0.9).to_event(1))
            else:
                pyro.sample("z", dist.Normal(torch.cat([loc, torch.full((len(x), 6), 0.1)], -1), 0.5).to_event(1))

    return model, guide


@pytest.mark.parametrize("split_sites", [False, True], ids=["exact-means", "estimated-means"])
def test_active_units_counts_the_units_that_move_with_x(split_sites):
    model, guide = _two_of_eight(split_sites)
    x = torch.randn(400, 3, generator=torch.Generator().manual_seed(0), device="cpu").to(DEVICE)
    units = active_units(model, guide, x)
    assert units.count == 2 and units.active[:2].all(), units
    assert units.exact_means is not split_sites
    # Inactive units: 0 exactly (read from q), or the noise of 100 draws corrected away (sd ~6e-4 per unit).
    assert units.activity[2:].max() < 3e-3, units


def test_active_units_of_a_vae_trained_on_2d_linear_gaussian_data():
    _trained_vae_active_units(seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_active_units_of_a_vae_trained_on_2d_linear_gaussian_data_more_seeds(seed):
    _trained_vae_active_units(seed=seed)


def _trained_vae_active_units(seed):
    m = PPCA(d=10, k=2, sigma=0.5, seed=seed)
    x = m.sample(2000, seed=seed + 1).float()
    pyro.set_rng_seed(seed)
    vae = pyrovae.VAE((10,), latent_dim=8, hidden=(32,), likelihood="gaussian", likelihood_options={"scale": 0.5})
    pyrovae.fit(vae.model, vae.guide, x, epochs=100, batch_size=100, lr=1e-2, progress=False, device=DEVICE, seed=seed)
    vae.eval()
    units = active_units(vae.model, vae.guide, x[:1000])
    assert units.count in (2, 3), units


def test_latent_usage_kl_reconstruction_and_mutual_information():
    m = PPCA()
    sd = m.post_cov.diagonal().sqrt()

    def guide(x):  # mean-field: exact posterior means and marginal sds
        mean, _ = m.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, sd).to_event(1))

    x = m.sample(400, seed=3)
    usage = latent_usage(m.model, guide, x, num_samples=10)
    mean, _ = m.posterior(x)
    # Tier 1: the KL of two Normals is analytic, so it is exact.
    kl = 0.5 * (sd**2 + mean**2 - 1 - torch.log(sd**2)).mean(0)
    torch.testing.assert_close(usage.kl, kl.cpu(), rtol=0, atol=1e-10)  # summaries live on the CPU
    assert usage.kl_names == ("z[0]", "z[1]") and usage.units.count == 2
    # Tier 2: E_q log p(x|z) is Monte Carlo over 4000 draws; 4 standard errors.
    residual = ((x - mean @ m.W.T - m.b) ** 2).sum(-1) + (m.W**2 * sd**2).sum()
    exact = (-0.5 * m.d * math.log(2 * math.pi * m.sigma**2) - residual / (2 * m.sigma**2)).mean()
    z = mean + sd * torch.randn(10, *mean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                                device="cpu").to(mean.device)
    terms = dist.Normal(z @ m.W.T + m.b, m.sigma).log_prob(x).sum(-1)  # the test's own Monte Carlo, for its spread
    stderr = float(terms.std() / math.sqrt(terms.numel()))
    assert abs(usage.reconstruction - float(exact)) < 4 * stderr, (usage.reconstruction, float(exact), stderr)
    assert usage.elbo == pytest.approx(usage.reconstruction - usage.kl_total)
    # Tier 3: I_q(x; z) of a Gaussian q-joint is 0.5 (logdet Cov_q(z) - logdet D) = 3.115 nats. The estimator
    # (aggregate posterior over N = 400) is a lower bound, here ~0.1 low with sd ~0.04 over seeds.
    a = m.post_cov @ m.W.T / m.sigma**2
    cov_x = m.W @ m.W.T + m.sigma**2 * torch.eye(m.d, dtype=torch.float64)
    d = torch.diag(sd**2)
    mi = float(0.5 * (torch.logdet(a @ cov_x @ a.T + d) - torch.logdet(d)))
    assert mi - 0.3 < usage.mutual_information < mi + 0.05, (usage.mutual_information, mi)
    assert usage.marginal_kl == pytest.approx(usage.kl_total - usage.mutual_information)


# ---------------------------------------------------------------------- comparison
def test_compare_gives_paired_differences():
    truth, other = PPCA(seed=0), PPCA(seed=0)
    other.W = other.W * 1.3  # a worse model of the same data; its own posterior is still exact
    other.post_cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + other.W.T @ other.W / other.sigma**2)
    x = truth.sample(300)
    a = log_marginal(truth.model, truth.exact_guide, x, num_particles=50)
    b = log_marginal(other.model, other.exact_guide, x, num_particles=50)
    result = compare({"worse": b, "truth": a})
    assert [r.name for r in result.rows] == ["truth", "worse"] and result.warnings == ()
    d = other.exact_log_marginal(x) - truth.exact_log_marginal(x)
    row = result["worse"]
    assert row.difference == pytest.approx(float(d.mean()), abs=1e-6)
    assert row.difference_stderr == pytest.approx(float(d.std() / math.sqrt(300)), rel=1e-6)
    # Paired: far smaller than the unpaired error of the two means.
    assert row.difference_stderr < 0.5 * math.hypot(row.data_stderr, result["truth"].data_stderr)
    assert row.reliable and "best" in str(result)


def test_compare_warns_when_k_hat_makes_an_estimate_unreliable():
    m = PPCA(sigma=0.1)

    def prior_guide(x):  # the prior as proposal for a sharp posterior: heavy-tailed weights
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))

    x = m.sample(40)
    good = log_marginal(m.model, m.exact_guide, x, num_particles=100)
    bad = log_marginal(m.model, prior_guide, x, num_particles=100)
    with pytest.warns(UnreliableEstimateWarning, match="prior: .* k-hat above"):
        result = compare({"exact": good, "prior": bad})
    assert not result["prior"].reliable and result["exact"].reliable
    assert str(result).startswith("WARNING: prior:") and "[UNRELIABLE]" in str(result)
    with pytest.raises(TypeError, match="at least two"):
        compare({"exact": good})
    with pytest.raises(ValueError, match="same datapoints"):
        compare({"exact": good, "short": log_marginal(m.model, m.exact_guide, x[:5], num_particles=100)})


# ---------------------------------------------------------------------- honest summaries
def _summary(**changes):
    fields = dict(num_datapoints=10000, num_particles=5000, log_marginal=-111.397, mc_stderr=0.003,
                  data_stderr=0.3, ess_mean=40.0, ess_min=1.2, khat_max=1.4, khat_threshold=0.7,
                  unreliable_fraction=0.752, bounds={1: -115.0, 5: -113.0})
    return LogMarginalSummary(**{**fields, **changes})


def test_summary_leads_with_the_khat_verdict_when_more_than_10_percent_are_unreliable():
    s = _summary()
    text = str(s)
    assert text.startswith("UNRELIABLE: 75.2% of datapoints have k-hat above 0.70 (K=5000)"), text
    assert "± 0.003 (MC)" not in text and "[MC ± 0.003 not trustworthy]" in text
    d = s.to_dict()
    assert list(d)[:2] == ["verdict", "reliable"] and d["reliable"] is False
    ok = _summary(unreliable_fraction=0.05, khat_max=0.9)
    assert ok.reliable and str(ok).startswith("reliable: 5.0% of datapoints") and "± 0.003 (MC)" in str(ok)


def test_summary_never_prints_a_non_finite_khat():
    m = PPCA()
    few = log_marginal(m.model, m.diag_guide, m.sample(20), num_particles=10).summary()
    exact = log_marginal(m.model, m.exact_guide, m.sample(20), num_particles=100).summary()
    texts = {"few": str(few), "exact": str(exact)}
    for name, text in texts.items():
        assert not re.search(r"\binf\b|\bnan\b|100\.0% above 0\.00", text), (name, text)
    assert "too few draws for a tail fit" in texts["few"] and f"K >= {khat_min_draws()} needed" in texts["few"]
    assert not few.reliable and few.to_dict()["unreliable_fraction"] is None
    assert "weights constant (exact guide)" in texts["exact"] and exact.reliable, texts["exact"]
    json.dumps(few.to_dict(), allow_nan=False)
    json.dumps(exact.to_dict(), allow_nan=False)


def test_khat_min_draws_is_where_arviz_starts_fitting_tails():
    k = khat_min_draws()
    lw = torch.randn(k, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    assert torch.isfinite(psis_khat(lw)).all() and torch.isinf(psis_khat(lw[:-1])).all()
    with pytest.raises(ValueError, match="reff must be a positive"):
        khat_min_draws(0.0)


# ---------------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Two tiny ``pyrovae train`` runs on digits: latent 8 on 100 datapoints a split, latent 2 on 80."""
    from pyrovae.cli import main

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, latent, subset in (("latent8", 8, 100), ("latent2", 2, 80)):
        runs[name] = root / name
        with pyro.get_param_store().scope():
            code = main(["train", "--run-dir", str(runs[name]), "--epochs", "2", "--subset", str(subset),
                         "--latent-dim", str(latent), "--hidden", "32", "--eval-particles", "0", "--no-progress"])
        assert code == 0
    return runs


def _schema_problems(report):
    try:
        import jsonschema
    except ImportError:  # the schema is also checked by validate_check_report below
        return []
    return [e.message for e in jsonschema.Draft202012Validator(CHECK_SCHEMA).iter_errors(report)]


def test_check_run_writes_a_report_that_matches_its_schema(digits_runs):
    run = digits_runs["latent8"]
    report = check_run(run, limit=60, num_particles=100, ppc_samples=100, num_simulations=200, num_draws=19,
                       usage_samples=5)
    validate_check_report(report)
    assert _schema_problems(report) == []
    on_disk = json.loads((run / "check" / "check.json").read_text())
    assert on_disk == report and report["format"] == CHECK_FORMAT
    files = json.loads((run / "manifest.json").read_text())["files"]
    for name in ("check.json", "khat.png", "ppc.png", "sbc.png", "collapse.png"):
        assert f"check/{name}" in files
        assert name == "check.json" or (run / "check" / name).read_bytes()[:4] == b"\x89PNG"
    assert report["data"]["num_datapoints"] == 60 and report["data"]["split"] == "test"
    assert len(report["sbc"]["dimensions"]) == 8 and len(report["collapse"]["activity"]) == 8
    assert report["verdicts"][0].startswith("log p(x): ")
    pyrovae.load_run(run)  # the run folder stays readable


def test_check_report_validation_names_what_is_wrong(digits_runs, tmp_path):
    report = check_run(digits_runs["latent2"], out_dir=tmp_path, limit=20, num_particles=30, ppc_samples=30,
                       num_simulations=40, num_draws=9, usage_samples=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json", "collapse.png", "khat.png", "ppc.png", "sbc.png"]
    broken = json.loads(json.dumps(report))
    del broken["sbc"]["pvalues"]
    broken["collapse"]["active_units"] = -1
    broken["ppc"]["statistics"][0]["raw"]["pvalue_sd"] = 1.5
    with pytest.raises(ValueError) as info:
        validate_check_report(broken)
    message = str(info.value)
    for where in ("report.sbc: missing 'pvalues'", "report.collapse.active_units: -1 < minimum 0",
                  "report.ppc.statistics[0].raw.pvalue_sd: 1.5 > maximum 1"):
        assert where in message, message
    assert len(_schema_problems(broken)) in (0, 3)  # 0 only without jsonschema
    with pytest.raises(ValueError, match="split 'dev' is not one of"):
        check_run(digits_runs["latent2"], split="dev")


def test_the_documented_schema_is_the_one_in_the_code():
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert any(json.loads(b) == CHECK_SCHEMA for b in blocks), "docs/workflow.md must show CHECK_SCHEMA as JSON"


def test_compare_runs_pairs_the_same_datapoints(digits_runs, tmp_path):
    out = tmp_path / "compare.json"
    with pytest.warns(UnreliableEstimateWarning):  # two epochs of training: q is far from the posterior
        result = compare_runs([digits_runs["latent8"], digits_runs["latent2"]], limit=50, num_particles=30, out=out)
    assert {r.name for r in result.rows} == {"latent8", "latent2"} and result.num_datapoints == 50
    body = json.loads(out.read_text())
    assert body["data"]["num_datapoints"] == 50 and len(body["models"]) == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # All of each run's test split: 100 against 80 datapoints, not the same data.
    with pytest.raises(ValueError, match="paired comparison needs the same datapoints"):
        compare_runs([digits_runs["latent8"], digits_runs["latent2"]], limit=None, num_particles=30)
    with pytest.raises(ValueError, match="distinct name"):
        compare_runs([digits_runs["latent8"], digits_runs["latent2"]], names=["a", "a"])


@pytest.mark.parametrize("module", ["pyrovae.diagnostics", "pyrovae.workflow", "pyrovae.plots"])
def test_public_names_import_and_are_unique(module):
    import importlib

    mod = importlib.import_module(module)
    assert len(mod.__all__) == len(set(mod.__all__)), mod.__all__
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
