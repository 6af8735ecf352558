"""Per-datapoint log p(x) by importance sampling, with the guide as proposal.

For each datapoint x_i in the data plate, with K particles z_k ~ q(z | x_i)::

    log w_ik   = log p(x_i, z_k) - log q(z_k | x_i)
    log p(x_i) ~= log (1/K) sum_k w_ik

The estimate is unbiased for p(x_i) and, by Jensen, biased low for log p(x_i)
by about ``stderr**2 / 2``; it is the IWAE-K bound (Burda et al., 2016) and
increases towards log p(x_i) as K grows.

Log-densities are read from traces of the model and the guide (replayed on
the guide's draws), never written by hand, so they agree with what training
optimised. They are read unscaled: ``poutine.scale`` (β, KL warm-up) and
plate subsampling scales do not leak into the estimate.

Why per datapoint: Pyro's ``Importance``, ``vectorized_importance_weights``
and ``psis_diagnostic`` weight a whole batch jointly, one weight per particle
for the product over all datapoints, whose variance grows exponentially with
the batch size. Here each datapoint has its own weights, so its own error bar,
effective sample size and Pareto k-hat.

**Global latents.** A latent site outside the data plate is shared by all
datapoints, so p(x) does not factorise over them and there is no per-datapoint
log p(x_i). :func:`log_marginal` refuses such models with a ``ValueError``
naming the sites. Make the global a ``pyro.param`` (a point estimate), or fix
it and hide it, ``poutine.block(poutine.condition(model, {"mu": v}), hide=["mu"])``
with a guide that does not sample it, to get log p(x_i | mu = v).

References:

* Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
* Kish (1965). Survey Sampling (effective sample size).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ._checks import check_int

__all__ = ["log_marginal", "LogMarginal", "LogMarginalSummary", "iwae_bounds"]

_PARTICLE_PLATE = "_pyrovae_particles"
# Default chunking budget: particle-datapoint pairs evaluated per pass.
_PAIRS_PER_CHUNK = 2**15


@dataclass(frozen=True)
class LogMarginalSummary:
    """Dataset-level figures from a :class:`LogMarginal` (nats per datapoint).

    :ivar log_marginal: mean of the per-datapoint estimates.
    :ivar mc_stderr: Monte Carlo standard error of that mean (the error from
        using K particles, for this fixed set of datapoints).
    :ivar data_stderr: standard deviation across datapoints / sqrt(N): the
        error of the mean as an estimate for the population the data came from.
    :ivar bounds: mean IWAE-k bound for each k (k = 1 is the ELBO).
    :ivar unreliable_fraction: fraction of datapoints whose k-hat exceeds the
        threshold for K samples (:func:`pyrovae.diagnostics.khat_threshold`).
    """

    num_datapoints: int
    num_particles: int
    log_marginal: float
    mc_stderr: float
    data_stderr: float
    ess_mean: float
    ess_min: float
    khat_max: float
    khat_threshold: float
    unreliable_fraction: float
    bounds: Dict[int, float]

    def to_dict(self) -> dict:
        """JSON-able dict; a non-finite figure (k-hat is inf when K is too small
        for a tail fit) becomes None."""
        clean = lambda v: v if math.isfinite(v) else None
        d = {k: clean(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        d["bounds"] = {str(k): clean(v) for k, v in self.bounds.items()}
        return d

    def __str__(self) -> str:
        ladder = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(self.bounds.items()))
        return (
            f"log p(x) = {self.log_marginal:.3f} ± {self.mc_stderr:.3f} (MC) ± {self.data_stderr:.3f} (data) "
            f"nats per datapoint, N={self.num_datapoints}, K={self.num_particles}; "
            f"IWAE bounds [{ladder}]; ESS mean {self.ess_mean:.1f} (min {self.ess_min:.1f}); "
            f"k-hat max {self.khat_max:.2f}, {100 * self.unreliable_fraction:.1f}% above {self.khat_threshold:.2f}"
        )


@dataclass(frozen=True)
class LogMarginal:
    """Per-datapoint importance-sampling results; every tensor has shape ``(N,)``.

    :ivar log_marginal: estimate of log p(x_i), nats (float64).
    :ivar stderr: Monte Carlo standard error of each estimate, by the delta
        method from the normalised weights: ``sqrt((K / ess - 1) / (K - 1))``.
        It is itself unreliable where ``khat`` is large.
    :ivar ess: Kish effective sample size ``(sum w)^2 / sum w^2``, in ``[1, K]``.
    :ivar khat: PSIS Pareto shape estimate (see :func:`pyrovae.diagnostics.psis_khat`).
    :ivar num_particles: K.
    :ivar bounds: ``{k: tensor (N,)}``, estimated IWAE-k bounds from the same weights.
    :ivar log_weights: ``(K, N)`` float64 log weights if requested, else None.
    """

    log_marginal: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    num_particles: int
    bounds: Dict[int, torch.Tensor] = field(default_factory=dict)
    log_weights: Optional[torch.Tensor] = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.log_marginal.shape[0]

    def mean(self) -> Tuple[float, float]:
        """Dataset mean of log p(x_i) and its Monte Carlo standard error."""
        n = len(self)
        return float(self.log_marginal.mean()), float(self.stderr.pow(2).sum().sqrt() / n)

    def summary(self) -> LogMarginalSummary:
        from .diagnostics import khat_threshold  # lazy: keeps ArviZ out of `import pyrovae`

        if torch.isnan(self.khat).any():
            raise ValueError("summary() needs k-hat; this result was computed with khat=False")
        n = len(self)
        mean, mc = self.mean()
        data_se = float(self.log_marginal.std() / math.sqrt(n)) if n > 1 else float("nan")
        threshold = khat_threshold(self.num_particles)
        return LogMarginalSummary(
            num_datapoints=n,
            num_particles=self.num_particles,
            log_marginal=mean,
            mc_stderr=mc,
            data_stderr=data_se,
            ess_mean=float(self.ess.mean()),
            ess_min=float(self.ess.min()),
            khat_max=float(self.khat.max()),
            khat_threshold=threshold,
            unreliable_fraction=float((self.khat > threshold).double().mean()),
            bounds={k: float(v.mean()) for k, v in self.bounds.items()},
        )

    @staticmethod
    def cat(parts: Sequence["LogMarginal"]) -> "LogMarginal":
        """Concatenate results for consecutive batches of datapoints."""
        if not parts:
            raise ValueError("parts is empty")
        ks = {p.num_particles for p in parts}
        if len(ks) != 1:
            raise ValueError(f"parts use different num_particles {sorted(ks)}")
        common = set.intersection(*(set(p.bounds) for p in parts))
        lw = None
        if all(p.log_weights is not None for p in parts):
            lw = torch.cat([p.log_weights for p in parts], dim=1)
        return LogMarginal(
            log_marginal=torch.cat([p.log_marginal for p in parts]),
            stderr=torch.cat([p.stderr for p in parts]),
            ess=torch.cat([p.ess for p in parts]),
            khat=torch.cat([p.khat for p in parts]),
            num_particles=parts[0].num_particles,
            bounds={k: torch.cat([p.bounds[k] for p in parts]) for k in sorted(common)},
            log_weights=lw,
        )


def iwae_bounds(log_weights: torch.Tensor, ks: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Estimate IWAE-k bounds from K log weights per datapoint.

    The K particles are split into ``K // k`` disjoint groups of k; each group
    gives one unbiased draw of the IWAE-k objective and their mean estimates it.

    :param torch.Tensor log_weights: shape ``(K, N)``.
    :param ks: group sizes, each between 1 and K.
    :returns: ``{k: tensor of shape (N,)}``.

    >>> lw = torch.zeros(10, 3)  # constant weights: every bound equals log p = 0
    >>> iwae_bounds(lw, [1, 5])[5]
    tensor([0., 0., 0.])
    """
    K = log_weights.shape[0]
    out = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K:
            raise ValueError(f"bound size k must be an int in [1, num_particles={K}], got {k!r}")
        groups = K // k
        lw = log_weights[: groups * k].reshape(groups, k, -1)
        out[k] = (torch.logsumexp(lw, dim=1) - math.log(k)).mean(0)
    return out


def _check_args(model, args, kwargs):
    """Finite, non-empty tensors; and the model's own data check where it has one (e.g. VAE)."""
    named = [(f"args[{i}]", a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() > 0 and value.shape[0] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(value.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    check = getattr(getattr(model, "__self__", None), "check_data", None)
    if check is not None and args and isinstance(args[0], torch.Tensor):
        check(args[0], "x")


def _sample_sites(trace, observed: bool):
    """(name, site) of the real sample sites: no plate subsample sites, no deterministics."""
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and site["is_observed"] == observed
            and not site_is_subsample(site)
            and not site["infer"].get("_deterministic")
        ):
            yield name, site


def _in_plate(site, plate: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    return None


def _inspect(model, guide, args, kwargs, plate: str):
    """One unvectorised pass: check structure, find the data dim and plate nesting."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    observed = [name for name, _ in _sample_sites(model_trace, observed=True)]
    if not observed:
        raise ValueError("the model has no observed sample sites (obs=...): there is no log p(x) to estimate")
    frames, dims = [], []
    for tr in (model_trace, guide_trace):
        for _, s in (*_sample_sites(tr, True), *_sample_sites(tr, False)):
            dims.extend(-f.dim for f in s["cond_indep_stack"] if f.vectorized)
            frame = _in_plate(s, plate)
            if frame is not None:
                frames.append(frame)
    if not frames:
        raise ValueError(
            f"no sample site is inside a plate named {plate!r}; put the observations in "
            f"pyro.plate({plate!r}, N) or pass plate= with the name your model uses"
        )
    frame = frames[0]
    if not frame.vectorized:
        raise ValueError(f"plate {plate!r} must be vectorised (pyro.plate used as a context, not an iterator)")
    outside = [n for n in observed if _in_plate(model_trace.nodes[n], plate) is None]
    if outside:
        raise ValueError(f"observed sites {outside} are outside plate {plate!r}; every observation must belong to a datapoint")
    global_latents = sorted(
        {
            n for tr in (model_trace, guide_trace) for n, s in _sample_sites(tr, observed=False)
            if _in_plate(s, plate) is None
        }
    )
    if global_latents:
        raise ValueError(
            f"latent sites {global_latents} lie outside plate {plate!r} (global latents): log p(x) does not "
            "factorise over datapoints, so per-datapoint estimates are undefined; make them pyro.param "
            "point estimates, or fix them with poutine.condition and hide them with poutine.block "
            "(see the pyrovae.importance docs)"
        )
    missing = [n for n, _ in _sample_sites(model_trace, observed=False) if n not in guide_trace.nodes]
    if missing:
        raise ValueError(f"model latent sites {missing} are not sampled by the guide; the guide must propose every latent")
    return frame.dim, frame.size, max(dims, default=0)


def _site_log_probs(trace, plate_dim: int, nesting: int, chunk: int, n: int, observed: bool) -> torch.Tensor:
    """Sum unscaled log-densities of (observed or latent) sites to shape (chunk, N), float64."""
    total = None
    for _, s in _sample_sites(trace, observed):
        lp = s["fn"].log_prob(s["value"])
        # mask() is part of the distribution; scale (β, subsampling) deliberately is not.
        lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape).to(torch.float64)
        keep = {0, nesting + 1 + plate_dim}  # the particle dim and the data dim
        other = [d for d in range(lp.dim()) if d not in keep]
        if other:
            lp = lp.sum(other, keepdim=True)
        lp = lp.reshape(lp.shape[0], lp.shape[nesting + 1 + plate_dim]).expand(chunk, n)
        total = lp if total is None else total + lp
    return 0.0 if total is None else total


def _particle_pass(model, guide, args, kwargs, num, plate_dim, nesting, n):
    """``num`` vectorised particles: log weights of shape (num, N), float64, and the guide trace."""
    with pyro.plate(_PARTICLE_PLATE, num, dim=-(nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    lw = (
        _site_log_probs(model_trace, plate_dim, nesting, num, n, observed=True)
        + _site_log_probs(model_trace, plate_dim, nesting, num, n, observed=False)
        - _site_log_probs(guide_trace, plate_dim, nesting, num, n, observed=False)
    )
    return lw, (guide_trace, model_trace)


def log_marginal(
    model,
    guide,
    *args,
    num_particles: int,
    chunk_size: Optional[int] = None,
    plate: str = "data",
    bounds: Optional[Sequence[int]] = None,
    khat: bool = True,
    return_log_weights: bool = False,
    **kwargs,
) -> LogMarginal:
    """Estimate log p(x_i) for every datapoint by importance sampling.

    The guide proposes, the model scores, and the log weights are
    ``log p(x_i, z) - log q(z | x_i)`` per datapoint of the data plate.
    Particles are vectorised by an outer plate, processed ``chunk_size`` at a
    time (memory is bounded by the chunk, not K) and accumulated with a
    streaming log-sum-exp in float64. Runs under ``torch.no_grad()`` and
    changes no parameter.

    :param model: Pyro program whose observations lie in plate ``plate``.
    :param guide: Pyro program proposing every latent of the model.
    :param args: passed to both, e.g. the data batch ``x``.
    :param int num_particles: K >= 2, used exactly.
    :param int chunk_size: particles per vectorised pass; None picks
        ``max(1, 32768 // N)``.
    :param str plate: name of the data plate.
    :param bounds: group sizes k for the IWAE-k bound ladder; default
        ``(1, 5, 50)`` restricted to k <= K. k = 1 is the ELBO.
    :param bool khat: compute PSIS k-hat through ArviZ (default). With False the
        ``khat`` field holds NaN, by request, and ``summary()`` is unavailable.
    :param bool return_log_weights: keep the ``(K, N)`` log weights in the result.
    :returns: :class:`LogMarginal`.

    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0., 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
    >>> def guide(x):  # the exact posterior N(x/2, 1/2): every weight equals p(x)
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
    >>> x = torch.tensor([0.0, 1.0])
    >>> est = log_marginal(model, guide, x, num_particles=10)
    >>> exact = dist.Normal(0., 2 ** 0.5).log_prob(x).double()
    >>> bool(torch.allclose(est.log_marginal, exact, atol=1e-6))
    True
    """
    check_int("num_particles", num_particles, 2)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if not isinstance(plate, str) or not plate:
        raise TypeError(f"plate must be a non-empty str, got {plate!r}")
    if not callable(model) or not callable(guide):
        raise TypeError("model and guide must be callables")
    if not isinstance(khat, bool) or not isinstance(return_log_weights, bool):
        raise TypeError("khat and return_log_weights must be bools")
    _check_args(model, args, kwargs)
    K = num_particles
    ks = [k for k in (1, 5, 50) if k <= K] if bounds is None else list(bounds)

    with torch.no_grad():
        plate_dim, n, nesting = _inspect(model, guide, args, kwargs, plate)
        chunk = chunk_size or max(1, _PAIRS_PER_CHUNK // max(n, 1))
        chunk = min(chunk, K)
        running_max = running_sum = running_sq = None
        kept = []
        done = 0
        while done < K:
            c = min(chunk, K - done)
            # The structural pass above ran under the caller's validation setting; the
            # chunks repeat it on more particles, and the checks never change a value.
            with pyro.validation_enabled(False):
                lw, _ = _particle_pass(model, guide, args, kwargs, c, plate_dim, nesting, n)
            if torch.isnan(lw).any():
                bad = torch.isnan(lw).any(0).nonzero()[:5, 0].tolist()
                raise ValueError(f"log weights are NaN for datapoints {bad}; check the model and guide")
            if (lw == math.inf).any():
                bad = (lw == math.inf).any(0).nonzero()[:5, 0].tolist()
                raise ValueError(f"log weights are +inf for datapoints {bad}: a density is unbounded there")
            # Streaming log-sum-exp of w and w^2 in float64.
            cmax = lw.max(0).values
            new_max = cmax if running_max is None else torch.maximum(running_max, cmax)
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            s = (lw - safe).exp().sum(0)
            s2 = (2 * (lw - safe)).exp().sum(0)
            if running_max is not None:
                old = torch.where(torch.isfinite(running_max), running_max - safe, torch.full_like(safe, -math.inf))
                s = s + running_sum * old.exp()
                s2 = s2 + running_sq * (2 * old).exp()
            running_max, running_sum, running_sq = new_max, s, s2
            kept.append(lw)
            done += c

    if not torch.isfinite(running_max).all():
        bad = (~torch.isfinite(running_max)).nonzero()[:5, 0].tolist()
        raise ValueError(
            f"every importance weight is zero for datapoints {bad}: the data lie outside the model's support "
            "(e.g. non-binary data under a Bernoulli likelihood) or the guide misses the posterior entirely"
        )
    safe = running_max
    estimate = safe + running_sum.log() - math.log(K)
    ess = running_sum.pow(2) / running_sq
    stderr = ((K / ess - 1).clamp(min=0) / (K - 1)).sqrt()
    log_weights = torch.cat(kept, 0)
    if khat:
        from .diagnostics import psis_khat

        k_hat = psis_khat(log_weights)
    else:
        k_hat = torch.full_like(estimate, math.nan)
    return LogMarginal(
        log_marginal=estimate,
        stderr=stderr,
        ess=ess,
        khat=k_hat,
        num_particles=K,
        bounds=iwae_bounds(log_weights, ks),
        log_weights=log_weights if return_log_weights else None,
    )
