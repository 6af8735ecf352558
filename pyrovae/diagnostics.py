"""Reliability diagnostics and ArviZ export; the only module that imports ArviZ.

How to read the Pareto k-hat of a datapoint's importance weights (the shape
of a generalised Pareto distribution fitted to the largest weights):

* ``k < 0.5``: the weights have finite variance; the estimate and its
  standard error can be trusted.
* ``0.5 <= k < 0.7``: infinite variance, but the (Pareto-smoothed) estimate
  still converges at a usable rate; error bars are optimistic.
* ``k >= 0.7`` (Yao et al., 2018): the guide is too far from the posterior in
  the tails for this datapoint; the estimate may be far off and the reported
  standard error is meaningless. Vehtari et al. (2024) refine this threshold
  by sample size: ``min(1 - 1 / log10(S), 0.7)`` for S draws, so with few
  draws even smaller k-hat values are suspect (:func:`khat_threshold`).

A high k-hat in an importance-sampled log p(x) means: use more particles only
if k-hat is moderately high; otherwise improve the guide (more flexible q,
longer training) because more particles will not fix a heavy tail.

References:

* Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating
  variational inference. ICML.
* Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance
  sampling. JMLR 25(72).
"""

import json
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import pyro
from pyro import poutine
from torch.utils.data import DataLoader, Dataset

from ._checks import check_bool, check_int
from .pair import ModelGuidePair
from .weights import (ROUNDOFF_ULPS, PairStructure, data_name, datapoint_major, evaluating, inspect_pair,
                      log_weights, merge_kwargs, posterior_traces, predictive_traces, program_arguments)

__all__ = [
    "psis_khat",
    "khat_threshold",
    "unreliable_fraction",
    "to_inference_data",
    "ppc_pvalues",
    # workflow diagnostics
    "UNRELIABLE_LIMIT",
    "khat_min_draws",
    "sbc",
    "SBCResult",
    "ECDFBand",
    "reweighted_predictive",
    "ReweightedPredictive",
    "WeightedMean",
    "PPCStatistic",
    "compare",
    "ComparisonResult",
    "ComparisonRow",
    "UnreliableEstimateWarning",
    "active_units",
    "ActiveUnits",
    "latent_usage",
    "LatentUsage",
]


def _arviz():
    with warnings.catch_warnings():
        # ArviZ 0.x announces its 1.0 refactor on import; the message is not ours to show.
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


def khat_threshold(num_samples: int) -> float:
    """Sample-size-dependent k-hat threshold ``min(1 - 1/log10(S), 0.7)`` (Vehtari et al., 2024).

    >>> round(khat_threshold(100), 3), khat_threshold(5000)
    (0.5, 0.7)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


def psis_khat(log_weights: torch.Tensor, *, tol=None) -> torch.Tensor:
    """PSIS Pareto k-hat for each datapoint (Vehtari et al., 2024), computed in torch.

    A batched float64 reimplementation of the k-hat of ArviZ 0.23's
    ``psislw(..., reff=1)``: the largest ``ceil(min(K / 5, 3 sqrt(K)))``
    weights of each datapoint are fitted with a generalised Pareto
    distribution by Zhang and Stephens' (2009) empirical-Bayes estimator with
    the weakly informative prior on its shape (:func:`_gpd_shape`). It runs
    on the device of ``log_weights`` and waits on it twice: for the NaN check
    and for the grouping of datapoints by tail length (once more for a tensor
    ``tol``, which is checked on the CPU).

    Weights that are all equal up to round-off, as under an exact guide, have
    no tail to fit: their k-hat is ``-inf``, read as "reliable" (ArviZ would
    return ``inf`` for them, or fit a shape to round-off noise).

    :param torch.Tensor log_weights: shape ``(K, N)``: K draws for each of N datapoints.
    :param tol: float or tensor of shape ``(N,)``: a datapoint whose finite log
        weights span at most ``tol`` nats counts as constant. Default
        ``64 * eps * (1 + max |log w|)`` with the float64 epsilon, the round-off
        of float64 arithmetic; weights computed in float32 need a larger one
        (:func:`pyrovae.log_marginal` passes the round-off of its own log-densities).
    :returns: tensor of shape ``(N,)``, float64, on the device of ``log_weights``.
        ``-inf``: constant weights. ``inf``, read as "unreliable": no tail fit
        is possible (K too small, see :func:`khat_min_draws`; at most 4
        weights above the cutoff; every weight zero; or some weight ``+inf``,
        even where the finite ones are constant). Elsewhere the value is
        ArviZ's up to float64 round-off.

    >>> lw = torch.zeros(200, 2, dtype=torch.float64)
    >>> lw[:, 1] = torch.randn(200, generator=torch.Generator().manual_seed(0), device="cpu") * 0.1
    >>> k = psis_khat(lw)
    >>> k[0].item(), bool(k[1] < 0.5)
    (-inf, True)
    """
    if not isinstance(log_weights, torch.Tensor) or log_weights.dim() != 2:
        raise ValueError(f"log_weights must be a (K, N) tensor, got {getattr(log_weights, 'shape', log_weights)!r}")
    lw = log_weights.detach().to(torch.float64)
    top, bottom = lw.amax(0), lw.amin(0)  # NaN propagates into both
    has_nan, has_zero_weight = torch.stack([top.isnan().any(), (bottom == -math.inf).any()]).tolist()
    if has_nan:
        raise ValueError(f"log_weights contain NaN (datapoints {top.isnan().nonzero()[:5, 0].tolist()})")
    if has_zero_weight:
        bottom = torch.where(lw > -math.inf, lw, math.inf).amin(0)  # smallest finite weight
    tol = _khat_tol(tol, top).to(lw.device)
    fitted = torch.isfinite(top)  # some finite weight and none +inf
    constant = fitted & (top - bottom <= tol)
    out = torch.full_like(top, math.inf).masked_fill_(constant, -math.inf)
    return _psis_khat_columns(lw, fitted & ~constant, out=out)


#: Largest number of float64 elements in the (datapoints, m, n) temporary of the GPD fit.
_GPD_FIT_ELEMENTS = 2**22


def _psis_tail_length(num_draws: int) -> int:
    """Nominal tail length ``ceil(min(S / 5, 3 sqrt(S / reff)))`` of PSIS for ``reff = 1`` (Vehtari et al., 2024).

    Written as ArviZ 0.23's ``psislw`` writes it, so that it rounds alike.

    >>> _psis_tail_length(21), _psis_tail_length(1000), _psis_tail_length(5000)
    (5, 95, 213)
    """
    return int(math.ceil(min(num_draws / 5.0, 3 * (num_draws / 1.0) ** 0.5)))


def _psis_khat_columns(lw: torch.Tensor, fit: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """Write into ``out`` the k-hat of the columns of ``lw`` ``(K, N)`` selected by the mask ``fit``, and return it.

    The selected columns have a finite maximum, no NaN and two distinct
    values at least. As ArviZ 0.23's ``_psislw`` for ``reff = 1`` (Vehtari et
    al., 2024): the log weights are shifted by their maximum; the cutoff is
    the ``M + 1``-th largest of them (:func:`_psis_tail_length`), or the log
    of the smallest normal float64 if that is larger; the tail is every
    weight strictly above the cutoff (fewer than ``M`` with ties or ``-inf``
    entries). A tail of at most 4 weights gets ``inf``; a longer one gets
    :func:`_gpd_shape` of ``exp(tail) - exp(cutoff)``. Only the ``M + 1``
    largest weights are sorted (``torch.topk``); columns are fitted in groups
    of equal tail length, found with one wait on the device.
    """
    length = _psis_tail_length(lw.shape[0])
    largest = torch.topk(lw, min(length + 1, lw.shape[0]), dim=0).values.flip(0).T  # (N, M + 1), ascending
    x = (largest - largest[:, -1:]).contiguous()  # NaN in columns with +inf or no finite weight: not fitted
    cutoff = x[:, 0].clamp_min(math.log(torch.finfo(torch.float64).tiny))
    tail_lengths = torch.where(fit, (x > cutoff[:, None]).sum(1), 0)
    order = torch.argsort(tail_lengths, stable=True)
    sizes, counts = torch.stack(torch.unique(tail_lengths, return_counts=True)).tolist()  # sorted, as `order` is
    for cols, n in zip(order.split(counts), sizes):
        if n > 4:
            out[cols] = _gpd_shape(torch.exp(x[cols, -n:]) - torch.exp(cutoff[cols, None]))
    return out


def _gpd_shape(tails: torch.Tensor) -> torch.Tensor:
    """Shape k of a generalised Pareto distribution fitted to each row of ``tails`` ``(C, n)``.

    The rows are non-negative exceedances sorted in ascending order, ``n >= 5``.
    The estimator is Zhang and Stephens' (2009) empirical-Bayes one, with the
    weakly informative prior on k of Vehtari et al. (2024) (ArviZ 0.23's
    ``_gpdfit``). Rows are fitted in slices that keep the ``(rows, m, n)``
    temporary within ``_GPD_FIT_ELEMENTS`` elements.
    """
    n = tails.shape[1]
    m = 30 + int(n**0.5)
    step = max(1, _GPD_FIT_ELEMENTS // (m * max(n, m)))
    return torch.cat([_gpd_shape_slice(rows, m) for rows in tails.split(step)])


def _gpd_shape_slice(tails: torch.Tensor, m: int) -> torch.Tensor:
    """Zhang and Stephens' (2009) posterior-mean fit of the GPD shape on ``m`` grid points, one k per row of ``tails``.

    With ``x`` a sorted row of length n: ``b_j = 1 / x_n + (1 - sqrt(m / (j - 1/2))) / (3 x_q)``
    (``x_q`` the first quartile), ``k_j = mean(log1p(-b_j x))``, profile
    log-likelihood ``L_j = n (log(-b_j / k_j) - k_j - 1)``, weights
    ``w_j = 1 / sum_i exp(L_i - L_j)`` less those below ``10 eps``, then
    ``k = mean(log1p(-b x))`` at the weighted mean ``b`` of the ``b_j``,
    shrunk to ``(n k + 5) / (n + 10)`` by the prior (Vehtari et al., 2024).
    Where no weight is kept (NaN profile, a degenerate tail), ``b`` is 0 as
    in ArviZ, so ``k = 5 / (n + 10)``.
    """
    n = tails.shape[1]
    grid = torch.arange(1, m + 1, dtype=torch.float64, device=tails.device)
    b = (1 - torch.sqrt(m / (grid - 0.5))) / (3 * tails[:, int(n / 4 + 0.5) - 1, None]) + 1 / tails[:, -1:]
    k = (tails[:, None, :] * -b[:, :, None]).log1p_().mean(2)  # the (rows, m, n) temporary
    profile = n * (torch.log(-(b / k)) - k - 1)
    weights = 1 / torch.exp(profile[:, None, :] - profile[:, :, None]).sum(2)
    kept = weights >= 10 * torch.finfo(torch.float64).eps
    weights, b = torch.where(kept, weights, 0.0), torch.where(kept, b, 0.0)
    total = weights.sum(1, keepdim=True)
    b_post = (b * torch.where(total > 0, weights / total, 0.0)).sum(1, keepdim=True)
    k_post = torch.log1p(-b_post * tails).mean(1)
    return (n * k_post + 5.0) / (n + 10)


def _khat_tol(tol, top: torch.Tensor) -> torch.Tensor:
    if tol is None:
        return ROUNDOFF_ULPS * torch.finfo(torch.float64).eps * (1.0 + top.abs())
    if isinstance(tol, bool) or not isinstance(tol, (int, float, torch.Tensor)):
        raise TypeError(f"tol must be a float or a tensor of shape (N,), got {tol!r}")
    tol = tol.detach().to("cpu", torch.float64) if isinstance(tol, torch.Tensor) else torch.tensor(
        float(tol), dtype=torch.float64, device="cpu")
    if tol.dim() > 1 or tol.numel() not in (1, top.numel()) or not (tol >= 0).all():
        raise ValueError(f"tol must be a non-negative float or a tensor of shape ({top.numel()},), got {tol!r}")
    return tol.expand_as(top)


def unreliable_fraction(khat: torch.Tensor, num_samples: int) -> float:
    """Fraction of datapoints whose k-hat exceeds :func:`khat_threshold` for ``num_samples``."""
    return float((khat > khat_threshold(num_samples)).double().mean())


def ppc_pvalues(x: torch.Tensor, x_rep: torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Posterior predictive p-values ``P(T(x_rep) >= T(x))`` per datapoint.

    :param torch.Tensor x: observed data, ``(N, *event_shape)``.
    :param torch.Tensor x_rep: replicates, ``(S, N, *event_shape)``.
    :param statistic: maps ``(..., *event_shape)`` to ``(...)``, e.g.
        ``lambda t: t.flatten(-3).mean(-1)`` for the mean intensity of images.
    :returns: shape ``(N,)``; values near 0 or 1 flag datapoints the model
        does not reproduce. Ties count one half.

    >>> x = torch.zeros(2, 3); rep = torch.stack([torch.ones(2, 3), -torch.ones(2, 3)])
    >>> ppc_pvalues(x, rep, lambda t: t.sum(-1)).tolist()
    [0.5, 0.5]
    """
    if x_rep.shape[1:] != x.shape:
        raise ValueError(f"x_rep must have shape (S, *{tuple(x.shape)}), got {tuple(x_rep.shape)}")
    t_obs, t_rep = statistic(x), statistic(x_rep)
    return ((t_rep > t_obs).double() + 0.5 * (t_rep == t_obs).double()).mean(0)


def to_inference_data(
    model,
    guide,
    *args,
    num_samples: int = 100,
    num_chains: int = 4,
    plate: str = "data",
    posterior_predictive: bool = True,
    model_kwargs: Optional[dict] = None,
    **kwargs,
):
    """Draw from the guide and export draws and diagnostics as ArviZ ``InferenceData``.

    The programs get ``*args``/``**kwargs`` as in :func:`pyrovae.log_marginal`
    (a lone tuple or dict is a batch: ``model(*batch)``, ``model(**batch)``);
    ``model_kwargs`` carries keyword arguments whose names are options here.
    Draws come from the same particle pass (:mod:`pyrovae.weights`), with the
    networks in ``eval()`` mode. With ``D`` the data dimension (named after the
    data plate, default ``"data"``), the groups are:

    * ``posterior``: every latent site, dims ``(chain, draw, D, ...)``, drawn
      from q(z|x); discrete latents the model enumerates are drawn from
      p(c | x, z) (``infer_discrete``);
    * ``posterior_predictive`` (optional): the observed sites re-drawn from the
      model at those draws;
    * ``observed_data``: the observed sites;
    * ``log_likelihood``: the estimate of log p(x_i) from these draws, the same
      for every draw. Given the fitted networks the datapoints are independent
      and z_i depends on x_i alone, so the leave-one-out predictive density is
      p(x_i) itself: ``az.loo`` gives ``elpd_loo = sum_i log p(x_i)`` and
      ``p_loo = 0`` (it warns that no Pareto tail fits constant ratios). The
      variable is named after the observed site, or ``log_marginal`` when there
      are several;
    * ``sample_stats``: ``log_weight`` ``(chain, draw, D)``, and per datapoint
      ``khat``, ``ess`` and ``log_marginal`` (dims ``(D,)``).

    Dims after ``D`` are named after the site's other plates, else
    ``<site>_dim_<i>``. No name can collide: a dimension whose name is taken by
    a variable gets a trailing ``_``, and so does a site named ``chain`` or
    ``draw`` (ArviZ's own dimensions); then the groups' ``pyrovae_site_names``
    attribute maps the exported names back (JSON).

    :param args: the programs' arguments, e.g. the data batch ``x``.
    :param int num_samples: draws per datapoint (>= 2).
    :param int num_chains: the i.i.d. draws are laid out as this many chains of
        ``num_samples // num_chains`` draws, so that ArviZ's multi-chain
        diagnostics (r-hat) apply; they should read ~1 for independent draws.
    :param str plate: name of the data plate.
    :param bool posterior_predictive: add the ``posterior_predictive`` group.
    :param dict model_kwargs: keyword arguments for the programs that share a
        name with an option here.
    :returns: ``arviz.InferenceData``, ready for ``az.summary``, ``az.loo`` and ArviZ plots.

    >>> import pyro, pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0., 1.))
    ...         pyro.sample("obs", dist.Normal(z, 1.), obs=x)
    >>> def guide(x):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
    >>> idata = to_inference_data(model, guide, torch.zeros(3), num_samples=8, num_chains=2)
    >>> idata.posterior["z"].dims, idata.posterior_predictive["obs"].shape
    (('chain', 'draw', 'data'), (2, 4, 3))
    """
    check_int("num_samples", num_samples, 2)
    check_int("num_chains", num_chains, 1)
    if num_chains > num_samples:
        raise ValueError(f"num_chains must be an int in [1, num_samples={num_samples}], got {num_chains!r}")
    if not isinstance(plate, str) or not plate:
        raise TypeError(f"plate must be a non-empty str, got {plate!r}")
    check_bool("posterior_predictive", posterior_predictive)
    args, kwargs = program_arguments(args, merge_kwargs(kwargs, model_kwargs), "data")
    streamed = [type(a).__name__ for a in (*args, *kwargs.values())
                if isinstance(a, (Dataset, DataLoader)) and not isinstance(a, torch.Tensor)]
    if streamed:
        raise TypeError(f"to_inference_data needs the data in memory, got a {streamed[0]}: pass the batch of "
                        "tensors to export (every draw of every datapoint is held in the result)")
    pair = ModelGuidePair(model, guide)
    pair.check_data(args, kwargs, data_name(args, kwargs))
    S = num_samples - num_samples % num_chains
    with torch.no_grad(), evaluating(pair, args, kwargs):
        structure = inspect_pair(model, guide, args, kwargs, plate=plate)
        weights = log_weights(model, guide, args, kwargs, structure, num_particles=S, chunk_size=S, keep_traces=True,
                              networks=pair.called_modules())
        traces = posterior_traces(model, args, kwargs, structure, weights.passes)
        replicated = predictive_traces(model, args, kwargs, structure, traces) if posterior_predictive else []
    return _inference_data(structure, weights, traces, replicated, num_chains)


class _ExportNames:
    """Variable and dimension names for the export, none of which can collide.

    ArviZ owns the dims ``chain`` and ``draw``, and xarray turns a variable named like a
    dimension into a coordinate, silently dropping it from its group: a site named
    ``chain`` or ``draw`` is renamed, and every dimension avoids every variable name.
    """

    _STATS = ("log_weight", "khat", "ess", "log_marginal")

    def __init__(self, sites: Sequence[str]):
        self.variable: Dict[str, str] = {}
        for site in sites:
            name = site
            while name in ("chain", "draw") or name in self.variable.values() or (name != site and name in sites):
                name += "_"
            self.variable[site] = name
        self._taken = set(self.variable.values()) | set(self._STATS) | {"chain", "draw"}

    def dim(self, base: str) -> str:
        while base in self._taken:
            base += "_"
        return base

    def dims(self, site: str, plates: Sequence[Optional[str]], data_dim: str) -> List[str]:
        var = self.variable[site]
        return [data_dim] + [self.dim(p) if p is not None else self.dim(f"{var}_dim_{i}") for i, p in enumerate(plates)]

    def renamed(self) -> Dict[str, str]:
        return {v: s for s, v in self.variable.items() if v != s}


def _stack(traces, site: str, structure: PairStructure) -> Tuple[torch.Tensor, List[Optional[str]]]:
    """``(S, N, ...)`` values of ``site`` over vectorised or sequential traces."""
    parts, plates = [], []
    for trace, vectorized in traces:
        value, plates = datapoint_major(trace.nodes[site], structure, vectorized)
        parts.append(value if vectorized else value.unsqueeze(0))
    return torch.cat(parts).detach().cpu(), plates


def _inference_data(structure: PairStructure, weights, traces, replicated, num_chains: int):
    az = _arviz()
    import xarray as xr

    lw = weights.log_weights.cpu()
    S, n = lw.shape
    chains = lambda t: t.reshape(num_chains, S // num_chains, *t.shape[1:]).detach().cpu().numpy()
    names = _ExportNames([*structure.latents, *structure.enumerated, *structure.observed])
    data_dim = names.dim(structure.plate)
    groups = {"posterior": {}, "posterior_predictive": {}, "observed_data": {}}
    dims = {}
    for group, sites, source in (("posterior", [*structure.latents, *structure.enumerated], traces),
                                 ("posterior_predictive", structure.observed, replicated)):
        for site in sites if source else ():
            value, plates = _stack(source, site, structure)
            groups[group][names.variable[site]] = chains(value)
            dims[names.variable[site]] = names.dims(site, plates, data_dim)
    for site in structure.observed:
        value, plates = datapoint_major(structure.model_trace.nodes[site], structure, vectorized=False)
        groups["observed_data"][names.variable[site]] = value.detach().cpu().numpy()
        dims[names.variable[site]] = names.dims(site, plates, data_dim)
    lse = torch.logsumexp(lw, 0)
    log_marginal = lse - math.log(S)
    ll_name = names.variable[structure.observed[0]] if len(structure.observed) == 1 else "log_marginal"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ notes dims without coords
        idata = az.from_dict(
            posterior=groups["posterior"] or None,
            posterior_predictive=groups["posterior_predictive"] or None,
            observed_data=groups["observed_data"],
            sample_stats={"log_weight": chains(lw)},
            dims={**dims, "log_weight": [data_dim]},
        )
        # Its own dataset: the variable may share the observed site's name but not its dims.
        idata.add_groups(log_likelihood=az.dict_to_dataset(
            {ll_name: chains(log_marginal.expand(S, n))}, dims={ll_name: [data_dim]}, library=None))
    stats = {"khat": psis_khat(lw, tol=weights.roundoff), "log_marginal": log_marginal,
             "ess": torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))}
    for key, value in stats.items():
        idata.sample_stats[key] = xr.DataArray(value.detach().cpu().numpy(), dims=[data_dim])
    for group in idata.groups() if names.renamed() else ():
        getattr(idata, group).attrs["pyrovae_site_names"] = json.dumps(names.renamed())
    if weights.sequential:
        idata.sample_stats.attrs["pyrovae_fallback_reason"] = weights.fallback_reason
    return idata


# --- workflow diagnostics ---
# The Bayesian workflow around a fitted pair: is q(z|x) calibrated (sbc), does
# the model reproduce its data under the importance-reweighted posterior
# (reweighted_predictive), which of several models predicts the same data better
# (compare), and which latent dimensions carry information (active_units,
# latent_usage). Every log-density is read from traces of the same model and
# guide. The particle pass of this section is private and small; it is meant to
# move onto weights.py once that module holds the shared one.
#
# References:
# * Talts, Betancourt, Simpson, Vehtari, Gelman (2018). Validating Bayesian inference
#   algorithms with simulation-based calibration. arXiv:1804.06788.
# * Säilynoja, Bürkner, Vehtari (2022). Graphical test for discrete uniformity and its
#   applications in goodness-of-fit evaluation and multiple sample comparison. Statistics
#   and Computing 32:32.
# * Deistler, Gonçalves, Macke (2022). Truncated proposals for scalable and hassle-free
#   simulation-based inference. NeurIPS (expected coverage).
# * Gelman, Meng, Stern (1996). Posterior predictive assessment of model fitness via
#   realized discrepancies. Statistica Sinica 6.
# * Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR (active units).
# * Hoffman, Johnson (2016). ELBO surgery: yet another way to carve up the variational
#   evidence lower bound. NIPS workshop on Advances in Approximate Bayesian Inference.

# Imports of this section, kept with it.
import contextlib  # noqa: E402
import math  # noqa: E402,F811
import warnings  # noqa: E402,F811
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple  # noqa: E402,F811

from pyro.distributions.util import scale_and_mask  # noqa: E402

from ._checks import check_choice, check_float, check_int, check_seed  # noqa: E402
from .pair import ModelGuidePair  # noqa: E402
from .weights import (datapoint_major, evaluating, inspect_pair, log_weights, posterior_traces,  # noqa: E402
                      predictive_traces, program_arguments)

_DRAWS = "_pyrovae_workflow_draws"
# Particle-datapoint pairs per vectorised pass (memory bound of the particle passes).
_PAIRS_PER_PASS = 2**15
#: An estimate is reported as unreliable when more than this fraction of its datapoints has
#: k-hat above :func:`khat_threshold` (summaries, :func:`compare` and ``pyrovae check`` alike).
UNRELIABLE_LIMIT = 0.1


class UnreliableEstimateWarning(UserWarning):
    """A log p(x) estimate whose k-hat says it cannot be trusted entered a comparison."""


def khat_min_draws(reff: float = 1.0) -> int:
    """The fewest draws S for which PSIS can fit a Pareto tail; below it k-hat is ``inf``.

    ArviZ's ``psislw`` fits the ``ceil(min(S / 5, 3 sqrt(S / reff)))`` largest
    weights and needs more than 4 of them; with fewer draws :func:`psis_khat`
    returns ``inf``: "too few draws for a tail fit", not a shape estimate.

    :param float reff: relative efficiency of the draws (1 for independent draws).
    :returns: the smallest such S.

    >>> khat_min_draws()
    21
    """
    reff = check_float("reff", reff, positive=True)
    s = 2
    while math.ceil(min(s / 5.0, 3.0 * math.sqrt(s / reff))) <= 4:
        s += 1
    return s


def _unreliable(khat: torch.Tensor, num_samples: int) -> float:
    """Fraction of datapoints above :func:`khat_threshold` (``-inf``, constant weights, is reliable;
    every datapoint is unreliable when K is too small for a tail fit)."""
    if num_samples < khat_min_draws():
        return 1.0
    return float((khat.detach().cpu().double() > khat_threshold(num_samples)).double().mean())


# ------------------------------------------------------------------ draws of the guide
# The reweighted predictive takes its particles from weights.py. SBC and the collapse
# diagnostics need other runs (simulations from the model, the guide at given latents),
# made here with a particle plate left of the programs' plates.
@dataclass(frozen=True)
class _Layout:
    """Where a pair keeps its datapoints: batch dim ``dim`` of size ``size``, under
    ``nesting`` batch dims in all; the sites by role."""

    dim: int
    size: int
    nesting: int
    latents: Tuple[str, ...]
    observed: Tuple[str, ...]


def _layout(model, guide, args, kwargs, plate: str, what: str) -> _Layout:
    """The pair's structure (:func:`pyrovae.weights.inspect_pair`, which refuses what cannot be
    scored per datapoint), without the discrete latents the model enumerates."""
    structure = inspect_pair(model, guide, args, kwargs, plate=plate)
    if structure.enumerated:
        raise ValueError(f"{what} does not support model sites enumerated in parallel "
                         f"({list(structure.enumerated)}); have the guide sample them")
    return _Layout(structure.plate_dim, structure.size, structure.nesting, structure.latents, structure.observed)


def _by_datapoint(t: torch.Tensor, layout: _Layout, draws: int, event_dim: int = 0) -> torch.Tensor:
    """A site's value or log-density as ``(draws, N, *rest)``: draws first, datapoints second."""
    batch = t.dim() - event_dim
    t = t.reshape((1,) * (layout.nesting + 1 - batch) + tuple(t.shape))
    t = t.movedim(layout.nesting + 1 + layout.dim, 1)
    return t.expand(draws, layout.size, *t.shape[2:])


def _log_density(trace, names, layout: _Layout, draws: int) -> torch.Tensor:
    """Unscaled, masked log-density of the sites ``names``, summed per draw and datapoint: ``(draws, N)``, float64."""
    total = None
    for name in names:
        site = trace.nodes[name]
        lp = torch.as_tensor(scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])).to(torch.float64)
        lp = _by_datapoint(lp, layout, draws).reshape(draws, layout.size, -1).sum(-1)
        total = lp if total is None else total + lp
    return total


def _latent_values(trace, names, layout: _Layout, draws: int) -> Dict[str, torch.Tensor]:
    """The sites ``names`` as ``{name: (draws, N, *shape)}``."""
    out = {}
    for name in names:
        site = trace.nodes[name]
        out[name] = _by_datapoint(site["value"], layout, draws, site["fn"].event_dim)
    return out


def _columns(values: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Tuple[str, ...]]:
    """``{name: (M, N, *shape)}`` as one float64 ``(M, N, D)`` matrix and a label per column."""
    cols, labels = [], []
    for name, v in values.items():
        v = v.reshape(v.shape[0], v.shape[1], -1).to(torch.float64)
        cols.append(v)
        labels += [name] if v.shape[-1] == 1 and values[name].dim() == 2 else [f"{name}[{i}]" for i in range(v.shape[-1])]
    return torch.cat(cols, -1), tuple(labels)


class _Pass(NamedTuple):
    guide: object
    model: object


def _particle_pass(model, guide, args, kwargs, layout: _Layout, num: int) -> _Pass:
    """``num`` vectorised draws z ~ q(z|x) per datapoint, and the model replayed on them."""
    with pyro.plate(_DRAWS, num, dim=-(layout.nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return _Pass(guide_trace, model_trace)


def _psis(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS-smoothed, self-normalised log weights ``(S, N)``, by ArviZ's ``psislw`` (k-hat: :func:`psis_khat`)."""
    lw = log_weights.detach().to("cpu", torch.float64).T.contiguous().numpy()
    az = _arviz()
    with warnings.catch_warnings():
        # ArviZ warns when k-hat is high or the tail is short; k-hat says it already.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        smoothed, _ = az.psislw(lw, reff=1.0)
    return torch.as_tensor(np.asarray(smoothed, dtype=np.float64), device="cpu").T.contiguous().to(log_weights.device)


@contextlib.contextmanager
def _seeded(seed: Optional[int], args: tuple, kwargs: dict):
    """Draw from torch's generators seeded with ``seed``, leaving the caller's state as it was.

    ``seed=None`` draws from the caller's generators as they are.
    """
    if seed is None:
        yield
        return
    values = [*args, *kwargs.values()]
    values += [v for a in values if isinstance(a, dict) for v in a.values()]  # a lone dict batch
    values += [v for a in values if isinstance(a, (tuple, list)) for v in a]  # a lone tuple batch
    devices = sorted({t.device.index or 0 for t in values if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _prepare(model, guide, args, kwargs, plate, seed) -> Tuple[ModelGuidePair, tuple, dict]:
    """Shared checks of ``plate``, ``seed``, the pair and its arguments (a lone tuple or dict is a
    batch, as in :func:`pyrovae.log_marginal`): the pair and the programs' ``(args, kwargs)``."""
    if not isinstance(plate, str) or not plate:
        raise TypeError(f"plate must be a non-empty str, got {plate!r}")
    check_seed("seed", seed)
    args, kwargs = program_arguments(args, kwargs, "data")
    pair = ModelGuidePair(model, guide)
    pair.check_data(args, kwargs, "data")
    return pair, args, kwargs


# ------------------------------------------------------------------ simulation-based calibration
class ECDFBand(NamedTuple):
    """A simultaneous band for the ECDF of uniform fractional ranks, as differences from the uniform CDF.

    :ivar grid: ``(P,)`` fractional ranks z in (0, 1) where the ECDF is evaluated.
    :ivar lower: ``(P,)`` lower limit of ``ECDF(z) - z``.
    :ivar upper: ``(P,)`` upper limit.
    :ivar level: the probability that a whole ECDF of calibrated ranks stays inside.
    """

    grid: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    level: float


def _binomial_cdf(n: int, probs: torch.Tensor) -> torch.Tensor:
    """CDF table of Binomial(n, p) for each p: ``(len(probs), n + 1)``, float64."""
    k = torch.arange(n + 1, dtype=torch.float64, device=probs.device)
    pmf = torch.distributions.Binomial(n, probs=probs.double()[:, None]).log_prob(k).exp()
    return pmf.cumsum(-1).clamp(max=1.0)


def _binomial_quantile(cdf: torch.Tensor, q: float) -> torch.Tensor:
    """Smallest count c with CDF(c) >= q, per row of a :func:`_binomial_cdf` table."""
    return (cdf < q - 1e-12).sum(-1)


def _ecdf_band(num_simulations: int, num_draws: int, level: float, num_trials: int, seed: int) -> ECDFBand:
    """Säilynoja et al. (2022): the pointwise binomial level at which ``level`` of simulated
    uniform-rank ECDFs stay inside everywhere, found by simulation."""
    s, values = num_simulations, num_draws + 1
    k = torch.unique(torch.linspace(1, values - 1, min(values - 1, 99), device="cpu").round().long())
    z = k.double() / values
    cdf = _binomial_cdf(s, z)  # (P, s + 1)
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(0, values, (num_trials, s), generator=gen, device="cpu").sort(-1).values
    counts = torch.searchsorted(ranks, k.expand(num_trials, -1).contiguous())  # (trials, P): ranks below k
    rows = torch.arange(len(k), device="cpu")
    below = cdf[rows, counts]
    above = 1 - torch.where(counts > 0, cdf[rows, (counts - 1).clamp(min=0)], torch.zeros_like(below))
    tail = (2 * torch.minimum(below, above)).clamp(max=1).min(-1).values  # most extreme point of each ECDF
    gamma = float(torch.quantile(tail, 1 - level))
    lower = _binomial_quantile(cdf, gamma / 2).double() / s - z
    upper = _binomial_quantile(cdf, 1 - gamma / 2).double() / s - z
    return ECDFBand(z, lower, upper, level)


def _uniformity_pvalues(ranks: torch.Tensor, num_draws: int, num_bins: int) -> torch.Tensor:
    """Pearson chi-square test of uniform ranks on ``num_bins`` bins, per column: ``(D,)``."""
    values = num_draws + 1
    width = torch.bincount(torch.arange(values, device="cpu") * num_bins // values, minlength=num_bins).double()
    expected = ranks.shape[0] * width / values
    bins = ranks.cpu() * num_bins // values  # (S, D)
    counts = torch.nn.functional.one_hot(bins, num_bins).sum(0).double()  # (D, bins)
    stat = ((counts - expected) ** 2 / expected).sum(-1)
    return torch.special.gammaincc(torch.tensor((num_bins - 1) / 2, dtype=torch.float64, device="cpu"), stat / 2)


@dataclass(frozen=True)
class SBCResult:
    """Ranks of the true latents among draws of the guide, one row per simulation.

    How to read it: if q(z|x) equals the posterior, each column of ``ranks`` is
    uniform on ``0..num_draws`` (Talts et al., 2018). A U-shaped histogram
    means q is too narrow (overconfident), a hump too wide, a slope a biased
    mean. ``pvalues`` test uniformity per dimension; to test all dimensions at
    once, compare ``pvalue`` (Bonferroni: ``min(1, D * min(pvalues))``) with
    your level. A calibrated amortised guide is necessary, not sufficient: a q
    that ignores x and returns the prior is calibrated too.

    :ivar torch.Tensor ranks: ``(S, D)`` int64, the number of draws below the truth
        (ties broken at random), for S simulations and D latent coordinates or statistics.
    :ivar int num_draws: L, draws from q(z|x) per simulation; ranks lie in ``0..L``.
    :ivar tuple names: a label per column (``"z[0]"``, ...).
    :ivar torch.Tensor hpd_ranks: ``(S,)`` int64, draws with a higher density
        q(z|x) than the truth, for :meth:`expected_coverage` (None: not computed).
    :ivar int num_bins: bins of the uniformity test (None: ``min(20, L + 1, S // 5)``).
    """

    ranks: torch.Tensor
    num_draws: int
    names: Tuple[str, ...]
    hpd_ranks: Optional[torch.Tensor] = None
    num_bins: Optional[int] = None

    @property
    def num_simulations(self) -> int:
        return self.ranks.shape[0]

    @property
    def bins(self) -> int:
        """Bins of the uniformity test and of the rank histograms."""
        return self.num_bins or min(20, self.num_draws + 1, max(2, self.num_simulations // 5))

    @property
    def pvalues(self) -> torch.Tensor:
        """``(D,)`` chi-square p-values of uniform ranks, one per column."""
        return _uniformity_pvalues(self.ranks, self.num_draws, self.bins)

    @property
    def pvalue(self) -> float:
        """Bonferroni-adjusted p-value of "every column is uniform": ``min(1, D * min(pvalues))``."""
        return min(1.0, len(self.names) * float(self.pvalues.min()))

    def expected_coverage(self, levels, *, region: str = "hpd") -> torch.Tensor:
        """How often the truth falls inside q's credible regions, per credibility level.

        ``"hpd"`` (Deistler et al., 2022): the joint highest-density region of
        q(z|x) holding a fraction ``level`` of its mass; returns ``(len(levels),)``.
        ``"central"``: each coordinate's central interval; returns ``(len(levels), D)``.
        A calibrated q gives coverage = level; below it q is overconfident,
        above it conservative.

        :param levels: credibility levels in ``[0, 1]``.
        """
        levels = torch.as_tensor(levels, dtype=torch.float64, device="cpu").reshape(-1)
        if levels.numel() == 0 or not ((levels >= 0) & (levels <= 1)).all():
            raise ValueError(f"levels must be credibility levels in [0, 1], got {levels.tolist()}")
        check_choice("region", region, ("hpd", "central"))
        values = self.num_draws + 1
        if region == "central":
            u = (self.ranks.cpu().double() + 0.5) / values
            return ((u - 0.5).abs()[None] < levels[:, None, None] / 2).double().mean(1)
        if self.hpd_ranks is None:
            raise ValueError("this result holds no hpd_ranks; use region='central'")
        u = (self.hpd_ranks.cpu().double() + 0.5) / values
        return (u[None, :] < levels[:, None]).double().mean(1)

    def rank_histogram(self, *, level: float = 0.99):
        """Counts per bin ``(D, bins)`` and the pointwise ``level`` interval of a bin's count
        under uniform ranks, ``lower, upper`` of shape ``(bins,)``."""
        values, bins = self.num_draws + 1, self.bins
        idx = self.ranks.cpu() * bins // values
        counts = torch.nn.functional.one_hot(idx, bins).sum(0)
        width = torch.bincount(torch.arange(values, device="cpu") * bins // values, minlength=bins).double()
        cdf = _binomial_cdf(self.num_simulations, width / values)
        return counts, _binomial_quantile(cdf, (1 - level) / 2), _binomial_quantile(cdf, (1 + level) / 2)

    def ecdf_difference(self, band: ECDFBand) -> torch.Tensor:
        """``ECDF(z) - z`` of each column's fractional ranks at ``band.grid``: ``(D, P)``."""
        k = (band.grid * (self.num_draws + 1)).round().long()
        below = (self.ranks.cpu()[:, :, None] < k).double().mean(0)
        return below - band.grid

    def ecdf_band(self, *, level: float = 0.95, num_trials: int = 1000, seed: int = 0) -> ECDFBand:
        """Simultaneous band for :meth:`ecdf_difference` (Säilynoja et al., 2022), by ``num_trials`` simulations."""
        check_float("level", level, positive=True, maximum=1 - 1e-9)
        check_int("num_trials", num_trials, 10)
        return _ecdf_band(self.num_simulations, self.num_draws, level, num_trials, seed)

    def plot(self, path, *, level: float = 0.95, max_dimensions: int = 8):
        """Rank histograms (top) and ECDF differences with a simultaneous ``level`` band (bottom)."""
        from . import plots

        return plots.plot_sbc(self, path, level=level, max_dimensions=max_dimensions)

    def to_dict(self) -> dict:
        """JSON-able summary: sizes, names, p-values, Bonferroni p-value, HPD coverage at 50/80/95%."""
        levels = [0.5, 0.8, 0.95]
        d = {"num_simulations": self.num_simulations, "num_draws": self.num_draws, "num_bins": self.bins,
             "dimensions": list(self.names), "pvalues": [float(p) for p in self.pvalues],
             "pvalue_bonferroni": self.pvalue}
        if self.hpd_ranks is not None:
            d["expected_coverage"] = {"levels": levels, "hpd": self.expected_coverage(levels).tolist()}
        return d

    def __str__(self) -> str:
        worst = int(self.pvalues.argmin())
        return (f"SBC: {self.num_simulations} simulations, {self.num_draws} draws each; Bonferroni p = "
                f"{self.pvalue:.3g} over {len(self.names)} dimensions (smallest: {self.names[worst]}, "
                f"p = {float(self.pvalues[worst]):.3g})")


def _observation_slots(model, args, kwargs, observed) -> Dict[str, object]:
    """For each observed site, the argument it observes: an index of ``args`` or a key of ``kwargs``."""
    with torch.random.fork_rng(devices=[]):  # looking must not shift the simulations' draws
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    candidates = list(enumerate(args)) + list(kwargs.items())
    slots = {}
    for name in observed:
        value = trace.nodes[name]["value"]
        hits = [k for k, a in candidates if a is value]
        if not hits:
            hits = [k for k, a in candidates if isinstance(a, torch.Tensor) and a.shape == value.shape
                    and torch.equal(a, value)]
        if len(hits) != 1:
            raise ValueError(
                f"cannot tell which argument the observed site {name!r} observes ({len(hits)} match its value); "
                "pass arguments=, a function from the simulated observations {site: tensor} to the guide's "
                "(args, kwargs)"
            )
        slots[name] = hits[0]
    return slots


def _substituter(slots, args, kwargs):
    def arguments(simulated):
        new_args, new_kwargs = list(args), dict(kwargs)
        for name, key in slots.items():
            old = new_args[key] if isinstance(key, int) else new_kwargs[key]
            value = simulated[name].reshape(old.shape).to(old.dtype)
            if isinstance(key, int):
                new_args[key] = value
            else:
                new_kwargs[key] = value
        return tuple(new_args), new_kwargs

    return arguments


def _statistic_columns(statistics, values: Dict[str, torch.Tensor], draws: int, size: int) -> torch.Tensor:
    t = torch.as_tensor(statistics(values)).to(torch.float64)
    if t.shape[:2] != (draws, size) or t.dim() > 3:
        raise ValueError(f"statistics must map {{site: (M, N, ...)}} to (M, N) or (M, N, J); got shape "
                         f"{tuple(t.shape)} for M={draws}, N={size}")
    return t.reshape(draws, size, -1)


def _sbc_round(model, guide, args, kwargs, layout: _Layout, num_draws: int, arguments, statistics):
    """One batch of N simulations: ranks ``(N, D)``, HPD ranks ``(N,)`` or None, and column names."""
    sim = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    g_args, g_kwargs = arguments({n: sim.nodes[n]["value"] for n in layout.observed})
    with pyro.plate(_DRAWS, num_draws, dim=-(layout.nesting + 1)):
        draws = poutine.trace(guide).get_trace(*g_args, **g_kwargs)
    true_values = _latent_values(sim, layout.latents, layout, 1)
    draw_values = _latent_values(draws, layout.latents, layout, num_draws)
    truth, names = _columns(true_values)
    post, _ = _columns(draw_values)
    if statistics is not None:
        t_true = _statistic_columns(statistics, true_values, 1, layout.size)
        t_post = _statistic_columns(statistics, draw_values, num_draws, layout.size)
        truth, post = torch.cat([truth, t_true], -1), torch.cat([post, t_post], -1)
        names += ("statistic",) if t_true.shape[-1] == 1 else tuple(f"statistic[{j}]" for j in range(t_true.shape[-1]))
    ties = (post == truth).sum(0)
    ranks = (post < truth).sum(0) + (torch.rand(ties.shape, device=ties.device) * (ties + 1)).floor().long()
    at_truth = poutine.trace(poutine.replay(guide, trace=sim)).get_trace(*g_args, **g_kwargs)
    lq_truth = _log_density(at_truth, layout.latents, layout, 1)
    hpd = (_log_density(draws, layout.latents, layout, num_draws) > lq_truth).sum(0)
    return ranks.cpu(), hpd.cpu(), names


def sbc(
    model,
    guide,
    *args,
    num_simulations: int,
    num_draws: int = 99,
    seed: Optional[int] = 0,
    plate: str = "data",
    statistics: Optional[Callable] = None,
    arguments: Optional[Callable] = None,
    num_bins: Optional[int] = None,
    **kwargs,
) -> SBCResult:
    """Simulation-based calibration of an amortised guide q(z|x) (Talts et al., 2018).

    Each simulation draws z ~ p(z) and x ~ p(x|z) from the model itself
    (``poutine.uncondition`` turns its observed sites into draws), then L draws
    from q(z|x) for that x, and ranks each coordinate of the true z among
    them. One call of the model simulates as many datapoints as the batch in
    ``args`` holds; the values in ``args`` are not used, only their shapes (and
    any covariates, which SBC then conditions on).

    :param model: Pyro program with its observations in plate ``plate``.
    :param guide: Pyro program proposing every latent of the model.
    :param args: the pair's arguments, e.g. a batch ``x`` of shape ``(N, *event_shape)``
        (a lone tuple or dict is a batch, as in :func:`pyrovae.log_marginal`).
    :param int num_simulations: S, the number of simulated datapoints (>= 2).
    :param int num_draws: L, draws from q per simulation. L + 1 a multiple of
        the bins (99 with 20 bins) keeps the bins equally wide.
    :param int seed: seeds the simulation and the draws (the caller's generator
        state is restored); None draws from the caller's generators.
    :param str plate: name of the data plate.
    :param statistics: optional ``{site: (M, N, *shape)} -> (M, N)`` or
        ``(M, N, J)``: extra functions of the latents to rank, e.g. a norm.
    :param arguments: optional ``{observed site: tensor} -> (args, kwargs)``
        building the guide's arguments from simulated observations; by
        default each observed site replaces the argument it observes.
    :param int num_bins: bins of the uniformity test (default ``min(20, L + 1, S // 5)``).
    :returns: :class:`SBCResult`.

    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0., 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
    >>> def guide(x):  # the exact posterior
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
    >>> result = sbc(model, guide, torch.zeros(100), num_simulations=200)
    >>> result.ranks.shape, result.pvalue > 0.01
    (torch.Size([200, 1]), True)
    """
    check_int("num_simulations", num_simulations, 2)
    check_int("num_draws", num_draws, 1)
    check_int("num_bins", num_bins, 2, allow_none=True)
    for name, fn in (("statistics", statistics), ("arguments", arguments)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {fn!r}")
    pair, args, kwargs = _prepare(model, guide, args, kwargs, plate, seed)
    ranks, hpd, names = [], [], ()
    with torch.no_grad(), evaluating(pair, args, kwargs), _seeded(seed, args, kwargs):
        layout = _layout(model, guide, args, kwargs, plate, "sbc")
        if arguments is None:
            arguments = _substituter(_observation_slots(model, args, kwargs, layout.observed), args, kwargs)
        done = 0
        while done < num_simulations:
            r, h, names = _sbc_round(model, guide, args, kwargs, layout, num_draws, arguments, statistics)
            ranks.append(r)
            hpd.append(h)
            done += len(r)
    return SBCResult(torch.cat(ranks)[:num_simulations], num_draws, names, torch.cat(hpd)[:num_simulations], num_bins)


# ------------------------------------------------------------------ reweighted posterior predictive
class WeightedMean(NamedTuple):
    """A self-normalised importance-sampling mean per datapoint.

    :ivar mean: ``(N,)`` the estimate.
    :ivar stderr: ``(N,)`` its Monte Carlo standard error, ``sqrt(sum_s w_s^2 (t_s - mean)^2)``
        for normalised weights w; itself unreliable where k-hat is large.
    """

    mean: torch.Tensor
    stderr: torch.Tensor


@dataclass(frozen=True)
class ReweightedPredictive:
    """Replicated data at guide draws, with PSIS-smoothed importance weights per datapoint.

    For each datapoint x_i and draw z_s ~ q(z|x_i), ``replicates`` holds
    x_rep ~ p(x|z_s) and ``log_weights`` the smoothed, self-normalised weight of
    z_s. Weighted, the draws represent the posterior p(z|x_i); unweighted
    (``weighted=False``) they represent q, which is what the raw-q predictive of
    :func:`to_inference_data` uses. The two differ wherever q differs from the
    posterior (a shifted mean, too narrow or too wide a spread), and the
    weighted one is the posterior predictive check of the model rather than of
    the model and the guide together. Where ``khat`` exceeds
    :func:`khat_threshold` the weights, and the reweighted check, are unreliable.

    :ivar dict replicates: ``{site: (S, N, *shape)}`` replicated observations.
    :ivar dict observed: ``{site: (N, *shape)}`` the data.
    :ivar torch.Tensor log_weights: ``(S, N)`` smoothed log weights; each column's logsumexp is 0.
    :ivar torch.Tensor raw_log_weights: ``(S, N)`` ``log p(x_i, z_s) - log q(z_s|x_i)``.
    :ivar torch.Tensor khat: ``(N,)`` PSIS k-hat of each datapoint's weights.
    """

    replicates: Dict[str, torch.Tensor]
    observed: Dict[str, torch.Tensor]
    log_weights: torch.Tensor
    raw_log_weights: torch.Tensor
    khat: torch.Tensor

    @property
    def num_samples(self) -> int:
        return self.log_weights.shape[0]

    def _site(self, site: Optional[str]) -> str:
        if site is None:
            if len(self.observed) != 1:
                raise ValueError(f"the model observes several sites {sorted(self.observed)}; pass site=")
            return next(iter(self.observed))
        check_choice("site", site, self.observed)
        return site

    def weights(self, *, weighted: bool = True) -> torch.Tensor:
        """``(S, N)`` normalised weights: smoothed importance weights, or uniform ``1/S`` for raw q."""
        if weighted:
            return self.log_weights.exp()
        return torch.full_like(self.log_weights, 1.0 / self.num_samples)

    def _statistic(self, statistic, x: torch.Tensor, lead: tuple) -> torch.Tensor:
        t = torch.as_tensor(statistic(x)).to(torch.float64)
        if tuple(t.shape) != lead:
            raise ValueError(f"statistic must reduce the event dims only: expected shape {lead}, got {tuple(t.shape)}")
        return t

    def mean(self, statistic: Callable, *, site: Optional[str] = None, weighted: bool = True) -> WeightedMean:
        """Posterior predictive mean of ``statistic(x_rep)`` per datapoint, with its Monte Carlo error.

        :param statistic: maps ``(..., *shape)`` to ``(...)``.
        """
        site = self._site(site)
        t = self._statistic(statistic, self.replicates[site], tuple(self.log_weights.shape))
        w = self.weights(weighted=weighted).to(t.device)
        m = (w * t).sum(0)
        return WeightedMean(m, (w.pow(2) * (t - m).pow(2)).sum(0).sqrt())

    def pvalues(self, statistic: Callable, *, site: Optional[str] = None, weighted: bool = True) -> torch.Tensor:
        """Per-datapoint p-values ``P(T(x_rep) >= T(x_i))`` (ties count one half): ``(N,)``.

        Values near 0 or 1 flag datapoints the model does not reproduce.
        """
        site = self._site(site)
        t_rep = self._statistic(statistic, self.replicates[site], tuple(self.log_weights.shape))
        t_obs = self._statistic(statistic, self.observed[site], tuple(self.log_weights.shape[1:]))
        hit = (t_rep > t_obs).double() + 0.5 * (t_rep == t_obs).double()
        return (self.weights(weighted=weighted).to(hit.device) * hit).sum(0)

    def resample(self, num_samples: int, *, weighted: bool = True, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Unweighted replicated data sets: ``{site: (R, N, *shape)}``, each datapoint's draw
        picked by its weights independently (the datapoints' posteriors are independent)."""
        check_int("num_samples", num_samples)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        w = self.weights(weighted=weighted).detach().cpu().T  # (N, S)
        idx = torch.multinomial(w, num_samples, replacement=True, generator=gen).T  # (R, N)
        out = {}
        for name, rep in self.replicates.items():
            cols = torch.arange(rep.shape[1])
            out[name] = rep[idx.to(rep.device), cols.to(rep.device)]
        return out

    def data_pvalue(self, statistic: Callable, *, site: Optional[str] = None, num_replicates: int = 1000,
                    weighted: bool = True, seed: int = 0) -> float:
        """p-value ``P(T(X_rep) >= T(X))`` of a whole-data statistic (ties count one half).

        :param statistic: maps a data set ``(..., N, *shape)`` to ``(...)``, e.g.
            the spread of the datapoints' mean intensities.
        """
        site = self._site(site)
        reps = self.resample(num_replicates, weighted=weighted, seed=seed)[site]
        t_rep = self._statistic(statistic, reps, (num_replicates,))
        t_obs = self._statistic(statistic, self.observed[site], ())
        return float(((t_rep > t_obs).double() + 0.5 * (t_rep == t_obs).double()).mean())

    def check(self, statistic: Callable, *, name: str, site: Optional[str] = None, num_replicates: int = 100,
              seed: int = 0) -> "PPCStatistic":
        """Everything a check of ``statistic`` needs, raw q and reweighted: see :class:`PPCStatistic`.

        :param statistic: maps ``(..., *shape)`` to ``(...)``.
        :param str name: what the statistic is, for reports and plots.
        :param int num_replicates: R, resampled replicated data sets for whole-data p-values.
        """
        site = self._site(site)
        lead = tuple(self.log_weights.shape[1:])
        t_obs = self._statistic(statistic, self.observed[site], lead).cpu()
        reps = {w: self.resample(num_replicates, weighted=w, seed=seed)[site] for w in (True, False)}
        t_rep = {w: self._statistic(statistic, r, (num_replicates,) + lead).cpu() for w, r in reps.items()}
        return PPCStatistic(name, t_obs, t_rep[True], t_rep[False],
                            self.pvalues(statistic, site=site).cpu(), self.pvalues(statistic, site=site, weighted=False).cpu())

    def to_inference_data(self, *, num_samples: int = 500, seed: int = 0):
        """ArviZ ``InferenceData`` with resampled ``posterior_predictive`` draws (dims
        ``(chain=1, draw, obs, ...)``) and ``observed_data``, for ``az.plot_ppc``."""
        az = _arviz()
        reps = self.resample(num_samples, seed=seed)
        dims = {k: ["obs"] + [f"{k}_dim_{i}" for i in range(v.dim() - 1)] for k, v in self.observed.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ArviZ notes "obs" has no coords
            return az.from_dict(
                posterior_predictive={k: v.detach().cpu().numpy()[None] for k, v in reps.items()},
                observed_data={k: v.detach().cpu().numpy() for k, v in self.observed.items()},
                dims=dims,
            )


@dataclass(frozen=True)
class PPCStatistic:
    """One statistic T of a posterior predictive check, from the reweighted posterior and from raw q.

    How to read it: per-datapoint p-values pile up near 0 or 1 (``extreme_fraction``
    well above 5%) where the model does not reproduce T for individual
    datapoints; a whole-data p-value near 0 or 1 (``data_pvalue``) where the
    replicated data sets as a whole differ from the data, e.g. in the spread of
    T across datapoints. Where raw q flags a datapoint and the reweighted check
    does not, the guide, not the model, is at fault.

    :ivar name: what T is.
    :ivar observed: ``(N,)`` T(x_i).
    :ivar replicated: ``(R, N)`` T of R replicated data sets, drawn from the reweighted posterior.
    :ivar replicated_raw: ``(R, N)`` the same from raw q.
    :ivar pvalues: ``(N,)`` per-datapoint ``P(T(x_rep) >= T(x_i))``, reweighted (ties count one half).
    :ivar pvalues_raw: ``(N,)`` the same from raw q.
    """

    name: str
    observed: torch.Tensor
    replicated: torch.Tensor
    replicated_raw: torch.Tensor
    pvalues: torch.Tensor
    pvalues_raw: torch.Tensor

    def data_pvalue(self, statistic: Callable, *, weighted: bool = True) -> float:
        """``P(S(T(X_rep)) >= S(T(X)))`` for a whole-data summary S of ``(..., N)`` values, e.g. ``lambda t: t.std(-1)``."""
        rep = self.replicated if weighted else self.replicated_raw
        s_rep, s_obs = statistic(rep.double()), statistic(self.observed.double())
        return float(((s_rep > s_obs).double() + 0.5 * (s_rep == s_obs).double()).mean())

    def extreme_fraction(self, *, weighted: bool = True, level: float = 0.05) -> float:
        """Fraction of datapoints whose p-value lies in either ``level / 2`` tail."""
        p = self.pvalues if weighted else self.pvalues_raw
        return float(((p < level / 2) | (p > 1 - level / 2)).double().mean())

    def to_dict(self) -> dict:
        """JSON-able summary: the data's mean and sd of T, and for ``reweighted`` and ``raw``
        the replicates' mean and sd, whole-data p-values of the mean and sd, and the extreme fraction."""
        def side(weighted):
            rep = self.replicated if weighted else self.replicated_raw
            return {"replicated_mean": float(rep.double().mean()), "replicated_sd": float(rep.double().std(-1).mean()),
                    "pvalue_mean": self.data_pvalue(lambda t: t.mean(-1), weighted=weighted),
                    "pvalue_sd": self.data_pvalue(lambda t: t.std(-1), weighted=weighted),
                    "extreme_fraction": self.extreme_fraction(weighted=weighted)}

        return {"name": self.name, "observed_mean": float(self.observed.double().mean()),
                "observed_sd": float(self.observed.double().std()), "reweighted": side(True), "raw": side(False)}

    @staticmethod
    def cat(parts: Sequence["PPCStatistic"]) -> "PPCStatistic":
        """Join checks of the same statistic on consecutive batches of datapoints."""
        if not parts or len({p.name for p in parts}) != 1:
            raise ValueError("parts must be a non-empty list of checks of one statistic")
        return PPCStatistic(parts[0].name, *(torch.cat([getattr(p, f) for p in parts], -1) for f in
                                             ("observed", "replicated", "replicated_raw", "pvalues", "pvalues_raw")))


def reweighted_predictive(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    chunk_size: Optional[int] = None,
    plate: str = "data",
    seed: Optional[int] = 0,
    **kwargs,
) -> ReweightedPredictive:
    """Posterior predictive draws for every datapoint, importance-reweighted towards the posterior.

    Draws z_s ~ q(z|x_i), S per datapoint, x_rep ~ p(x|z_s) from the model
    (``poutine.uncondition`` on its observed sites), and weights each draw by
    ``p(x_i, z_s) / q(z_s|x_i)``, Pareto-smoothed (PSIS, through ArviZ) and
    normalised per datapoint. Draws and weights come from the particle pass of
    :mod:`pyrovae.weights`, as for :func:`pyrovae.log_marginal`.

    :param args: the pair's arguments, e.g. a batch ``x`` of shape ``(N, *event_shape)``.
    :param int num_samples: S >= 2; k-hat needs S >= :func:`khat_min_draws`.
    :param int chunk_size: draws per vectorised pass (default ``max(1, 32768 // N)``).
    :param str plate: name of the data plate.
    :param int seed: seeds the draws (the caller's generator state is restored); None: unseeded.
    :returns: :class:`ReweightedPredictive`; its tensors hold ``S * N`` replicated
        datapoints, so pass a modest batch.

    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0., 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
    >>> def guide(x):  # too wide and shifted: the weights correct it
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(x / 2 + 0.3, 1.0))
    >>> ppc = reweighted_predictive(model, guide, torch.tensor([0.0, 2.0]), num_samples=4000)
    >>> exact = torch.tensor([0.0, 1.0])  # the posterior predictive mean of x_rep is x / 2
    >>> bool(((ppc.mean(lambda t: t).mean - exact).abs() < 0.15).all())
    True
    """
    check_int("num_samples", num_samples, 2)
    check_int("chunk_size", chunk_size, allow_none=True)
    pair, args, kwargs = _prepare(model, guide, args, kwargs, plate, seed)
    with torch.no_grad(), evaluating(pair, args, kwargs), _seeded(seed, args, kwargs):
        structure = inspect_pair(model, guide, args, kwargs, plate=plate)
        weights = log_weights(model, guide, args, kwargs, structure, num_particles=num_samples, keep_traces=True,
                              chunk_size=chunk_size or max(1, _PAIRS_PER_PASS // structure.size),
                              networks=pair.called_modules())
        traces = posterior_traces(model, args, kwargs, structure, weights.passes)
        replicated = predictive_traces(model, args, kwargs, structure, traces)
    raw = weights.log_weights
    if torch.isnan(raw).any() or not (raw.max(0).values > -math.inf).all() or (raw == math.inf).any():
        bad = (torch.isnan(raw).any(0) | ~(raw.max(0).values > -math.inf) | (raw == math.inf).any(0)).nonzero()
        raise ValueError(f"the importance weights are NaN, infinite or all zero for datapoints {bad[:5, 0].tolist()}: "
                         "the data lie outside the model's support or the guide misses the posterior")
    observed = {n: datapoint_major(structure.model_trace.nodes[n], structure, vectorized=False)[0].contiguous()
                for n in structure.observed}
    replicates = {n: _stacked(replicated, n, structure) for n in structure.observed}
    return ReweightedPredictive(replicates, observed, _psis(raw), raw, psis_khat(raw, tol=weights.roundoff))


def _stacked(traces, site: str, structure) -> torch.Tensor:
    """``(S, N, ...)`` values of ``site`` over the vectorised or sequential traces of :mod:`pyrovae.weights`."""
    parts = []
    for trace, vectorized in traces:
        value, _ = datapoint_major(trace.nodes[site], structure, vectorized)
        parts.append(value if vectorized else value.unsqueeze(0))
    return torch.cat(parts)


# ------------------------------------------------------------------ model comparison
@dataclass(frozen=True)
class ComparisonRow:
    """One model of a :class:`ComparisonResult`; log p(x) figures in nats per datapoint.

    :ivar log_marginal: mean of the per-datapoint log p(x_i) estimates.
    :ivar data_stderr: their standard deviation / sqrt(N): the error as an
        estimate for the population the data came from.
    :ivar mc_stderr: Monte Carlo error of the mean, from K particles.
    :ivar difference: paired mean difference ``mean_i(log p_this(x_i) - log p_best(x_i))``, <= 0.
    :ivar difference_stderr: standard deviation of those per-datapoint
        differences / sqrt(N); much smaller than the unpaired error when the
        models agree on which datapoints are hard.
    :ivar difference_mc_stderr: Monte Carlo error of the difference.
    :ivar num_particles: K.
    :ivar unreliable_fraction: datapoints with k-hat above :func:`khat_threshold`.
    :ivar reliable: False when more than 10% of datapoints are unreliable, or K
        is too small for a tail fit (:func:`khat_min_draws`).
    """

    name: str
    log_marginal: float
    data_stderr: float
    mc_stderr: float
    difference: float
    difference_stderr: float
    difference_mc_stderr: float
    num_particles: int
    unreliable_fraction: float
    reliable: bool


@dataclass(frozen=True)
class ComparisonResult:
    """Models scored on the same datapoints, best first (see :func:`compare`).

    :ivar rows: one :class:`ComparisonRow` per model, by decreasing mean log p(x).
    :ivar num_datapoints: N.
    :ivar warnings: what makes any figure untrustworthy, in words (empty if nothing).
    """

    rows: Tuple[ComparisonRow, ...]
    num_datapoints: int
    warnings: Tuple[str, ...] = ()

    def __getitem__(self, name: str) -> ComparisonRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"num_datapoints": self.num_datapoints, "warnings": list(self.warnings),
                "models": [dict(r.__dict__) for r in self.rows]}

    def __str__(self) -> str:
        lines = [f"WARNING: {w}" for w in self.warnings]
        lines.append(f"log p(x), nats per datapoint, N={self.num_datapoints} (paired differences to the best model):")
        for r in self.rows:
            diff = "best" if r is self.rows[0] else \
                f"{r.difference:+.3f} ± {r.difference_stderr:.3f} (data) ± {r.difference_mc_stderr:.3f} (MC)"
            flag = "" if r.reliable else "  [UNRELIABLE]"
            lines.append(f"  {r.name}: {r.log_marginal:.3f} ± {r.data_stderr:.3f} (data), K={r.num_particles}; "
                         f"{diff}{flag}")
        return "\n".join(lines)


def _reliability_warning(name: str, lm) -> Optional[str]:
    k = lm.num_particles
    khat = lm.khat.detach().cpu().double()
    if torch.isnan(khat).any():
        return f"{name}: k-hat was not computed, so the reliability of its estimate is unknown"
    if k < khat_min_draws():
        return (f"{name}: K={k} draws are too few for a tail fit (K >= {khat_min_draws()} needed), so the "
                "reliability of its estimate is unknown")
    unreliable = _unreliable(khat, k)
    if unreliable > UNRELIABLE_LIMIT:
        return (f"{name}: {100 * unreliable:.1f}% of datapoints have k-hat above {khat_threshold(k):.2f} (K={k}); "
                "its log p(x) and the differences involving it are not trustworthy: improve the guide, then "
                "re-estimate")
    return None


def compare(results: Mapping[str, object]) -> ComparisonResult:
    """Compare models by their per-datapoint log p(x) on the same data, paired.

    Each value is a :class:`~pyrovae.LogMarginal` computed on the same
    datapoints in the same order (this is what makes the differences paired;
    it is checked by length only). For held-out data, the mean log p(x) is the
    expected log predictive density and needs no leave-one-out correction.

    How to read it: a difference of a few ``difference_stderr`` (data) is a
    real difference for this data distribution. A model flagged unreliable has
    an estimate that may be far off, usually too low; a
    :class:`UnreliableEstimateWarning` is also issued.

    :param results: ``{name: LogMarginal}``, at least two.
    :returns: :class:`ComparisonResult`, best model first.

    >>> from pyrovae.importance import LogMarginal
    >>> def estimate(values):  # per-datapoint log p(x), exact (zero error, k-hat 0), K = 100
    ...     n = len(values)
    ...     return LogMarginal(log_marginal=torch.tensor(values), stderr=torch.zeros(n),
    ...                        ess=torch.full((n,), 100.0), khat=torch.zeros(n), num_particles=100)
    >>> a, b = estimate([-1.0, -2.0, -3.0]), estimate([-1.5, -2.4, -3.6])
    >>> result = compare({"a": a, "b": b})
    >>> result.rows[0].name, round(result["b"].difference, 3)
    ('a', -0.5)
    """
    if not isinstance(results, Mapping) or len(results) < 2:
        raise TypeError(f"results must be a dict of at least two {{name: LogMarginal}}, got {results!r}")
    for name, lm in results.items():
        if not isinstance(name, str) or not all(hasattr(lm, a) for a in ("log_marginal", "stderr", "khat", "num_particles")):
            raise TypeError(f"results must map names (str) to LogMarginal results; got {name!r}: {type(lm).__name__}")
    sizes = {name: len(lm.log_marginal) for name, lm in results.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the results must cover the same datapoints, got sizes {sizes}")
    n = next(iter(sizes.values()))
    lm = {k: v.log_marginal.detach().cpu().double() for k, v in results.items()}
    se = {k: v.stderr.detach().cpu().double() for k, v in results.items()}
    best = max(lm, key=lambda k: float(lm[k].mean()))
    notes = {k: _reliability_warning(k, v) for k, v in results.items()}
    rows = []
    for name in sorted(lm, key=lambda k: -float(lm[k].mean())):
        d = lm[name] - lm[best]
        rows.append(ComparisonRow(
            name=name, log_marginal=float(lm[name].mean()),
            data_stderr=float(lm[name].std() / math.sqrt(n)) if n > 1 else math.nan,
            mc_stderr=float(se[name].pow(2).sum().sqrt() / n),
            difference=float(d.mean()),
            difference_stderr=float(d.std() / math.sqrt(n)) if n > 1 else math.nan,
            difference_mc_stderr=0.0 if name == best else float((se[name].pow(2) + se[best].pow(2)).sum().sqrt() / n),
            num_particles=results[name].num_particles,
            unreliable_fraction=_unreliable(results[name].khat, results[name].num_particles),
            reliable=notes[name] is None,
        ))
    notes = tuple(w for w in notes.values() if w is not None)
    for note in notes:
        warnings.warn(note, UnreliableEstimateWarning, stacklevel=2)
    return ComparisonResult(tuple(rows), n, notes)


# ------------------------------------------------------------------ posterior collapse
@dataclass(frozen=True)
class ActiveUnits:
    """Activity of each latent coordinate (Burda et al., 2016).

    How to read it: the activity ``A_u = Var_x(E_q[z_u | x])`` is how much the
    guide's mean of coordinate u moves with the data. A unit whose activity is
    below ``threshold`` (0.01 for a standard Normal prior) returns about the
    same posterior for every x: it carries no information about x, it has
    collapsed to the prior, and the decoder learns to ignore it.

    :ivar names: a label per latent coordinate.
    :ivar activity: ``(D,)`` float64.
    :ivar threshold: the activity a unit needs to count as active.
    :ivar exact_means: True when E_q[z|x] was read from the guide's distribution,
        False when it was estimated from draws (then corrected for their noise).
    """

    names: Tuple[str, ...]
    activity: torch.Tensor
    threshold: float
    exact_means: bool = True

    @property
    def active(self) -> torch.Tensor:
        """``(D,)`` bool: activity above the threshold."""
        return self.activity > self.threshold

    @property
    def count(self) -> int:
        return int(self.active.sum())

    def __str__(self) -> str:
        return (f"{self.count} of {len(self.names)} latent units active (activity above {self.threshold:g}): "
                + ", ".join(f"{n} {float(a):.3g}" for n, a in zip(self.names, self.activity)))


def _posterior_means(guide, args, kwargs, layout: _Layout, num_samples: int):
    """E_q[z|x] per datapoint ``(N, D)``, names, and the Monte Carlo variance of each mean (None when exact).

    The guide's distribution gives the mean exactly when it has one latent site
    (with several, a site's distribution is conditional on the others' draws).
    """
    if len(layout.latents) == 1:
        site = poutine.trace(guide).get_trace(*args, **kwargs).nodes[layout.latents[0]]
        try:
            mean = site["fn"].mean.expand(site["fn"].shape())
        except NotImplementedError:
            mean = None
        if mean is not None and torch.isfinite(mean).all():
            values = {layout.latents[0]: _by_datapoint(mean, layout, 1, site["fn"].event_dim)}
            cols, names = _columns(values)
            return cols[0], names, None
    with pyro.plate(_DRAWS, num_samples, dim=-(layout.nesting + 1)):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    cols, names = _columns(_latent_values(trace, layout.latents, layout, num_samples))
    return cols.mean(0), names, cols.var(0) / num_samples


def _activity(guide, args, kwargs, layout: _Layout, num_samples: int, threshold: float) -> ActiveUnits:
    if layout.size < 2:
        raise ValueError("active units need at least 2 datapoints: the activity is a variance over the data")
    means, names, mc_var = _posterior_means(guide, args, kwargs, layout, num_samples)
    activity = means.var(0)
    if mc_var is not None:  # the draws' noise inflates the variance of estimated means by E_x[Var(mean)]
        activity = (activity - mc_var.mean(0)).clamp(min=0)
    return ActiveUnits(names, activity.cpu(), threshold, mc_var is None)


def active_units(
    model,
    guide,
    *args,
    threshold: float = 0.01,
    num_samples: int = 100,
    plate: str = "data",
    seed: Optional[int] = 0,
    **kwargs,
) -> ActiveUnits:
    """Count the latent coordinates whose posterior mean moves with the data (Burda et al., 2016).

    :param args: the pair's arguments, e.g. a batch ``x`` of shape ``(N, *event_shape)``, N >= 2;
        use a few hundred datapoints or more.
    :param float threshold: activity needed to count as active (0.01 in Burda et al.).
    :param int num_samples: draws per datapoint when the mean must be estimated.
    :param str plate: name of the data plate.
    :param int seed: seeds those draws; None: unseeded.
    :returns: :class:`ActiveUnits`.

    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
    ...         pyro.sample("x", dist.Normal(z[:, :1], 1.).to_event(1), obs=x)
    >>> def guide(x):  # z[1] ignores x: collapsed
    ...     with pyro.plate("data", len(x)):
    ...         loc = torch.cat([x / 2, torch.zeros_like(x)], -1)
    ...         pyro.sample("z", dist.Normal(loc, torch.tensor([0.7, 1.0])).to_event(1))
    >>> active_units(model, guide, torch.randn(500, 1)).count
    1
    """
    threshold = check_float("threshold", threshold)
    check_int("num_samples", num_samples, 2)
    pair, args, kwargs = _prepare(model, guide, args, kwargs, plate, seed)
    with torch.no_grad(), evaluating(pair, args, kwargs), _seeded(seed, args, kwargs):
        layout = _layout(model, guide, args, kwargs, plate, "active_units")
        return _activity(guide, args, kwargs, layout, num_samples, threshold)


@dataclass(frozen=True)
class LatentUsage:
    """How a fitted pair uses its latents, in nats per datapoint (see :func:`latent_usage`).

    The ELBO splits as ``reconstruction - kl`` and, averaged over the data, the
    KL term splits again (Hoffman & Johnson, 2016) as
    ``kl = mutual_information + marginal_kl``: the information z carries about
    x under q, plus how far the aggregate posterior q(z) = mean_i q(z|x_i) is
    from the prior.

    How to read it: a coordinate with KL near 0 and activity below the
    threshold has collapsed. A mutual information near 0 means the latents are
    unused altogether; it can be at most log N, so a value near ``log N`` says
    the data are too few to measure more. A large ``marginal_kl`` means the
    prior is a poor model of where the encodings lie: samples from the prior
    decode to unlike data.

    :ivar units: :class:`ActiveUnits`.
    :ivar kl_names: a label per entry of ``kl``: a coordinate for guides that
        factorise over coordinates, else a whole site.
    :ivar kl: ``(len(kl_names),)`` mean KL(q(z_u|x) || p(z_u)) over the data;
        analytic where torch registers it, else Monte Carlo.
    :ivar reconstruction: E_x E_q[log p(x|z)], Monte Carlo.
    :ivar mutual_information: estimate of I_q(x; z) over these N datapoints.
    :ivar num_datapoints: N.
    :ivar num_samples: draws per datapoint.
    """

    units: ActiveUnits
    kl_names: Tuple[str, ...]
    kl: torch.Tensor
    reconstruction: float
    mutual_information: float
    num_datapoints: int
    num_samples: int

    @property
    def kl_total(self) -> float:
        return float(self.kl.sum())

    @property
    def elbo(self) -> float:
        """``reconstruction - kl_total``."""
        return self.reconstruction - self.kl_total

    @property
    def marginal_kl(self) -> float:
        """KL(q(z) || p(z)) = ``kl_total - mutual_information``."""
        return self.kl_total - self.mutual_information

    def to_dict(self) -> dict:
        return {
            "active_units": self.units.count, "threshold": self.units.threshold,
            "dimensions": list(self.units.names), "activity": self.units.activity.tolist(),
            "kl_dimensions": list(self.kl_names), "kl_per_dimension": self.kl.tolist(),
            "elbo": self.elbo, "reconstruction": self.reconstruction, "kl": self.kl_total,
            "mutual_information": self.mutual_information, "mutual_information_max": math.log(self.num_datapoints),
            "marginal_kl": self.marginal_kl, "num_datapoints": self.num_datapoints, "num_samples": self.num_samples,
        }

    def plot(self, path):
        """Activity and KL per latent coordinate, and the ELBO split (a PNG)."""
        from . import plots

        return plots.plot_collapse(self, path)

    def __str__(self) -> str:
        return (f"{self.units.count} of {len(self.units.names)} units active; ELBO {self.elbo:.3f} = "
                f"reconstruction {self.reconstruction:.3f} - KL {self.kl_total:.3f}; KL = mutual information "
                f"{self.mutual_information:.3f} (at most log N = {math.log(self.num_datapoints):.3f}) + marginal KL "
                f"{self.marginal_kl:.3f} nats per datapoint")


def _factors(fn):
    """``(univariate base, reinterpreted dims)`` if ``fn`` is a product over its coordinates, else None."""
    dims = 0
    while isinstance(fn, torch.distributions.Independent):
        dims, fn = dims + fn.reinterpreted_batch_ndims, fn.base_dist
    return (fn, dims) if fn.event_dim == 0 else None


def _site_kl(q, p, z):
    """KL(q || p) at the draws ``z``: analytic where torch registers it, else the single-draw estimate."""
    try:
        return torch.distributions.kl_divergence(q, p).expand(z.shape[: z.dim() - q.event_dim])
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z)


def _kl_terms(p: _Pass, layout: _Layout, num: int):
    """Mean KL per coordinate (or per site, where the guide does not factorise): names and ``(K,)``."""
    names, terms = [], []
    for name in layout.latents:
        q, prior, z = p.guide.nodes[name]["fn"], p.model.nodes[name]["fn"], p.guide.nodes[name]["value"]
        fq, fp = _factors(q), _factors(prior)
        if fq is not None and fp is not None and fq[1] == fp[1]:
            kl = _by_datapoint(_site_kl(fq[0], fp[0], z), layout, num, fq[1]).to(torch.float64)
            kl = kl.reshape(num, layout.size, -1).mean((0, 1))
            names += [name] if fq[1] == 0 else [f"{name}[{i}]" for i in range(len(kl))]
        else:
            kl = _by_datapoint(_site_kl(q, prior, z), layout, num).to(torch.float64)
            kl = kl.reshape(num, layout.size, -1).sum(-1).mean().reshape(1)
            names.append(name)
        terms.append(kl)
    return tuple(names), torch.cat(terms).cpu()


def _mutual_information(guide, args, kwargs, layout: _Layout, p: _Pass, num: int, chunk_pairs: int) -> float:
    """I_q(x; z) = E[log q(z|x_i) - log q(z)] with q(z) = mean_j q(z|x_j) over the N datapoints."""
    if layout.nesting != 1:
        raise ValueError("the mutual information needs every latent site in the data plate alone (no other plates)")
    n = layout.size
    log_q_self = _log_density(p.guide, layout.latents, layout, num)  # (S, N)
    sources = {k: v.reshape(num * n, *v.shape[2:]) for k, v in _latent_values(p.guide, layout.latents, layout, num).items()}
    chunk = max(1, chunk_pairs // n)
    aggregate = []
    for start in range(0, num * n, chunk):
        values = {k: v[start: start + chunk, None].expand(-1, n, *v.shape[1:]) for k, v in sources.items()}
        c = next(iter(values.values())).shape[0]
        with pyro.plate(_DRAWS, c, dim=-2):
            trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(*args, **kwargs)
        log_q = _log_density(trace, layout.latents, layout, c)  # (c, N): log q(z_m | x_j)
        aggregate.append(torch.logsumexp(log_q, 1) - math.log(n))
    return float((log_q_self.reshape(-1) - torch.cat(aggregate)).mean())


def latent_usage(
    model,
    guide,
    *args,
    num_samples: int = 10,
    threshold: float = 0.01,
    chunk_size: Optional[int] = None,
    plate: str = "data",
    seed: Optional[int] = 0,
    **kwargs,
) -> LatentUsage:
    """Collapse diagnostics of a fitted pair: active units, KL per coordinate, the ELBO split, I_q(x; z).

    The mutual information uses the aggregate posterior over the N datapoints
    given, so it costs ``S * N * N`` guide densities (chunked by
    ``chunk_size`` pairs) and is biased low for small N; it needs a guide whose
    latent sites lie in the data plate alone.

    :param args: the pair's arguments, e.g. a batch ``x`` of shape ``(N, *event_shape)``, N >= 2.
    :param int num_samples: S, draws per datapoint.
    :param float threshold: activity threshold of :func:`active_units`.
    :param int chunk_size: guide densities per vectorised pass of the mutual information (default 2**18).
    :param str plate: name of the data plate.
    :param int seed: seeds the draws; None: unseeded.
    :returns: :class:`LatentUsage`.

    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
    ...         pyro.sample("x", dist.Normal(z[:, :1], 1.).to_event(1), obs=x)
    >>> def guide(x):  # the exact posterior: z[0] | x ~ N(x / 2, 1/2), z[1] the prior
    ...     with pyro.plate("data", len(x)):
    ...         loc = torch.cat([x / 2, torch.zeros_like(x)], -1)
    ...         pyro.sample("z", dist.Normal(loc, torch.tensor([0.5 ** 0.5, 1.0])).to_event(1))
    >>> x = torch.randn(200, 1) * 2 ** 0.5  # x ~ p(x)
    >>> usage = latent_usage(model, guide, x)
    >>> usage.units.count, [round(k, 1) for k in usage.kl.tolist()]  # E_x KL = (log 2) / 2 for z[0]
    (1, [0.3, 0.0])
    """
    check_int("num_samples", num_samples, 1)
    threshold = check_float("threshold", threshold)
    check_int("chunk_size", chunk_size, allow_none=True)
    pair, args, kwargs = _prepare(model, guide, args, kwargs, plate, seed)
    with torch.no_grad(), evaluating(pair, args, kwargs), _seeded(seed, args, kwargs):
        layout = _layout(model, guide, args, kwargs, plate, "latent_usage")
        units = _activity(guide, args, kwargs, layout, max(num_samples, 2), threshold)
        p = _particle_pass(model, guide, args, kwargs, layout, num_samples)
        reconstruction = float(_log_density(p.model, layout.observed, layout, num_samples).mean())
        kl_names, kl = _kl_terms(p, layout, num_samples)
        mi = _mutual_information(guide, args, kwargs, layout, p, num_samples, chunk_size or 8 * _PAIRS_PER_PASS)
    return LatentUsage(units, kl_names, kl, reconstruction, mi, layout.size, num_samples)
