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

import math
import warnings
from typing import Callable

import numpy as np
import torch
import pyro
from pyro import poutine

__all__ = [
    "psis_khat",
    "khat_threshold",
    "unreliable_fraction",
    "to_inference_data",
    "ppc_pvalues",
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


def psis_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS Pareto k-hat for each datapoint, through ArviZ's ``psislw``.

    :param torch.Tensor log_weights: shape ``(K, N)``: K draws for each of N datapoints.
    :returns: tensor of shape ``(N,)`` (float64, on the CPU). Where K is too
        small for a tail fit, ArviZ returns ``inf``, read as "unreliable".
    """
    if not isinstance(log_weights, torch.Tensor) or log_weights.dim() != 2:
        raise ValueError(f"log_weights must be a (K, N) tensor, got {getattr(log_weights, 'shape', log_weights)!r}")
    lw = log_weights.detach().to("cpu", torch.float64).T.contiguous().numpy()
    az = _arviz()
    with warnings.catch_warnings():
        # ArviZ warns when k-hat is high or the tail is short; the value says it already.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        _, kss = az.psislw(lw, reff=1.0)
    return torch.as_tensor(np.asarray(kss, dtype=np.float64)).reshape(-1)


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
    x: torch.Tensor,
    *,
    num_samples: int = 100,
    num_chains: int = 4,
    plate: str = "data",
    posterior_predictive: bool = True,
):
    """Draw from the guide and export draws and diagnostics as ArviZ ``InferenceData``.

    Groups:

    * ``posterior``: each latent site of the data plate, dims
      ``(chain=1, draw, obs, <site>_dim_0, ...)``, drawn from q(z|x);
    * ``posterior_predictive`` (optional): the observed sites re-sampled from
      p(x|z) at those draws, dims ``(chain, draw, obs, ...)``;
    * ``observed_data``: ``x``;
    * ``sample_stats``: ``log_weight`` (chain, draw, obs), and per datapoint
      ``khat``, ``ess`` and ``log_marginal`` (dims ``(obs,)``) from these draws.

    :param x: data of shape ``(N, *event_shape)``, passed as ``model(x)``/``guide(x)``.
    :param int num_samples: draws per datapoint (>= 2).
    :param int num_chains: the i.i.d. draws are laid out as this many chains of
        ``num_samples // num_chains`` draws, so that ArviZ's multi-chain
        diagnostics (r-hat) apply; they should read ~1 for independent draws.
    :returns: ``arviz.InferenceData``, ready for ``az.summary`` and ArviZ plots.
    """
    from .importance import _PARTICLE_PLATE, _inspect, _particle_pass, _sample_sites

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    az = _arviz()
    import xarray as xr

    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or not 1 <= num_chains <= num_samples:
        raise ValueError(f"num_chains must be an int in [1, num_samples], got {num_chains!r}")
    S = num_samples - num_samples % num_chains
    with torch.no_grad():
        plate_dim, n, nesting = _inspect(model, guide, (x,), {}, plate)
        lw, (guide_trace, model_trace) = _particle_pass(model, guide, (x,), {}, S, plate_dim, nesting, n)
        rep_trace = None
        if posterior_predictive:
            with pyro.plate(_PARTICLE_PLATE, S, dim=-(nesting + 1)):
                rep_trace = poutine.trace(
                    poutine.uncondition(poutine.replay(model, trace=guide_trace))
                ).get_trace(x)

    def draws(trace, names=None):
        # Unobserved sites of `trace` (all of them, or those in `names`) as (chain, draw, obs, ...).
        out, dims = {}, {}
        for name, site in _sample_sites(trace, observed=False):
            if names is not None and name not in names:
                continue
            value = site["value"].detach().cpu()
            value = value.expand(S, *value.shape[1:]) if value.shape[0] == 1 else value
            event = value.shape[2:] if value.dim() >= 2 else ()
            value = value.reshape(S, n, *event)
            out[name] = value.reshape(num_chains, S // num_chains, n, *event).numpy()
            dims[name] = ["obs"] + [f"{name}_dim_{i}" for i in range(len(event))]
        return out, dims

    obs_names = {name for name, _ in _sample_sites(model_trace, observed=True)}
    posterior, dims = draws(guide_trace)
    # Under uncondition the observed sites are re-sampled, hence unobserved in rep_trace.
    predictive, pdims = draws(rep_trace, obs_names) if rep_trace is not None else ({}, {})
    observed = {}
    for name in obs_names:
        value = model_trace.nodes[name]["value"].detach().cpu()
        observed[name] = value.reshape(n, *value.shape[-(value.dim() - 1):]) if value.dim() > 1 else value.reshape(n)
        observed[name] = observed[name].numpy()
    dims.update(pdims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ notes "obs" has no coords
        idata = az.from_dict(
            posterior=posterior,
            posterior_predictive=predictive or None,
            observed_data=observed,
            sample_stats={"log_weight": lw.cpu().reshape(num_chains, S // num_chains, n).numpy()},
            dims={**dims, "log_weight": ["obs"]},
        )
    lse = torch.logsumexp(lw, 0)
    log_marginal = lse - math.log(S)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    idata.sample_stats["khat"] = xr.DataArray(psis_khat(lw).numpy(), dims=["obs"])
    idata.sample_stats["ess"] = xr.DataArray(ess.cpu().numpy(), dims=["obs"])
    idata.sample_stats["log_marginal"] = xr.DataArray(log_marginal.cpu().numpy(), dims=["obs"])
    return idata
