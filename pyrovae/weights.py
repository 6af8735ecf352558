"""Per-datapoint log importance weights of any model/guide pair.

For K particles z_k ~ q(z | x_i) and every datapoint x_i of the data plate::

    log w_ik = log p(x_i, z_k) - log q(z_k | x_i)            shape (K, N)

This module is the one place that runs a pair over particles; both
:func:`pyrovae.log_marginal` and :func:`pyrovae.diagnostics.to_inference_data`
read their numbers from it, so they cannot disagree.

* **Vectorised particles.** Particles are an extra plate left of every plate
  the programs declare; a chunk of particles is one run of the guide and one
  replay of the model.
* **What counts.** Log-densities are read from the traces, unscaled
  (``poutine.scale``: β, KL warm-up and subsampling scales are training
  weights) but masked (``poutine.mask`` and ``.mask()`` remove terms from the
  density itself). Discrete latents that the model enumerates
  (``infer={"enumerate": "parallel"}``) are summed out exactly per datapoint
  with Pyro's tensor contraction, so log p(x_i, z) is the density of the
  continuous latents the guide proposes.
* **Trust, then verify.** A program may not survive an extra batch dimension
  (boolean-mask indexing, ``reshape(len(x), ...)``), or may broadcast wrongly
  without raising. The first vectorised chunk is therefore compared with the
  same particles replayed one at a time; on an error or a disagreement every
  particle runs sequentially, K stays exact, and the result says so.
* **Recorded chunks.** When a call has :data:`TAPE_MIN_CHUNKS` chunks of one
  size, one of them is recorded as a tape of tensor operations, checked bit for
  bit against the programs run afresh, and the rest replayed without the
  programs' Python (:mod:`pyrovae.tape`). The log weights are the same either way.
* **Refusals** name the site and say what to change: latents outside the data
  plate, latents only the guide samples, latents the guide does not propose,
  random subsets (``subsample_size``), observations outside the data plate.

References:

* Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
* Obermeyer et al. (2019). Tensor Variable Elimination for Plated Factor
  Graphs. ICML (the contraction that sums enumerated latents).
"""

import contextlib
import functools
import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import pyro
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import infer_discrete
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from . import _compat
from .distributed import default_device
from .pair import ModelGuidePair, batch_arguments
from .reuse import ReusedCalls
from .rng import same_torch_state, set_torch_state, torch_state
from .tape import Refused, Tape

__all__ = [
    "PARTICLE_PLATE",
    "PairStructure",
    "ParticlePass",
    "LogWeights",
    "inspect_pair",
    "log_weights",
    "particle_pass",
    "sequential_pass",
    "evaluating",
    "program_arguments",
    "declared_parameters",
    "data_name",
    "merge_kwargs",
    "posterior_traces",
    "predictive_traces",
    "datapoint_major",
]

log = logging.getLogger("pyrovae")

PARTICLE_PLATE = "_pyrovae_particles"
#: Memory a chunk of particles may take, by device type: the chunk size follows from the
#: footprint of the first chunk (on CUDA the allocator's peak, on the CPU :func:`_trace_bytes`).
#: On the CPU a chunk that stays in the caches is fastest (8 MiB: the best of 4 to 256 MiB on
#: 300 MNIST images, benchmarks/README.md); on CUDA, chunks are large, at most 4 GiB and at most
#: half of the free device memory.
CHUNK_MEMORY = {"cpu": 8 * 2**20, "cuda": 4 * 2**30}
#: Particle-datapoint pairs in the first chunk, which measures the footprint.
PROBE_PAIRS = 2**12
#: Chunks of one size after which a call records one and replays it (:class:`_Replayed`): the
#: recording and its check cost about 1.5 chunks, and a replay saves 4-6% of a chunk of a
#: 784-400-50 VAE on two CPU cores (more where the networks are small), so 32 chunks pay back.
TAPE_MIN_CHUNKS = 32
# Weights spanning less than this many units of round-off (machine epsilon times the summed
# magnitude of the log-densities) are equal up to round-off: constant, as under an exact guide.
ROUNDOFF_ULPS = 64
# A vectorised and a sequential run of the same particle may differ by kernel round-off only;
# a broadcasting bug shifts a log weight by far more than this many ulps of its terms.
_CHECK_ULPS = 1024


@dataclass(frozen=True)
class PairStructure:
    """What one unvectorised run of a pair shows about its programs.

    :ivar str plate: name of the data plate.
    :ivar int plate_dim: the data plate's dim as the programs declare it (negative).
    :ivar int size: N, the datapoints in the plate.
    :ivar int nesting: how many dims the programs' plates use (the particle plate goes left of them).
    :ivar tuple observed: observed site names.
    :ivar tuple latents: latent sites the guide proposes (and the model scores).
    :ivar tuple enumerated: discrete model sites enumerated in parallel and summed out.
    :ivar dict shapes: unvectorised value shape of each guide latent.
    :ivar model_trace: the model's trace of this run (observed values, plates).
    """

    plate: str
    plate_dim: int
    size: int
    nesting: int
    observed: Tuple[str, ...]
    latents: Tuple[str, ...]
    enumerated: Tuple[str, ...]
    shapes: Dict[str, torch.Size] = field(repr=False)
    model_trace: poutine.Trace = field(repr=False, compare=False)


@dataclass(frozen=True)
class ParticlePass:
    """Log weights of ``num`` particles and, if kept, the traces that produced them.

    :ivar torch.Tensor log_weights: ``(num, N)``, float64.
    :ivar torch.Tensor roundoff: ``(N,)``: the spread of log weights that round-off alone can cause.
    :ivar tuple guide_traces: one vectorised trace, or one trace per particle (sequential).
    :ivar tuple model_traces: the model's traces, replayed on ``guide_traces``.
    :ivar bool vectorized: whether the traces carry a particle dimension.
    :ivar dict unexpanded: for ``"model"`` and ``"guide"``, a dict of site name to the site's distribution
        before the particle plate expanded it (:class:`_ParticlePlate`); empty unless the pass
        is a vectorised one that kept its traces.
    """

    log_weights: torch.Tensor
    roundoff: torch.Tensor
    guide_traces: tuple = field(default=(), repr=False)
    model_traces: tuple = field(default=(), repr=False)
    vectorized: bool = True
    unexpanded: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LogWeights:
    """All K particles of one batch.

    :ivar torch.Tensor log_weights: ``(K, N)``, float64.
    :ivar torch.Tensor roundoff: ``(N,)``, see :class:`ParticlePass`.
    :ivar bool sequential: particles ran one at a time (the program could not be vectorised).
    :ivar str fallback_reason: why, when ``sequential``.
    :ivar tuple passes: the :class:`ParticlePass` objects with traces, when kept.
    """

    log_weights: torch.Tensor
    roundoff: torch.Tensor
    sequential: bool = False
    fallback_reason: Optional[str] = None
    passes: tuple = field(default=(), repr=False)


# --------------------------------------------------------------------------- arguments and modes
def program_arguments(args: tuple, kwargs: dict, name: str) -> Tuple[tuple, dict]:
    """A lone tuple or dict argument is a batch, passed as ``fit`` passes it
    (``model(*batch)``, ``model(**batch)``); anything else is passed as given.

    >>> program_arguments(({"x": 1},), {}, "data")
    ((), {'x': 1})
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list, dict)):
        if not args[0]:
            raise ValueError(f"{name} is an empty {type(args[0]).__name__}: there is nothing to pass to the programs")
        return batch_arguments(args[0])
    return args, kwargs


def data_name(args: tuple, kwargs: dict) -> str:
    """What error messages call the data: ``x`` for a lone tensor (``model(x)``), else ``data``."""
    return "x" if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else "data"


def merge_kwargs(kwargs: dict, model_kwargs) -> dict:
    """The programs' keyword arguments: ``**kwargs`` plus ``model_kwargs``, which
    carries names that are also options of the calling function."""
    if model_kwargs is None:
        return kwargs
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict with str keys, got {model_kwargs!r}")
    both = sorted(set(kwargs) & set(model_kwargs))
    if both:
        raise ValueError(f"keyword arguments {both} are given both directly and in model_kwargs; give each once")
    return {**kwargs, **model_kwargs}


def declared_parameters(fn) -> set:
    """Names the program accepts as keywords (empty when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@contextlib.contextmanager
def evaluating(pair: ModelGuidePair, args: tuple, kwargs: dict) -> Iterator[ModelGuidePair]:
    """Every network the pair owns or calls in ``eval()`` mode inside the block, each one's
    mode restored after: an estimate for one datapoint must not depend on the rest of its
    batch (BatchNorm in training mode), nor move running statistics. The programs run with
    the data's device as the default device (:func:`pyrovae.distributed.default_device`)."""
    with default_device(_data_device(args, kwargs)):
        with torch.random.fork_rng(devices=[]):  # finding the modules must not shift the caller's draws
            pair.find_modules(*args, **kwargs)
        with pair.evaluating():
            yield pair


def _data_device(args: tuple, kwargs: dict) -> torch.device:
    """Where the programs run: the device of the first tensor among the data (else the CPU)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- structure
class _RandomSubsample(Messenger):
    """Record plates whose indices are drawn here: their subsample site has no value yet
    when it reaches this handler (a fixed ``subsample=`` or a replayed one has). Drawn
    indices are random unless they are all of them (no ``subsample_size``)."""

    def __init__(self):
        super().__init__()
        self.plates: List[str] = []

    def _pyro_sample(self, msg):
        if site_is_subsample(msg) and msg["value"] is None and msg["name"] not in self.plates:
            self.plates.append(msg["name"])


def _random_subsets(drawn: List[str], *traces) -> List[str]:
    """The plates among ``drawn`` whose indices are a proper subset (``subsample_size < size``)."""
    frames = {f.name: f for tr in traces for s in tr.nodes.values() if s["type"] == "sample"
              for f in s["cond_indep_stack"]}
    return [n for n in drawn if n in frames and _compat.plate_full_size(frames[n]) not in (None, frames[n].size)]


def _sample_sites(trace, observed: bool):
    """(name, site) of the real sample sites: no plate subsample sites, no deterministics."""
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and site["is_observed"] == observed
            and not site_is_subsample(site)
            and not _compat.is_deterministic(site)
        ):
            yield name, site


def _frame(site, plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == plate), None)


def inspect_pair(model, guide, args: tuple, kwargs: dict, *, plate: str) -> PairStructure:
    """Run the guide, then the model on its draws, once and unvectorised; refuse what
    per-datapoint importance sampling cannot score, naming the sites and the fix.

    :returns: :class:`PairStructure`.
    """
    with torch.random.fork_rng(devices=[]), _RandomSubsample() as random:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    subsets = _random_subsets(random.plates, guide_trace, model_trace)
    if subsets:
        raise ValueError(
            f"plate {subsets[0]!r} draws a random subset (subsample_size=...): every particle chunk "
            "would score different datapoints. Pass the datapoints to score as the data, with the plate's "
            "size equal to their number and no subsample_size (or fix them with subsample=indices)"
        )
    observed = [n for n, _ in _sample_sites(model_trace, observed=True)]
    if not observed:
        raise ValueError("the model has no observed sample sites (obs=...): there is no log p(x) to estimate")
    model_latents = dict(_sample_sites(model_trace, observed=False))
    guide_latents = dict(_sample_sites(guide_trace, observed=False))
    frame = _data_frame(model_trace, observed, guide_latents, plate)
    _refuse_outside(model_trace, observed, {**model_latents, **guide_latents}, plate)
    enumerated = _refuse_unmatched(model_latents, guide_latents)
    dims = [-f.dim for tr in (model_trace, guide_trace) for n, s in tr.nodes.items()
            if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized]
    return PairStructure(
        plate=plate,
        plate_dim=frame.dim,
        size=frame.size,
        nesting=max(dims, default=0),
        observed=tuple(observed),
        latents=tuple(guide_latents),
        enumerated=tuple(enumerated),
        shapes={n: s["value"].shape for n, s in guide_latents.items()},
        model_trace=model_trace,
    )


def _data_frame(model_trace, observed, guide_latents, plate):
    sites = [model_trace.nodes[n] for n in observed] + list(guide_latents.values())
    frame = next((f for f in (_frame(s, plate) for s in sites) if f is not None), None)
    if frame is None:
        raise ValueError(
            f"no sample site is inside a plate named {plate!r}; put the observations in "
            f"pyro.plate({plate!r}, N) or pass plate= with the name your model uses"
        )
    if not frame.vectorized:
        raise ValueError(f"plate {plate!r} must be vectorised (pyro.plate used as a context, not an iterator)")
    return frame


def _refuse_outside(model_trace, observed, latents, plate):
    outside = [n for n in observed if _frame(model_trace.nodes[n], plate) is None]
    if outside:
        raise ValueError(
            f"observed sites {outside} are outside plate {plate!r}; every observation must belong to a "
            f"datapoint: move them inside pyro.plate({plate!r}, N)"
        )
    global_latents = sorted(n for n, s in latents.items() if _frame(s, plate) is None)
    if global_latents:
        raise ValueError(
            f"latent sites {global_latents} lie outside plate {plate!r} (global latents): log p(x) does not "
            "factorise over datapoints, so per-datapoint estimates are undefined; make them pyro.param "
            "point estimates, or fix them with poutine.condition and hide them with poutine.block "
            "(see the pyrovae.importance docs)"
        )


def _refuse_unmatched(model_latents, guide_latents) -> List[str]:
    """The names of the model's enumerated sites; refuse latents only one program samples."""
    guide_only = [n for n in guide_latents if n not in model_latents]
    if guide_only:
        raise ValueError(
            f"the guide samples sites {guide_only} that the model does not sample as latents: their log q "
            "would enter the weights without a matching log p, and the estimate would not be log p(x). "
            "Remove them from the guide, or give them a prior in the model"
        )
    unproposed = {n: s for n, s in model_latents.items() if n not in guide_latents}
    sequential = [n for n, s in unproposed.items() if s["infer"].get("enumerate") == "sequential"]
    if sequential:
        raise ValueError(
            f"model sites {sequential} are enumerated sequentially; pyrovae sums discrete latents in "
            'parallel: use infer={"enumerate": "parallel"} (or config_enumerate(model))'
        )
    missing = [n for n, s in unproposed.items() if s["infer"].get("enumerate") != "parallel"]
    if missing:
        raise ValueError(
            f"model latent sites {missing} are not sampled by the guide; the guide must propose every "
            'latent, or mark a discrete one infer={"enumerate": "parallel"} to sum it out exactly'
        )
    return list(unproposed)


# --------------------------------------------------------------------------- scoring
def _log_density(site, fn=None) -> torch.Tensor:
    """The site's log-density at its value, from ``fn`` if given (the same distribution without
    the particle dim, see :class:`_Broadcasting`), else from the site's own distribution."""
    # Unscaled: β, warm-up and subsampling scales are training weights, not part of p or q.
    # Masked: poutine.mask removes the term from the density (a missing observation).
    return scale_and_mask((site["fn"] if fn is None else fn).log_prob(site["value"]), mask=site["mask"])


def _per_datapoint(lp, structure: PairStructure, num: int, particles: bool, name: str) -> torch.Tensor:
    """Sum a log-density over every dim but the particle and data dims: shape ``(num, N)``."""
    width = structure.nesting + int(particles)
    lp = torch.as_tensor(lp)
    if lp.dim() > width:
        raise ValueError(
            f"site {name!r} has log_prob of shape {tuple(lp.shape)}, more batch dims than its plates "
            f"declare; declare the extra dims with .to_event() or a pyro.plate"
        )
    lp = lp.reshape((1,) * (width - lp.dim()) + lp.shape)
    data = width + structure.plate_dim
    other = [d for d in range(width) if d != data and not (particles and d == 0)]
    if other:
        lp = lp.sum(other)
    if not particles:
        lp = lp.unsqueeze(0)
    return lp.expand(num, structure.size)


def _enumerated_log_joint(trace, structure: PairStructure, num: int, particles: bool) -> torch.Tensor:
    """log p(x_i, z) with the enumerated discrete latents summed out, shape ``(num, N)``.

    Every model term goes into Pyro's plated sum-product contraction: enumerated dims are
    log-sum-exp'd inside the plates they live in, other plate dims summed, and the result kept
    per particle and per datapoint.
    """
    symbols = _compat.pack_trace(trace)
    tree, sum_dims, sizes = OrderedDict(), set(), {}
    for _, site in (*_sample_sites(trace, True), *_sample_sites(trace, False)):
        term = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        tree.setdefault(ordinal, []).append(term)
        sum_dims.update(d for d in _compat.packed_dims(term) if d not in symbols.values())
        sizes.update(zip(_compat.packed_dims(term), term.shape))
    keep = ([PARTICLE_PLATE] if particles else []) + [structure.plate]
    sizes.update({symbols[PARTICLE_PLATE]: num} if particles else {})
    sizes[symbols[structure.plate]] = structure.size
    target = [symbols[n] for n in keep]
    total = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(target), ring=LogRing(dim_to_size=sizes))
    total = total.permute([_compat.packed_dims(total).index(s) for s in target])
    return total.reshape(num, structure.size)


def _score(model_trace, guide_trace, structure: PairStructure, num: int, particles: bool, scored=None):
    """Log weights ``(num, N)`` in float64, and the round-off scale ``(N,)`` of their terms.

    ``scored``: None, or for ``"model"`` and ``"guide"`` a dict of site name to its log-density, computed
    while the programs ran (:class:`_ParticlePlate`); the other sites are scored here.

    This runs once per chunk of particles, so it takes few tensor operations: the terms are
    stacked, and the magnitudes of those that are already per datapoint are taken at once.
    """
    model_sites = (*_sample_sites(model_trace, True), *_sample_sites(model_trace, False))
    terms, summed, dtypes = [], [], set()  # summed: magnitudes of terms summed over other dims
    if structure.enumerated:
        total = _enumerated_log_joint(model_trace, structure, num, particles)
        terms.append(total.double())
        dtypes.add(total.dtype)
        model_sites = ()
    num_model = len(terms) + len(model_sites)
    scored = scored or {"model": {}, "guide": {}}
    sites = [(n, s, scored["model"].get(n)) for n, s in model_sites]
    sites += [(n, s, scored["guide"].get(n)) for n, s in _sample_sites(guide_trace, False)]
    for name, site, lp in sites:
        lp = torch.as_tensor(_log_density(site) if lp is None else lp)
        dtypes.add(lp.dtype)
        if particles and lp.shape == (num, structure.size):
            terms.append(lp.double())
        else:  # the magnitude of each summand counts, not that of their sum
            terms.append(_per_datapoint(lp, structure, num, particles, name).double())
            summed.append((len(terms) - 1, _per_datapoint(_finite_abs(lp), structure, num, particles, name)))
    stacked = torch.stack(terms)
    lw = stacked[:num_model].sum(0) - stacked[num_model:].sum(0)
    # Zero weights (-inf) carry no round-off; they must not make a datapoint look constant.
    magnitudes = _finite_abs(stacked)
    for i, m in summed:
        magnitudes[i] = m
    eps = max([torch.finfo(torch.float64).eps] + [torch.finfo(d).eps for d in dtypes if d.is_floating_point])
    return lw, ROUNDOFF_ULPS * eps * (1.0 + magnitudes.sum(0).max(0).values)


def _finite_abs(lp: torch.Tensor) -> torch.Tensor:
    """``|lp|`` where finite, else 0."""
    return lp.abs().nan_to_num(nan=0.0, posinf=0.0)


def _trace_model(model, guide_trace, args, kwargs, structure: PairStructure, particles: bool):
    if structure.enumerated:
        # enum inside replay: it must see the replayed sites before they are done, to record
        # which enumerated dims their log-densities carry.
        model = poutine.enum(model, first_available_dim=-(structure.nesting + 1 + int(particles)))
    return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


# --------------------------------------------------------------------------- passes
class _ParticlePlate(pyro.plate):
    """The particle plate. Besides adding the particle dim, it

    * keeps each sample site's distribution as the programs' own plates left it, before it was
      expanded over the particles (:attr:`unexpanded`, by program and site name): its
      parameters do not repeat over the particles, so its log-density at the particles'
      values, computed by broadcasting, takes less work (:class:`_Broadcasting`);
    * with ``broadcasting`` given, scores each site as soon as it is sampled
      (:attr:`scored`), with the unexpanded distribution where ``broadcasting`` approved it.
      The density's operations then follow the ones that made its parameters (the decoder)
      without a stretch of Python in between, long enough for the CPU's worker threads to
      fall asleep and be woken again (measured: 3-4 ms of a 45 ms chunk).

    :attr:`program` names the program being run ("guide", then "model"); ``score`` the
    programs whose sites it scores.
    """

    def __init__(self, size: int, dim: int, broadcasting: Optional["_Broadcasting"] = None,
                 score: Sequence[str] = ("guide", "model")):
        super().__init__(PARTICLE_PLATE, size, dim=dim)
        self.broadcasting, self.score = broadcasting, tuple(score)
        self.program = "guide"
        self.unexpanded: Dict[str, Dict[str, object]] = {"guide": {}, "model": {}}
        self.scored: Dict[str, Dict[str, torch.Tensor]] = {"guide": {}, "model": {}}

    def _process_message(self, msg):
        if msg["type"] == "param":
            # A parameter is the same for every particle: the plate neither indexes nor
            # broadcasts it (it has no subsample), so it is left alone, which saves time.
            return
        fn = msg["fn"]
        super()._process_message(msg)
        if msg["type"] == "sample" and msg["fn"] is not fn and msg["fn"].batch_shape != fn.batch_shape:
            self.unexpanded[self.program][msg["name"]] = fn

    def _postprocess_message(self, msg):
        if msg["type"] == "param":
            return
        super()._postprocess_message(msg)
        if (self.broadcasting is not None and self.program in self.score and msg["type"] == "sample"
                and not site_is_subsample(msg) and not _compat.is_deterministic(msg)):
            small = self.unexpanded[self.program].get(msg["name"])
            approved = small is not None and self.broadcasting.approves(self.program, msg["name"], small, msg)
            self.scored[self.program][msg["name"]] = _log_density(msg, small if approved else None)


class _Broadcasting:
    """The sites whose log-density is computed from the unexpanded distribution: those for
    which it was bitwise equal to the expanded distribution's on the first chunk, identified
    by program, site name, the distribution's type and its shapes."""

    def __init__(self):
        self.approved = set()

    @staticmethod
    def _signature(program: str, name: str, fn, site) -> tuple:
        return program, name, type(fn), fn.batch_shape, fn.event_shape, site["fn"].batch_shape

    def approve(self, first: ParticlePass) -> None:
        if not first.unexpanded:
            return
        for program, trace in (("model", first.model_traces[0]), ("guide", first.guide_traces[0])):
            for name, fn in first.unexpanded[program].items():
                site = trace.nodes[name]
                try:  # the user's distribution, given values with an extra leading dim
                    small = _log_density(site, fn)
                except Exception:  # not computable this way: the site keeps its expanded distribution
                    continue
                big = _log_density(site)
                if small.shape == big.shape and small.dtype == big.dtype and torch.equal(small, big):
                    self.approved.add(self._signature(program, name, fn, site))

    def approves(self, program: str, name: str, fn, site) -> bool:
        return self._signature(program, name, fn, site) in self.approved


def particle_pass(model, guide, args, kwargs, structure: PairStructure, num: int,
                  broadcasting: Optional[_Broadcasting] = None) -> ParticlePass:
    """``num`` particles in one vectorised run: the particle plate sits left of every plate of the
    programs. With ``broadcasting``, the sites are scored as they are sampled (:class:`_ParticlePlate`)."""
    # the model's densities of enumerated programs are summed out by _enumerated_log_joint instead
    score = ("guide",) if structure.enumerated else ("guide", "model")
    plate = _ParticlePlate(num, dim=-(structure.nesting + 1), broadcasting=broadcasting, score=score)
    with plate:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        plate.program = "model"
        model_trace = _trace_model(model, guide_trace, args, kwargs, structure, particles=True)
    scored = None if broadcasting is None else plate.scored
    lw, roundoff = _score(model_trace, guide_trace, structure, num, particles=True, scored=scored)
    return ParticlePass(lw, roundoff, (guide_trace,), (model_trace,), vectorized=True,
                        unexpanded=plate.unexpanded)


def sequential_pass(model, guide, args, kwargs, structure: PairStructure, num: int,
                    keep_traces: bool = False) -> ParticlePass:
    """``num`` particles, one run of the programs each, exactly as they were written."""
    lws, roundoffs, guide_traces, model_traces = [], [], [], []
    for _ in range(num):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = _trace_model(model, guide_trace, args, kwargs, structure, particles=False)
        lw, roundoff = _score(model_trace, guide_trace, structure, 1, particles=False)
        lws.append(lw)
        roundoffs.append(roundoff)
        if keep_traces:
            guide_traces.append(guide_trace)
            model_traces.append(model_trace)
    return ParticlePass(torch.cat(lws), torch.stack(roundoffs).max(0).values,
                        tuple(guide_traces), tuple(model_traces), vectorized=False)


def _replay_particle(model, guide, args, kwargs, structure: PairStructure, guide_trace, k: int):
    """Particle ``k`` of a vectorised guide trace, replayed through the unvectorised programs."""
    sliced = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        value = site["value"]
        if name in structure.shapes:
            dim = value.dim() - site["fn"].event_dim - (structure.nesting + 1)
            value = value.select(dim, k).reshape(structure.shapes[name])
        sliced.add_node(name, **{**site, "value": value})
    replayed = poutine.trace(poutine.replay(guide, trace=sliced)).get_trace(*args, **kwargs)
    model_trace = _trace_model(model, replayed, args, kwargs, structure, particles=False)
    return _score(model_trace, replayed, structure, 1, particles=False)


def _disagreement(model, guide, args, kwargs, structure: PairStructure, first: ParticlePass) -> Optional[str]:
    """None if the first and last particles of a vectorised pass score the same when replayed
    one at a time; else what differs. A program can broadcast wrongly over the particle
    dimension without raising (``z.sum(0)``, ``reshape(len(x), -1)``)."""
    num = first.log_weights.shape[0]
    for k in sorted({0, num - 1}):
        try:
            seq, roundoff = _replay_particle(model, guide, args, kwargs, structure, first.guide_traces[0], k)
        except Exception as error:  # the replay runs the user's program; any failure means "not the same"
            return f"replaying particle {k} unvectorised failed ({type(error).__name__}: {error})"
        seq, vec = seq[0], first.log_weights[k]
        tol = (_CHECK_ULPS // ROUNDOFF_ULPS) * torch.maximum(roundoff, first.roundoff)
        same = (seq == vec) | ((seq - vec).abs() <= tol) | (seq.isnan() & vec.isnan())
        if not same.all():
            i = int((~same).nonzero()[0, 0])
            return (f"the vectorised program gives log weight {float(vec[i]):.6g} for particle {k}, datapoint {i}, "
                    f"where the program run one particle at a time gives {float(seq[i]):.6g}: it broadcasts over "
                    "the particle dimension in a way that changes its value")
    return None


def _first_chunk(model, guide, args, kwargs, structure, num) -> Tuple[Optional[ParticlePass], Optional[str]]:
    try:
        first = particle_pass(model, guide, args, kwargs, structure, num)
    except Exception as error:  # any failure of the user's program under an extra batch dim falls back
        return None, f"the program fails with particles vectorised ({type(error).__name__}: {error})"
    reason = _disagreement(model, guide, args, kwargs, structure, first)
    return (None, reason) if reason else (first, None)


def log_weights(model, guide, args: tuple, kwargs: dict, structure: PairStructure, *, num_particles: int,
                chunk_size: Optional[int] = None, keep_traces: bool = False,
                networks: Sequence[torch.nn.Module] = ()) -> LogWeights:
    """Log weights of ``num_particles`` particles for every datapoint, ``chunk_size`` at a time.

    The first chunk is checked against an unvectorised replay; if the program cannot be
    vectorised, all particles run sequentially (K stays exact) and the result says why.
    Runs with Pyro validation off: :func:`inspect_pair` validated the same programs, and
    validation never changes a value. With ``chunk_size=None`` the first chunk holds about
    :data:`PROBE_PAIRS` particle-datapoint pairs and measures the memory a particle takes;
    the next chunks are as large as :data:`CHUNK_MEMORY` allows (:func:`auto_chunk_size`).
    No chunk after the first reads a value back to the host. A call of one of ``networks``
    whose inputs do not change from chunk to chunk (the guide's encoder of x) is computed
    once, where that is exact (:class:`pyrovae.reuse.ReusedCalls`). Without ``keep_traces``,
    chunks of one size are replayed from a checked tape when there are at least
    :data:`TAPE_MIN_CHUNKS` of them (:class:`_Replayed`).

    :returns: :class:`LogWeights`, ``log_weights`` of shape ``(num_particles, N)``.
    """
    chunk = first_chunk_size(structure, num_particles, chunk_size)
    device = _data_device(args, kwargs)
    with pyro.validation_enabled(False), ReusedCalls(networks):
        with _PeakMemory(device) as peak:
            first, reason = _first_chunk(model, guide, args, kwargs, structure, chunk)
        if reason is None:
            passes, done = [first], chunk
            if chunk_size is None:
                chunk = auto_chunk_size(peak.bytes or _trace_bytes(first), chunk, device, num_particles - done)
            broadcasting = _Broadcasting()
            broadcasting.approve(first)
            keep = (lambda p: p) if keep_traces else _without_traces
            passes[0] = keep(first)
            del first
            run = lambda num: particle_pass(model, guide, args, kwargs, structure, num, broadcasting)  # noqa: E731
            chunks = _Replayed(run, chunk, device, record=not keep_traces and
                               (num_particles - done) // chunk >= TAPE_MIN_CHUNKS)
            while done < num_particles:
                step = min(chunk, num_particles - done)
                passes.append(keep(chunks(step)))
                done += step
        else:
            passes = [sequential_pass(model, guide, args, kwargs, structure, num_particles, keep_traces)]
    return LogWeights(
        log_weights=torch.cat([p.log_weights for p in passes]),
        roundoff=torch.stack([p.roundoff for p in passes]).max(0).values,
        sequential=reason is not None,
        fallback_reason=reason,
        passes=tuple(passes) if keep_traces else (),
    )


class _Replayed:
    """Runs chunks of particles: those of ``size`` particles from a :class:`~pyrovae.tape.Tape` of one
    of them, the others as the programs are written.

    The first chunk of ``size`` is recorded (``record``). The next one runs as written and is
    replayed from the same random state; the tape is trusted only if the log weights, their
    round-off scale and the random state after it are bitwise the same. A refused recording, a
    failed check or a failing replay turn the tape off for the call, with the reason logged.
    Either way, the log weights and the random state are those of the programs run as written.
    """

    def __init__(self, run, size: int, device: torch.device, *, record: bool):
        self.run, self.size, self.device = run, size, device
        self.stage = "record" if record else "off"
        self.tape: Optional[Tape] = None

    def __call__(self, num: int) -> ParticlePass:
        if num != self.size or self.stage == "off":
            return self.run(num)
        return getattr(self, f"_{self.stage}")(num)

    def _off(self, reason: str) -> None:
        self.stage, self.tape = "off", None
        log.info("pyrovae: chunks of particles run as written, %s", reason)

    def _record(self, num: int) -> ParticlePass:
        before = torch_state(self.device)
        try:
            (lw, roundoff), self.tape = Tape.record(lambda: _outputs(self.run(num)))
        except Exception as error:  # refused, or an operation that a dispatch mode cannot follow
            set_torch_state(before, self.device)
            self._off(f"the recording was refused: {error}" if isinstance(error, Refused) else
                      f"the recording failed ({type(error).__name__}: {error})")
            return self.run(num)
        self.stage = "check"
        return ParticlePass(lw, roundoff)

    def _check(self, num: int) -> ParticlePass:
        before = torch_state(self.device)
        written = _without_traces(self.run(num))  # its traces hold a chunk's memory: not during the replay
        after = torch_state(self.device)
        set_torch_state(before, self.device)
        try:
            lw, roundoff = self.tape()
            differs = None if (torch.equal(lw, written.log_weights) and torch.equal(roundoff, written.roundoff)
                               and same_torch_state(after, torch_state(self.device))) else "differs from"
        except Exception as error:  # the replay runs the user's operations; any failure means "not the same"
            differs = f"failed ({type(error).__name__}: {error}) where it ran as"
        set_torch_state(after, self.device)
        if differs is None:
            self.stage = "replay"
            log.debug("pyrovae: chunks of %d particles replayed from a tape (%d results folded)", num, self.tape.folded)
        else:
            self._off(f"the replayed chunk {differs} the programs run afresh")
        return written

    def _replay(self, num: int) -> ParticlePass:
        before = torch_state(self.device)
        try:
            lw, roundoff = self.tape()
        except Exception as error:  # checked once, but a later chunk may still meet what the check did not
            set_torch_state(before, self.device)
            self._off(f"the replay failed ({type(error).__name__}: {error})")
            return self.run(num)
        return ParticlePass(lw, roundoff)


def _outputs(p: ParticlePass) -> List[torch.Tensor]:
    return [p.log_weights, p.roundoff]


def first_chunk_size(structure: PairStructure, num_particles: int, chunk_size: Optional[int] = None) -> int:
    """Particles in the first chunk: ``chunk_size``, or by default about :data:`PROBE_PAIRS`
    particle-datapoint pairs; at least 1 and at most ``num_particles``."""
    return min(chunk_size or max(1, PROBE_PAIRS // structure.size), num_particles)


def _without_traces(p: ParticlePass) -> ParticlePass:
    """The pass without its traces, which hold every network output of its chunk."""
    return ParticlePass(p.log_weights, p.roundoff)


class _PeakMemory:
    """Bytes the block allocated at its peak, on CUDA (None elsewhere: see :func:`_trace_bytes`)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = max(1, torch.cuda.max_memory_allocated(self.device) - self._base)


def _trace_bytes(first: ParticlePass) -> int:
    """The CPU's proxy for what a chunk takes: twice the bytes of the sample values its traces
    hold, each storage counted once. The values grow with the particles as the activations do;
    :data:`CHUNK_MEMORY` is calibrated against this proxy (counting the distributions'
    parameters as well gave slower chunk sizes at every budget tried)."""
    seen, total = set(), 0
    for trace in (*first.guide_traces, *first.model_traces):
        for site in trace.nodes.values():
            t = site.get("value")
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return 2 * max(total, 1)


def auto_chunk_size(chunk_bytes: int, chunk: int, device: torch.device, remaining: int) -> int:
    """Particles per chunk such that a chunk takes at most :data:`CHUNK_MEMORY` of ``device``
    (on CUDA also at most half its free memory), given that ``chunk`` particles took
    ``chunk_bytes``; between 1 and ``remaining``."""
    budget = CHUNK_MEMORY.get(device.type, CHUNK_MEMORY["cpu"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 2)
    per_particle = max(1, chunk_bytes // chunk)
    return int(max(1, min(remaining, budget // per_particle)))


# --------------------------------------------------------------------------- draws for export
def _traces(passes: Sequence[ParticlePass], which: str) -> List[Tuple[poutine.Trace, bool]]:
    return [(t, p.vectorized) for p in passes for t in getattr(p, which)]


def posterior_traces(model, args, kwargs, structure: PairStructure, passes: Sequence[ParticlePass]):
    """Traces holding every latent at each particle: the guide's draws, and enumerated discrete
    latents drawn from their posterior p(c | x, z) (``infer_discrete``).

    :returns: list of ``(trace, vectorized)``.
    """
    if not structure.enumerated:
        return _traces(passes, "guide_traces")
    out = []
    for guide_trace, vectorized in _traces(passes, "guide_traces"):
        # condition, not replay: infer_discrete's enumeration must see the guide's draws as
        # factors that depend on the discrete latents.
        fixed = poutine.condition(_particles(model, guide_trace, structure, vectorized),
                                  data=_latent_values(guide_trace, structure.latents))
        program = infer_discrete(fixed, first_available_dim=-(structure.nesting + 1 + int(vectorized)))
        out.append((poutine.trace(program).get_trace(*args, **kwargs), vectorized))
    return out


def predictive_traces(model, args, kwargs, structure: PairStructure, traces):
    """The model re-run at each posterior trace with its observations re-drawn.

    :returns: list of ``(trace, vectorized)``; the observed sites hold fresh draws there.
    """
    out = []
    for trace, vectorized in traces:
        latents = _latent_values(trace, (*structure.latents, *structure.enumerated))
        program = poutine.uncondition(_particles(model, trace, structure, vectorized))
        out.append((poutine.trace(poutine.condition(program, data=latents)).get_trace(*args, **kwargs), vectorized))
    return out


def _latent_values(trace, names) -> Dict[str, torch.Tensor]:
    return {n: trace.nodes[n]["value"] for n in names}


def _particles(model, trace, structure: PairStructure, vectorized: bool):
    """``model`` run inside the particle plate of ``trace`` (inside, so that handlers which
    block outer ones, as ``infer_discrete`` does, still see it)."""
    if not vectorized:
        return model
    num = next(f.size for s in trace.nodes.values() if s["type"] == "sample"
               for f in s["cond_indep_stack"] if f.name == PARTICLE_PLATE)
    return functools.partial(_in_plate, model, num, -(structure.nesting + 1))


def _in_plate(model, num: int, dim: int, *args, **kwargs):
    with pyro.plate(PARTICLE_PLATE, num, dim=dim):
        return model(*args, **kwargs)


def datapoint_major(site, structure: PairStructure, vectorized: bool) -> Tuple[torch.Tensor, List[Optional[str]]]:
    """A site's value laid out as ``([particles,] N, *other plates, *other dims)``, whatever its plate layout.

    :returns: the tensor and, for each dim after the data dim, the plate it belongs to (None for
        event dims and batch dims without a plate).
    """
    value = site["value"]
    event = site["fn"].event_dim
    width = structure.nesting + int(vectorized)
    batch = value.dim() - event
    value = value.reshape((1,) * max(0, width - batch) + value.shape)
    extra = max(0, batch - width)  # batch dims no plate declares, left of the plates
    plates = {extra + width + f.dim: f.name for f in site["cond_indep_stack"]
              if f.vectorized and f.name not in (PARTICLE_PLATE, structure.plate)}
    data = extra + width + structure.plate_dim
    head = [extra] if vectorized else []
    keep = [d for d in range(extra + width) if d not in head and d != data and (d in plates or value.shape[d] > 1)]
    drop = [d for d in range(extra + width) if d not in head + [data] + keep]
    order = head + [data] + keep + drop + list(range(extra + width, value.dim()))
    value = value.permute(order)
    kept = len(head) + 1 + len(keep)  # the dropped dims (all of size 1) follow the kept ones
    value = value.reshape(value.shape[:kept] + value.shape[kept + len(drop):])
    names = [plates.get(d) for d in keep] + [None] * event
    shape = list(value.shape)
    shape[len(head)] = structure.size
    return value.expand(shape), names


# --------------------------------------------------------------------------- training objectives
def training_log_weights(model, guide, args: tuple, kwargs: dict, structure: PairStructure, num: int, *,
                         detach_draws: bool = False):
    """``num`` vectorised particles as a training objective sees them: with gradients, and with
    ``poutine.scale`` applied (β, KL warm-up), where importance sampling deliberately drops it.

    :returns: ``(log_weights, log_q_detached, log_p)``, each ``(num, N)`` in the programs'
        dtype: the scaled log weights; the guide's scaled log-density of its own draws with
        the draws detached (its gradient holds only the direct dependence on the guide's
        parameters, which the doubly-reparameterised estimator subtracts); and the model's
        log p(x, z). With ``detach_draws`` the model scores draws cut from the guide's parameters.
    """
    if structure.enumerated:
        raise ValueError(f"model sites {list(structure.enumerated)} are enumerated; the IWAE objective needs "
                         "every latent proposed by the guide. Train this pair with TraceEnum_ELBO")
    with pyro.plate(PARTICLE_PLATE, num, dim=-(structure.nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if detach_draws:
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"]:
                    site["value"] = site["value"].detach()
        model_trace = _trace_model(model, guide_trace, args, kwargs, structure, particles=True)

    def term(site, value):
        lp = scale_and_mask(site["fn"].log_prob(value), scale=site["scale"], mask=site["mask"])
        return _per_datapoint(lp, structure, num, True, site["name"])

    log_p = sum(term(s, s["value"]) for _, s in (*_sample_sites(model_trace, True), *_sample_sites(model_trace, False)))
    guide_sites = [s for _, s in _sample_sites(guide_trace, False)]
    log_q = sum(term(s, s["value"]) for s in guide_sites)
    log_q_detached = sum(term(s, s["value"].detach()) for s in guide_sites)
    return log_p - log_q, log_q_detached, log_p
