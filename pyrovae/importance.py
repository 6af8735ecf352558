"""Per-datapoint log p(x) by importance sampling, with the guide as proposal.

For each datapoint x_i in the data plate, with K particles z_k ~ q(z | x_i)::

    log w_ik   = log p(x_i, z_k) - log q(z_k | x_i)
    log p(x_i) ~= log (1/K) sum_k w_ik

The estimate is unbiased for p(x_i) and, by Jensen, biased low for log p(x_i)
by about ``stderr**2 / 2``; it is the IWAE-K bound (Burda et al., 2016) and
increases towards log p(x_i) as K grows.

Log-densities are read from traces of the model and the guide (replayed on
the guide's draws) by :mod:`pyrovae.weights`, never written by hand, so they
agree with what training optimised. They are read unscaled (``poutine.scale``:
β, KL warm-up and subsampling scales do not leak into the estimate) and
masked (``poutine.mask``: a masked-out observation contributes exactly 0).
Discrete latents the model enumerates (``infer={"enumerate": "parallel"}``)
are summed out exactly. Networks run in ``eval()`` mode, so a datapoint's
estimate does not depend on the rest of its batch.

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

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ._checks import check_bool, check_int
from .diagnostics import khat_threshold, psis_khat
from .pair import ModelGuidePair, batch_arguments
from .weights import (data_name, declared_parameters, evaluating, inspect_pair, log_weights, merge_kwargs,
                      program_arguments)

__all__ = ["log_marginal", "LogMarginal", "LogMarginalSummary", "iwae_bounds"]

# log_marginal's own keyword options: a program keyword of the same name goes through model_kwargs.
_OPTIONS = frozenset({"num_particles", "chunk_size", "plate", "bounds", "khat", "return_log_weights", "batch_size",
                      "model_kwargs"})
# Datapoints per batch when a Dataset is streamed.
_DATASET_BATCH = 100


@dataclass(frozen=True)
class LogMarginalSummary:
    """Dataset-level figures from a :class:`LogMarginal` (nats per datapoint), led by their reliability.

    :ivar log_marginal: mean of the per-datapoint estimates.
    :ivar mc_stderr: Monte Carlo standard error of that mean (the error from
        using K particles, for this fixed set of datapoints). Meaningless where
        k-hat is high: see :attr:`verdict`.
    :ivar data_stderr: standard deviation across datapoints / sqrt(N): the
        error of the mean as an estimate for the population the data came from.
    :ivar khat_max: largest finite k-hat (non-finite: no datapoint had a tail fit).
    :ivar bounds: mean IWAE-k bound for each k (k = 1 is the ELBO).
    :ivar unreliable_fraction: fraction of datapoints whose k-hat exceeds the
        threshold for K samples (:func:`pyrovae.diagnostics.khat_threshold`),
        not counting datapoints with constant weights.
    :ivar constant_fraction: fraction of datapoints whose weights are all equal
        (an exact guide; their k-hat is ``-inf``): the estimate is exact there.
        None: 1 if ``khat_max`` is ``-inf``, else 0.
    :ivar min_draws: the fewest K for which k-hat can be estimated
        (:func:`pyrovae.diagnostics.khat_min_draws`); None: ArviZ's default rule.

    :attr:`verdict` comes first in ``str()`` and ``to_dict()``. The estimate is
    reported as unreliable when more than 10%
    (:data:`pyrovae.diagnostics.UNRELIABLE_LIMIT`) of datapoints have k-hat above
    the threshold of Vehtari et al. (2024), and of unknown reliability when K is
    too small for a tail fit; then the MC ± is not shown as an error bar. A k-hat
    that is not finite is never printed as a number.
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
    constant_fraction: Optional[float] = None
    min_draws: Optional[int] = None

    def _min_draws(self) -> int:
        from .diagnostics import khat_min_draws

        return self.min_draws if self.min_draws is not None else khat_min_draws()

    def _constant(self) -> float:
        if self.constant_fraction is not None:
            return self.constant_fraction
        return 1.0 if self.khat_max == -math.inf else 0.0

    def _unreliable(self) -> float:
        return 0.0 if self._constant() == 1.0 else self.unreliable_fraction

    @property
    def khat_estimable(self) -> bool:
        """False when K is too small for a Pareto tail fit."""
        return self.num_particles >= self._min_draws()

    @property
    def reliable(self) -> bool:
        """k-hat could be estimated and at most 10% of datapoints exceed the threshold."""
        from .diagnostics import UNRELIABLE_LIMIT

        return self.khat_estimable and self._unreliable() <= UNRELIABLE_LIMIT

    @property
    def verdict(self) -> str:
        """The reliability of the estimate, in words."""
        k = self.num_particles
        if not self.khat_estimable:
            return (f"reliability unknown: too few draws for a tail fit (K={k}; K >= {self._min_draws()} "
                    "needed for k-hat), so the MC error is unchecked")
        if not self.reliable:
            return (f"UNRELIABLE: {100 * self._unreliable():.1f}% of datapoints have k-hat above "
                    f"{self.khat_threshold:.2f} (K={k}); the estimate may be far off (usually too low) and the "
                    "MC ± is not a valid error bar; improve the guide rather than adding particles")
        if self._constant() == 1.0:
            return "exact: the importance weights are constant (exact guide), so k-hat is undefined"
        return f"reliable: {100 * self._unreliable():.1f}% of datapoints have k-hat above {self.khat_threshold:.2f} (K={k})"

    def _khat_words(self) -> str:
        if not self.khat_estimable:
            return f"k-hat: too few draws for a tail fit, K >= {self._min_draws()} needed"
        if self._constant() == 1.0:
            return "k-hat: weights constant (exact guide)"
        constant = self._constant()
        extra = f", {100 * constant:.1f}% with weights constant (exact there)" if constant > 0 else ""
        if not math.isfinite(self.khat_max):
            return f"k-hat: no tail fit was possible for any datapoint{extra}"
        return (f"k-hat max {self.khat_max:.2f}, {100 * self._unreliable():.1f}% above "
                f"{self.khat_threshold:.2f}{extra}")

    def to_dict(self) -> dict:
        """JSON-able dict, the verdict first; a non-finite figure becomes None, explained in ``khat_note``."""
        clean = lambda v: v if math.isfinite(v) else None
        d = {"verdict": self.verdict, "reliable": self.reliable}
        d.update({k: clean(v) if isinstance(v, float) else v for k, v in self.__dict__.items()})
        d["bounds"] = {str(k): clean(v) for k, v in self.bounds.items()}
        d["unreliable_fraction"] = self._unreliable() if self.khat_estimable else None
        d["constant_fraction"] = self._constant()
        d["min_draws"] = self._min_draws()
        d["khat_note"] = self._khat_words()
        return d

    def __str__(self) -> str:
        ladder = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(self.bounds.items()))
        if self.reliable:
            value = (f"log p(x) = {self.log_marginal:.3f} ± {self.mc_stderr:.3f} (MC) ± {self.data_stderr:.3f} "
                     "(data) nats per datapoint")
        else:
            value = (f"log p(x) = {self.log_marginal:.3f} ± {self.data_stderr:.3f} (data) nats per datapoint "
                     f"[MC ± {self.mc_stderr:.3f} not trustworthy]")
        return (
            f"{self.verdict}. {value}, N={self.num_datapoints}, K={self.num_particles}; "
            f"IWAE bounds [{ladder}]; ESS mean {self.ess_mean:.1f} (min {self.ess_min:.1f}); {self._khat_words()}"
        )


@dataclass(frozen=True)
class LogMarginal:
    """Per-datapoint importance-sampling results; every tensor has shape ``(N,)``.

    :ivar log_marginal: estimate of log p(x_i), nats (float64).
    :ivar stderr: Monte Carlo standard error of each estimate, by the delta
        method from the normalised weights: ``sqrt((K / ess - 1) / (K - 1))``.
        It is itself unreliable where ``khat`` is large.
    :ivar ess: Kish effective sample size ``(sum w)^2 / sum w^2``, in ``[1, K]``.
    :ivar khat: PSIS Pareto shape estimate (see :func:`pyrovae.diagnostics.psis_khat`);
        ``-inf`` where the weights are constant up to round-off (an exact guide: reliable).
    :ivar num_particles: K.
    :ivar bounds: ``{k: tensor (N,)}``, estimated IWAE-k bounds from the same weights.
    :ivar log_weights: ``(K, N)`` float64 log weights if requested, else None.
    :ivar sequential: True when the particles ran one at a time because the program
        could not be vectorised over particles (or vectorising changed its log weights).
        K is exact either way; only the speed differs.
    :ivar fallback_reason: why, when ``sequential``.
    """

    log_marginal: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    num_particles: int
    bounds: Dict[int, torch.Tensor] = field(default_factory=dict)
    log_weights: Optional[torch.Tensor] = field(default=None, repr=False)
    sequential: bool = False
    fallback_reason: Optional[str] = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.log_marginal.shape[0]

    def mean(self) -> Tuple[float, float]:
        """Dataset mean of log p(x_i) and its Monte Carlo standard error."""
        n = len(self)
        return float(self.log_marginal.mean()), float(self.stderr.pow(2).sum().sqrt() / n)

    def summary(self) -> LogMarginalSummary:
        """Dataset-level figures, led by their reliability (see :class:`LogMarginalSummary`)."""
        if torch.isnan(self.khat).any():
            raise ValueError("summary() needs k-hat; this result was computed with khat=False")
        n = len(self)
        mean, mc = self.mean()
        data_se = float(self.log_marginal.std() / math.sqrt(n)) if n > 1 else float("nan")
        threshold = khat_threshold(self.num_particles)
        finite = self.khat[torch.isfinite(self.khat)]
        return LogMarginalSummary(
            num_datapoints=n,
            num_particles=self.num_particles,
            log_marginal=mean,
            mc_stderr=mc,
            data_stderr=data_se,
            ess_mean=float(self.ess.mean()),
            ess_min=float(self.ess.min()),
            khat_max=float(finite.max()) if len(finite) else float(self.khat.max()),
            khat_threshold=threshold,
            unreliable_fraction=float((self.khat > threshold).double().mean()),
            bounds={k: float(v.mean()) for k, v in self.bounds.items()},
            constant_fraction=float((self.khat == -math.inf).double().mean()),
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
            sequential=any(p.sequential for p in parts),
            fallback_reason=next((p.fallback_reason for p in parts if p.fallback_reason), None),
        )


def iwae_bounds(log_weights: torch.Tensor, ks: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Estimate IWAE-k bounds from K log weights per datapoint.

    The K particles are split into ``K // k`` disjoint groups of k; each group
    gives one unbiased draw of the IWAE-k objective and their mean estimates it.

    :param torch.Tensor log_weights: shape ``(K, N)``.
    :param ks: group sizes, each between 1 and K.
    :returns: ``{k: tensor of shape (N,)}``.

    >>> lw = torch.zeros(10, 3)  # constant weights: every bound equals log p = 0
    >>> iwae_bounds(lw, [1, 5])[5].tolist()
    [0.0, 0.0, 0.0]
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
    batch_size: Optional[int] = None,
    model_kwargs: Optional[dict] = None,
    **kwargs,
) -> LogMarginal:
    """Estimate log p(x_i) for every datapoint by importance sampling.

    The guide proposes, the model scores, and the log weights are
    ``log p(x_i, z) - log q(z | x_i)`` per datapoint of the data plate
    (:mod:`pyrovae.weights`). Particles are vectorised by an outer plate and
    processed ``chunk_size`` at a time; if the program cannot run vectorised
    (checked on the first chunk), they run one at a time and the result says
    so (``sequential``). Runs under ``torch.no_grad()`` with every network in
    ``eval()`` mode, and changes no parameter, buffer or module mode.

    The data are the programs' arguments, as for :func:`pyrovae.fit`: a tensor
    ``x`` calls ``model(x)``, a tuple ``model(*batch)``, a dict
    ``model(**batch)``, several arguments are passed as given; a map-style
    ``Dataset`` or a ``DataLoader`` is streamed batch by batch and the
    per-datapoint results concatenated in order.

    :param model: Pyro program whose observations lie in plate ``plate``.
    :param guide: Pyro program proposing every latent of the model that is not
        enumerated.
    :param args: the programs' arguments (see above).
    :param int num_particles: K >= 2, used exactly.
    :param int chunk_size: particles per vectorised pass. None (default) sizes
        the chunks by memory: the first chunk (about 4096 particle-datapoint
        pairs) measures what a particle takes, and the next chunks fill
        :data:`pyrovae.weights.CHUNK_MEMORY` (8 MiB on the CPU, cache-sized; on
        CUDA 4 GiB, at most half the free memory).
    :param str plate: name of the data plate.
    :param bounds: group sizes k for the IWAE-k bound ladder; default
        ``(1, 5, 50)`` restricted to k <= K. k = 1 is the ELBO.
    :param bool khat: compute PSIS k-hat (default; :func:`pyrovae.diagnostics.psis_khat`,
        on the weights' device). With False the
        ``khat`` field holds NaN, by request, and ``summary()`` is unavailable.
    :param bool return_log_weights: keep the ``(K, N)`` log weights in the result.
    :param int batch_size: datapoints per batch when the data are a ``Dataset``
        (default 100); a ``DataLoader`` brings its own.
    :param dict model_kwargs: keyword arguments for the programs whose names are
        also options here (``plate``, ``khat``, ...). A program that declares such
        a parameter is refused unless ``model_kwargs`` says what it gets (``{}``
        for its own default): a keyword the user meant for it is never swallowed.
    :param kwargs: the programs' other keyword arguments.
    :returns: :class:`LogMarginal` with tensors of shape ``(N,)``.

    >>> import pyro, pyro.distributions as dist
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
    >>> bool(torch.allclose(est.log_marginal, exact, atol=1e-6)), est.khat.tolist()
    (True, [-inf, -inf])
    """
    check_int("num_particles", num_particles, 2)
    check_int("chunk_size", chunk_size, 1, allow_none=True)
    check_int("batch_size", batch_size, 1, allow_none=True)
    if not isinstance(plate, str) or not plate:
        raise TypeError(f"plate must be a non-empty str, got {plate!r}")
    check_bool("khat", khat)
    check_bool("return_log_weights", return_log_weights)
    ks = _bound_sizes(bounds, num_particles)
    pair = ModelGuidePair(model, guide)
    _refuse_ambiguous(pair, model_kwargs)
    batches = _batches(*program_arguments(args, merge_kwargs(kwargs, model_kwargs), "data"), batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("the data are empty: the Dataset or DataLoader yields no batch")
    pair.check_data(*first, data_name(*first))  # before any program runs on the data
    options = dict(num_particles=num_particles, chunk_size=chunk_size, plate=plate, ks=ks, khat=khat,
                   return_log_weights=return_log_weights)
    with torch.no_grad(), evaluating(pair, *first):
        parts = [_estimate(pair, a, kw, **options) for a, kw in itertools.chain([first], batches)]
    return parts[0] if len(parts) == 1 else LogMarginal.cat(parts)


def _bound_sizes(bounds, num_particles: int) -> list:
    if bounds is None:
        return [k for k in (1, 5, 50) if k <= num_particles]
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__iter__"):
        raise TypeError(f"bounds must be a sequence of ints, got {bounds!r}")
    ks = list(bounds)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_particles:
            raise ValueError(f"bounds must hold ints in [1, num_particles={num_particles}], got {k!r}")
    return ks


def _refuse_ambiguous(pair: ModelGuidePair, model_kwargs) -> None:
    """A program parameter named like an option cannot be told apart from the option: unless
    ``model_kwargs`` says what the programs get, refuse rather than keep it from them."""
    if model_kwargs is not None:
        return
    clash = sorted(_OPTIONS & (declared_parameters(pair.model) | declared_parameters(pair.guide)))
    if clash:
        name = clash[0]
        raise ValueError(
            f"the model or guide takes a parameter {name!r}, which is also an option of log_marginal: "
            f"{name}= given here is used by log_marginal and not passed on. Say what the programs get with "
            f"model_kwargs={{{name!r}: ...}}, or model_kwargs={{}} to leave them their default"
        )


def _batches(args: tuple, kwargs: dict, batch_size: Optional[int]) -> Iterator[Tuple[tuple, dict]]:
    """The programs' ``(args, kwargs)`` for each batch: the data as given, or streamed."""
    data = args[0] if len(args) == 1 and not kwargs else None
    if isinstance(data, DataLoader):
        if batch_size is not None:
            raise ValueError("batch_size applies to a Dataset; a DataLoader brings its own batch_size")
        if isinstance(data.sampler, RandomSampler):
            raise ValueError("the DataLoader shuffles: results are returned in data order, so pass shuffle=False")
        if data.drop_last:
            raise ValueError("the DataLoader has drop_last=True and would skip datapoints; pass drop_last=False")
        return (batch_arguments(batch) for batch in data)
    if isinstance(data, Dataset) and not isinstance(data, torch.Tensor):
        loader = DataLoader(data, batch_size=batch_size or _DATASET_BATCH, shuffle=False)
        return (batch_arguments(batch) for batch in loader)
    if batch_size is not None:
        raise ValueError("batch_size applies to a Dataset; tensors, tuples and dicts are scored as one batch")
    return iter([(args, kwargs)])


def _estimate(pair: ModelGuidePair, args, kwargs, *, num_particles, chunk_size, plate, ks, khat,
              return_log_weights) -> LogMarginal:
    """One batch of datapoints, in memory."""
    pair.check_data(args, kwargs, data_name(args, kwargs))
    structure = inspect_pair(pair.model, pair.guide, args, kwargs, plate=plate)
    weights = log_weights(pair.model, pair.guide, args, kwargs, structure, num_particles=num_particles,
                          chunk_size=chunk_size, networks=pair.called_modules())
    lw = weights.log_weights
    _refuse_bad_weights(lw)
    K = num_particles
    lse = torch.logsumexp(lw, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    return LogMarginal(
        log_marginal=lse - math.log(K),
        stderr=((K / ess - 1).clamp(min=0) / (K - 1)).sqrt(),
        ess=ess,
        khat=psis_khat(lw, tol=weights.roundoff) if khat else torch.full_like(lse, math.nan),
        num_particles=K,
        bounds=iwae_bounds(lw, ks),
        log_weights=lw if return_log_weights else None,
        sequential=weights.sequential,
        fallback_reason=weights.fallback_reason,
    )


def _refuse_bad_weights(lw: torch.Tensor) -> None:
    first = lambda bad: bad.nonzero()[:5, 0].tolist()
    if torch.isnan(lw).any():
        raise ValueError(f"log weights are NaN for datapoints {first(torch.isnan(lw).any(0))}; check the model "
                         "and guide")
    if (lw == math.inf).any():
        raise ValueError(f"log weights are +inf for datapoints {first((lw == math.inf).any(0))}: a density is "
                         "unbounded there")
    if (lw == -math.inf).all(0).any():
        raise ValueError(
            f"every importance weight is zero for datapoints {first((lw == -math.inf).all(0))}: the data lie "
            "outside the model's support (e.g. non-binary data under a Bernoulli likelihood) or the guide "
            "misses the posterior entirely"
        )
