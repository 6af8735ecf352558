"""Training any model/guide pair by stochastic variational inference.

Nothing here is specific to :class:`~pyrovae.VAE`. :func:`fit` takes two Pyro
programs with the same signature and follows Pyro's ``svi_torch`` pattern: a
Pyro ELBO gives a differentiable loss, a plain torch optimiser steps the
parameters. The pieces:

* :class:`FitConfig`: the options, validated when built;
* :class:`TrainState`: everything a checkpoint saves and a resume restores;
* :class:`Trainer`: the phases (``step``, ``run_epoch``, ``validate``,
  ``save``, ``restore``) and the loop over epochs;
* :func:`fit`: checks the arguments, builds those, runs, and always closes the
  process group.

Parameters are found by :class:`~pyrovae.pair.ModelGuidePair` from one run of
the programs, as Pyro's ``SVI`` finds them. Create every parameter in the first call.
"""

import contextlib
import csv
import inspect
import io
import json
import logging
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import pyro
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from . import cudagraph, distributed, rng
from ._checks import check_bool, check_choice, check_float, check_int, check_seed
from .data import DataSplits, LoaderBatches, TensorBatches
from .handlers import ScaleLatents
from .iwae import IWAE, IWAEDReG
from .objectives import ANCHOR, Objective, check_structure
from .sources import Source, SourceRun
from .pair import ModelGuidePair, copy_into, batch_arguments
from .runs import CONFIG, Checkpoint, CheckpointError, RunFolder, json_bytes
from .static import StaticStep

__all__ = ["fit", "FitConfig", "FitResult", "TrainState", "Trainer", "NonFiniteLossError", "ELBOS", "OPTIMIZERS",
           "LR_SCHEDULES"]

#: ELBO estimators by key: Pyro's Trace_ELBO and TraceMeanField_ELBO, and the per-datapoint
#: IWAE-K bound with the plain or the doubly-reparameterised gradient (:mod:`pyrovae.iwae`)
ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "iwae": IWAE, "iwae-dreg": IWAEDReG}
#: optimisers by key
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
#: with ``static_graph="auto"``, record a static graph when a call has at least this
#: many steps to run, by device type (others use the CPU's): recording and checking pay for
#: themselves after 70-135 steps on 2 CPU cores and about 30 on an H100, where recorded
#: steps replay as CUDA graphs (benchmarks/static_threshold.py; figures in
#: benchmarks/README.md)
STATIC_GRAPH_MIN_STEPS = {"cpu": 150, "cuda": 50}
log = logging.getLogger("pyrovae")
#: learning-rate schedules by key, stepped once per epoch
LR_SCHEDULES = {
    "cosine": lambda opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)),
    "exponential": lambda opt, epochs: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95),
}
#: options a resumed run may change; the others define the objective or the batch order
RESUMABLE_CHANGES = frozenset({"epochs", "lr", "device", "progress", "patience", "checkpoint_every", "static_graph",
                               "cuda_graph", "validate", "clip_norm"})
#: folders of a run folder whose files describe one checkpoint (what later commands wrote):
#: removed when training moves the checkpoint on
DERIVED_FOLDERS = ("evaluate", "check", "sample", "reconstruct")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; parameters were not updated with it."""


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit`, validated when constructed (see :func:`fit` for meanings)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    optimizer_options: Optional[dict] = None
    elbo: str = "trace"
    num_particles: int = 1
    clip_norm: Optional[float] = None
    lr_schedule: Optional[str] = None
    kl_warmup_epochs: float = 0.0
    patience: Optional[int] = None
    seed: Optional[int] = 0
    device: str = "auto"
    checkpoint_every: int = 1
    shuffle: bool = True
    progress: bool = True
    validate: str = "first"
    static_graph: Union[bool, str] = "auto"
    cuda_graph: Union[bool, str] = "auto"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("patience", self.patience, allow_none=True)
        check_float("lr", self.lr, positive=True, maximum=float(torch.finfo(torch.float32).max))
        check_float("weight_decay", self.weight_decay)
        check_float("clip_norm", self.clip_norm, positive=True, allow_none=True)
        check_float("kl_warmup_epochs", self.kl_warmup_epochs)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        object.__setattr__(self, "optimizer_options", _optimizer_options(self.optimizer, self.optimizer_options))
        check_choice("elbo", self.elbo, [*ELBOS, "custom"])
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES, allow_none=True)
        check_choice("validate", self.validate, ("first", "always"))
        check_seed("seed", self.seed)
        distributed.check_device(self.device)
        for name in ("static_graph", "cuda_graph"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        if self.static_graph is True and self.validate == "always":
            raise ValueError("static_graph=True replays recorded steps, which cannot run Pyro's checks every step; "
                             "use validate='first' or static_graph=False")
        check_bool("shuffle", self.shuffle)
        check_bool("progress", self.progress)

    def changes_on_resume(self, saved: dict) -> List[str]:
        """Options that differ from ``saved`` and may not change on resume."""
        return sorted(k for k, v in asdict(self).items()
                      if k not in RESUMABLE_CHANGES and k in saved and saved[k] != _jsonable(v))


#: optimisers with one fused kernel for the whole update on the CPU (``fused=True``)
FUSED_ON_CPU = ("adam", "adamw")


def _kernel_choice(config: "FitConfig", device: torch.device) -> dict:
    """``{"fused": True}`` for Adam and AdamW on the CPU, unless ``optimizer_options`` chooses an
    implementation: one kernel per parameter instead of about ten, the same update. A CPU Adam
    step of the 784-400-50 VAE takes 0.6 ms fused against 3 ms in the default implementation
    (``benchmarks/README.md``). CUDA keeps torch's default, which CUDA graphs capture."""
    chosen = set(config.optimizer_options or {}) & {"fused", "foreach"}
    if config.optimizer in FUSED_ON_CPU and device.type == "cpu" and not chosen:
        return {"fused": True}
    return {}


def _optimizer_options(optimizer: str, options) -> Optional[dict]:
    """Validated optimiser keywords in their JSON form (tuples as lists), so a saved run compares equal."""
    if options is None:
        return None
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"optimizer_options must be a dict of keyword arguments, got {options!r}")
    own = {"params", "lr", "weight_decay"} & set(options)
    if own:
        raise ValueError(f"optimizer_options may not set {sorted(own)}: pass them as fit's own options")
    accepted = set(inspect.signature(OPTIMIZERS[optimizer]).parameters) - {"params", "lr", "weight_decay"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"optimizer_options {unknown} are not options of {OPTIMIZERS[optimizer].__name__}; "
                         f"it takes {sorted(accepted)}")
    try:
        canonical = json.loads(json.dumps(options, allow_nan=False))
        OPTIMIZERS[optimizer]([torch.zeros(1, device="cpu", requires_grad=True)], **canonical)
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer_options {options!r} are not valid for {optimizer!r}: {e}") from None
    return canonical


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    :ivar history: one dict per completed epoch with ``epoch``, ``train_elbo``
        and ``val_elbo`` (nats per datapoint, higher is better; ``val_elbo`` is
        None without validation data). ``train_elbo`` is the estimator's own
        objective (the Rényi bound for ``RenyiELBO``, the IWAE-K bound for
        ``"iwae"``), None for ``TraceTailAdaptive_ELBO``, which has no loss value; ``kl_weight``, ``lr`` and ``seconds``.
    :ivar best_epoch: epoch (1-based) of the best validation ELBO, or the last epoch.
    :ivar stopped_early: True if early stopping ended the run.
    :ivar run_dir: the run folder, or None.
    :ivar device: the device that was used.
    :ivar params: trained parameters by stable name (unconstrained, detached).
    :ivar rank: this process's rank under ``torchrun`` (0 in a single process).
    :ivar world_size: number of processes (see :mod:`pyrovae.distributed`).
    :ivar static_graph: True if the steps after the first ran from a recorded
        graph to the end (see :mod:`pyrovae.static`).
    :ivar static_graph_off: why they did not, or None.
    :ivar cuda_graph: True if recorded steps were replayed as CUDA graphs (see
        :mod:`pyrovae.cudagraph`). :ivar cuda_graph_off: why not, or None.
    """

    history: Tuple[dict, ...]
    best_epoch: int
    stopped_early: bool
    run_dir: Optional[Path]
    device: str
    params: Dict[str, torch.Tensor] = field(repr=False)
    rank: int = 0
    world_size: int = 1
    static_graph: bool = False
    static_graph_off: Optional[str] = None
    cuda_graph: bool = False
    cuda_graph_off: Optional[str] = None

    @property
    def train_elbo(self):
        return [h["train_elbo"] for h in self.history]

    @property
    def val_elbo(self):
        return [h["val_elbo"] for h in self.history]


@dataclass
class TrainState:
    """Everything a checkpoint saves: live tensors and objects, and where the run stands.

    :ivar params: trainable tensors by stable name (the optimiser's, in this order).
    :ivar buffers: module buffers by stable name (BatchNorm statistics).
    :ivar optimizer: the torch optimiser.
    :ivar scheduler: the LR scheduler, or None.
    :ivar generator: the generator that orders the batches.
    :ivar epoch: completed epochs. :ivar step: steps done in the current epoch.
    :ivar global_step: optimiser steps since the run began.
    :ivar perm: the current epoch's batch order. :ivar partial: its (loss sum, datapoints) so far.
    :ivar history: one row per completed epoch. :ivar best: best validation ELBO and its epoch.
    :ivar data_state: the data sources' own state (samplers), by source name.
    """

    params: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    perm: Optional[torch.Tensor] = None
    partial: Tuple[float, int] = (0.0, 0)
    history: List[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_elbo": None, "epoch": 0, "bad_epochs": 0})
    data_state: dict = field(default_factory=dict)

    def to_checkpoint(self, *, rng_ranks: List[dict], fit: dict, example, keep_perm: bool) -> Checkpoint:
        names = list(self.params)
        opt = self.optimizer.state_dict()
        return Checkpoint(
            epoch=self.epoch, step=self.step, global_step=self.global_step,
            params={k: v.detach().cpu().clone() for k, v in self.params.items()},
            buffers={k: v.detach().cpu().clone() for k, v in self.buffers.items()},
            optimizer={"state": {names[i]: s for i, s in opt["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]]},
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            rng_ranks=rng_ranks, history=list(self.history), best=dict(self.best),
            perm=self.perm if keep_perm and self.step else None, partial=self.partial, fit=fit,
            data_state=dict(self.data_state), example=example,
        )

    def load(self, ckpt: Checkpoint, *, source: str) -> None:
        """Restore from ``ckpt``: tensors in place, optimiser and scheduler state, position."""
        copy_into(self.params, ckpt.params, "parameter", source)
        if ckpt.buffers is None and self.buffers:
            raise CheckpointError(f"{source} was written by pyrovae format 1, which did not save module buffers; "
                                  f"this pair has buffers {sorted(self.buffers)[:5]}")
        if ckpt.buffers is not None:
            copy_into(self.buffers, ckpt.buffers, "buffer", source)
        index = {n: i for i, n in enumerate(self.params)}
        saved = ckpt.optimizer
        if set(saved["state"]) - set(index):
            raise CheckpointError(f"{source}: optimiser state for unknown parameters {sorted(set(saved['state']) - set(index))[:5]}")
        self.optimizer.load_state_dict({
            "state": {index[n]: s for n, s in saved["state"].items()},
            "param_groups": [{**g, "params": list(range(len(index)))} for g in saved["param_groups"]],
        })
        if self.scheduler is not None and ckpt.scheduler is not None:
            self.scheduler.load_state_dict(ckpt.scheduler)
        self.epoch, self.step, self.global_step = ckpt.epoch, ckpt.step, ckpt.global_step
        self.perm, self.partial = ckpt.perm, tuple(ckpt.partial)
        self.history, self.best, self.data_state = list(ckpt.history), dict(ckpt.best), dict(ckpt.data_state)


class _Interrupt:
    """Turn the first Ctrl-C into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Stop(Exception):
    """A requested stop (Ctrl-C) after the state was saved; carries the message."""


def _metrics_csv(history) -> bytes:
    cols = ["epoch", "train_elbo", "val_elbo", "kl_weight", "lr", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    return buf.getvalue().encode()


class Trainer:
    """The phases of one :func:`fit` call over a model/guide pair.

    :param ModelGuidePair pair: the programs.
    :param elbo: the Pyro ELBO instance.
    :param FitConfig config: validated options.
    :param TensorBatches data: training data on the training device.
    :param TensorBatches val_data: validation data, or None.
    :param group: the process group (:func:`pyrovae.distributed.setup`).
    :param RunFolder folder: where checkpoints go, or None.
    :param transform: applied to each training batch, or None.
    """

    def __init__(self, pair: ModelGuidePair, elbo: ELBO, config: FitConfig, data: TensorBatches,
                 val_data: Optional[TensorBatches], *, group, folder: Optional[RunFolder], transform=None,
                 extras: Sequence[tuple] = ()):
        self.pair, self.elbo, self.config, self.data, self.val_data = pair, elbo, config, data, val_data
        self.group, self.folder, self.transform = group, folder, transform
        self.writer = folder is not None and group.rank == 0  # one process writes the run folder
        self.scaler = ScaleLatents() if config.kl_warmup_epochs > 0 else None
        self.model = self.scaler(pair.model) if self.scaler else pair.model
        self.guide = self.scaler(pair.guide) if self.scaler else pair.guide
        n = len(data)
        self.streamed = isinstance(data, LoaderBatches)
        if self.streamed:
            self.steps_per_epoch, batch_size = data.steps, data.batch_size
            _check_loader_sampler(data, group)
        else:
            n_local = n // group.world_size if group.active else n  # DistributedSampler(drop_last=True)
            if n_local == 0:
                raise ValueError(f"data has {n} datapoints, fewer than the {group.world_size} processes")
            self.steps_per_epoch, batch_size = math.ceil(n_local / config.batch_size), config.batch_size
        self.example = data.head(min(n, 2))
        self.extras: List[SourceRun] = []
        self.state = self._initial_state(extras)
        check_structure(pair, batch_size, n)
        self.objective = Objective(elbo, pair)
        self.guide = self.objective.wrap(self.guide)
        self.static: Optional[StaticStep] = None
        self.static_off: Optional[str] = None
        self.static_steps = 0
        self.graphs: Optional[cudagraph.GraphedSteps] = None
        self.graphs_off: Optional[str] = None
        self._validated = False  # the first step ran under the caller's validation setting
        self.last_good: Optional[Path] = None

    # ------------------------------------------------------------------ set-up
    def _initial_state(self, extras) -> TrainState:
        config, dev = self.config, self.group.device
        gen = torch.Generator()
        if config.seed is not None:
            pyro.set_rng_seed(config.seed + self.group.rank)  # ranks draw different z; rank 0 as one process
            gen.manual_seed(config.seed)
        args, kwargs = batch_arguments(_first_batch(self.data, config.batch_size))
        self.pair.discover(*args, **kwargs)
        params, buffers = self.pair.parameters(), self.pair.buffers()
        for spec in extras:
            self.extras.append(self._source_run(*spec, params=params, buffers=buffers))
        for name, p in params.items():
            if p.device != dev:
                raise ValueError(
                    f"parameter {name!r} lives on {p.device} but training runs on {dev}; "
                    "create pyro.param values from the data (e.g. x.new_zeros) or pass device="
                    f"'{p.device.type}'"
                )
        plist = list(params.values())
        self.group.broadcast_(plist)
        opt = OPTIMIZERS[config.optimizer](plist, lr=config.lr, weight_decay=config.weight_decay,
                                           **_kernel_choice(config, dev), **(config.optimizer_options or {}))
        sched = LR_SCHEDULES[config.lr_schedule](opt, config.epochs) if config.lr_schedule else None
        return TrainState(params=params, buffers=buffers, optimizer=opt, scheduler=sched, generator=gen)

    def _source_run(self, name, batches, batch_size, weight, model, guide, elbo, *, params, buffers) -> SourceRun:
        """A secondary source: discover its programs, add their tensors to the run's, check its objective."""
        pair = ModelGuidePair(model or self.pair.model, guide or self.pair.guide)
        batch_size = batches.batch_size if isinstance(batches, LoaderBatches) else batch_size or self.config.batch_size
        args, kwargs = batch_arguments(_first_batch(batches, batch_size))
        pair.discover(*args, **kwargs)
        for found, into in ((pair.parameters(), params), (pair.buffers(), buffers)):
            for key, t in found.items():
                key = key if into.get(key, t) is t else f"{name}:{key}"  # the same name for another tensor
                if all(t is not u for u in into.values()):
                    into[key] = t
        check_structure(pair, batch_size, len(batches))
        return SourceRun(name, batches, batch_size, pair, Objective(elbo or self.elbo, pair), weight)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: refuse changed options that define the run, then load the state."""
        source = f"checkpoint in {self.folder.path if self.folder else '?'}"
        changed = self.config.changes_on_resume(ckpt.fit)
        if changed:
            raise ValueError(f"a resumed run keeps its objective and batch order; these options differ from the "
                             f"run's and cannot change: {', '.join(f'{k} ({ckpt.fit[k]!r} -> {getattr(self.config, k)!r})' for k in changed)}")
        saved_elbo = ckpt.fit.get("elbo_spec")
        if saved_elbo is not None and saved_elbo != self.objective.describe():
            raise ValueError(f"a resumed run keeps its objective: the run used {saved_elbo}, this call "
                             f"{self.objective.describe()}")
        if self.config.epochs < ckpt.epoch:
            raise ValueError(f"epochs={self.config.epochs} is fewer than the {ckpt.epoch} epochs the run has done; "
                             f"pass epochs >= {ckpt.epoch} (the total, not the number to add)")
        if len(ckpt.rng_ranks) != self.group.world_size:
            raise CheckpointError(f"{source} was written by {len(ckpt.rng_ranks)} process(es); resume it with the "
                                  f"same number, not {self.group.world_size}")
        self.state.load(ckpt, source=source)
        if ckpt.fit.get("lr", self.config.lr) != self.config.lr:  # a new lr on resume, e.g. after a divergence
            for g in self.state.optimizer.param_groups:
                g["lr"] = g["initial_lr"] = self.config.lr
            if self.state.scheduler is not None:
                self.state.scheduler.base_lrs = [self.config.lr] * len(self.state.optimizer.param_groups)
        rng.restore(ckpt.rng_ranks[self.group.rank], self.state.generator)

    def _plan_static(self) -> None:
        config, state = self.config, self.state
        steps_to_run = (config.epochs - state.epoch) * self.steps_per_epoch - state.step
        kind = self.group.device.type
        min_steps = STATIC_GRAPH_MIN_STEPS.get(kind, STATIC_GRAPH_MIN_STEPS["cpu"])
        if config.static_graph == "auto":
            if type(self.elbo) is not Trace_ELBO:
                self.static_off = f"auto: the ELBO is {type(self.elbo).__name__}, not Trace_ELBO"
            elif config.validate != "first":
                self.static_off = "auto: validate='always'"
            elif steps_to_run < min_steps:
                self.static_off = (f"auto: {steps_to_run} steps to run, fewer than "
                                   f"STATIC_GRAPH_MIN_STEPS[{kind!r}]={min_steps}")
        elif not config.static_graph:
            self.static_off = "static_graph=False"
        if self.extras and self.static_off is None:
            self.static_off = "several data sources"
        if self.static_off is None and not isinstance(self.example, torch.Tensor):
            # StaticStep records programs of one tensor; tuple and dict batches train eagerly
            self.static_off = "the batch is a tuple or dict of tensors (static graphs record one-tensor batches)"
            if config.static_graph is True:
                raise ValueError(f"static_graph=True: {self.static_off}; use static_graph='auto' or False")
        if self.static_off is None:
            self.static = StaticStep(self.elbo, self.model, self.guide, list(state.params.values()),
                                     pair=self.pair, variant=(self.scaler is not None,),
                                     buffers=list(state.buffers.values()))
        self._plan_graphs()

    def _plan_graphs(self) -> None:
        """CUDA graphs replay the static graph's steps where the run allows it (see :mod:`pyrovae.cudagraph`)."""
        config, state, dev = self.config, self.state, self.group.device
        if dev.type != "cuda":
            cudagraph.make_capturable(state.optimizer, False)  # e.g. a GPU run resumed on the CPU
        reason = "cuda_graph=False" if config.cuda_graph is False else cudagraph.unsupported(
            state.optimizer, dev, clip_norm=config.clip_norm, lr_schedule=config.lr_schedule,
            several_sources=bool(self.extras), distributed=self.group.active)
        if reason is None and self.static is None:
            reason = f"no static graph ({self.static_off})"
        if reason is not None and config.cuda_graph is True:
            raise ValueError(f"cuda_graph=True: {reason}; use cuda_graph='auto' or False")
        self.graphs_off = reason
        if reason is None:
            self.graphs = cudagraph.GraphedSteps(state.optimizer, list(state.params.values()), dev)

    # ------------------------------------------------------------------ phases
    def _checks(self):
        """The caller's validation setting for the first step, then off (validate="first")."""
        if self.config.validate == "always" or not self._validated:
            return contextlib.nullcontext()
        return pyro.validation_enabled(False)

    def kl_weight(self) -> float:
        if self.scaler is None:
            return 1.0
        return min(1.0, (self.state.global_step + 1) / (self.config.kl_warmup_epochs * self.steps_per_epoch))

    def _recorded(self) -> bool:
        """Recorded steps may run: after the first (validated) step, at full KL weight."""
        # KL warm-up changes a Python scale factor every step, so a recorded step waits for it to reach 1.
        return self.static is not None and self._validated and (self.scaler is None or self.scaler.factor == 1.0)

    def _graph_step(self, batch) -> bool:
        """Take the step as a CUDA graph if one can; False: take it otherwise."""
        if self.graphs is None or self.graphs.failure is not None or not self._recorded():
            return False
        graph = self.static.checked_graph(batch)
        if graph is None:  # the static graph checks a new shape first
            return False
        taken = self.graphs(batch, graph)
        if self.graphs.failure is not None:
            self.graphs_off = self.graphs.failure
            log.info("pyrovae: CUDA graphs off, %s; replaying the static graph", self.graphs_off)
            if self.config.cuda_graph is True:
                warnings.warn(f"cuda_graph=True: {self.graphs_off}", RuntimeWarning, stacklevel=4)
        return taken

    def _loss_and_grads(self, batch):
        """The step's loss and, from a recorded graph, its gradients (None: call backward)."""
        if self._recorded():
            out = self.static(batch)
            self.static_steps += out is not None
            if self.static.failure is not None:
                self.static, self.static_off = None, self.static.failure
                if self.config.static_graph is True:
                    warnings.warn(f"static_graph=True: {self.static_off}; training eagerly", RuntimeWarning, stacklevel=4)
            if out is not None:
                return out
        args, kwargs = batch_arguments(batch)
        with self._checks():
            out = self.objective.loss_and_grads(self.model, self.guide, list(self.state.params.values()), args, kwargs)
        self._validated = True
        return out

    def step(self, batch) -> Optional[float]:
        """One optimiser step on ``batch``; returns the batch's loss (negative objective, summed).

        An estimator without a loss value (``TraceTailAdaptive_ELBO``) returns 0.0,
        and its gradient norm stands in for the loss in the check for divergence.
        A step taken as a CUDA graph returns None: its loss stays on the device
        until the end of the epoch (:meth:`_graphed_epoch_loss`).
        """
        state, plist = self.state, list(self.state.params.values())
        if self.scaler is not None:
            self.scaler.factor = self.kl_weight()
        if self._graph_step(batch):
            state.global_step += 1
            return None
        if self.graphs is not None:
            self.graphs.skip()
        loss, grads = self._loss_and_grads(batch)
        value = loss.item() if self.objective.reports_loss else 0.0
        if not math.isfinite(value):
            self._graphed_epoch_loss()  # an earlier CUDA-graph step may have diverged first: that one is undone
            raise NonFiniteLossError(self._diverged("loss", value))
        state.optimizer.zero_grad(set_to_none=True)
        if grads is None:
            loss.backward()
        else:
            for p, g in zip(plist, grads):
                p.grad = g
        for extra in self.extras:
            self._add_source_step(extra, plist)
        self.group.average_grads_(plist)
        if self.config.clip_norm is not None or not self.objective.reports_loss:
            norm = float(torch.nn.utils.clip_grad_norm_(plist, self.config.clip_norm or math.inf))
            if not math.isfinite(norm):
                raise NonFiniteLossError(self._diverged("gradient norm", norm))
        state.optimizer.step()
        state.global_step += 1
        return value

    def _add_source_step(self, extra: SourceRun, plist) -> None:
        """A secondary source's batch: its objective's gradients added to this step's."""
        batch, size = extra.next_batch(self.state.data_state, self.state.generator)
        if self.transform is not None:
            batch = self.transform(batch)
        with self._checks():
            loss, grads = extra.loss_and_grads(plist, batch)
        value = loss.item() if extra.objective.reports_loss else 0.0
        if not math.isfinite(value):
            raise NonFiniteLossError(self._diverged(f"loss of source {extra.name!r}", value))
        if grads is None:
            loss.backward()
        else:
            for p, g in zip(plist, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        extra.record(self.state.data_state, value, size)

    def _epoch_order(self) -> torch.Tensor:
        config, state = self.config, self.state
        if self.group.active:
            return self.group.shard(len(self.data), state.epoch, config.seed or 0, config.shuffle)
        n = len(self.data)
        # On the CPU, as the generator is, whatever the default device; the indices move to the data.
        return torch.randperm(n, generator=state.generator, device="cpu") if config.shuffle else torch.arange(n, device="cpu")

    def _batches(self):
        """The rest of the current epoch's batches, with their sizes."""
        config, state = self.config, self.state
        if self.streamed:
            if state.step == 0:
                state.data_state["epoch_start"] = self.data.epoch_state()
            yield from self.data.batches(state.epoch, state.data_state["epoch_start"], state.step)
            return
        if state.step == 0 or state.perm is None or self.group.active:  # shards are recomputed, not saved
            state.perm = self._epoch_order()
        perm = state.perm.to(self.group.device)  # once: a copy from the host every step would wait for the GPU
        for step in range(state.step, self.steps_per_epoch):
            idx = perm[step * config.batch_size: (step + 1) * config.batch_size]
            yield self.data.take(idx), len(idx)

    def run_epoch(self, interrupt: _Interrupt) -> Optional[float]:
        """The rest of the current epoch; returns its training ELBO (nats per datapoint)."""
        state = self.state
        if state.step == 0:
            state.partial = (0.0, 0)
        loss_sum, count = state.partial
        if self.graphs is not None:
            self.graphs.start_epoch(state.step)
        for step, (batch, size) in enumerate(self._batches(), start=state.step):
            if self.transform is not None:
                batch = self.transform(batch)
            value = self.step(batch)
            if value is None:  # a CUDA graph's step: its loss is summed on the device
                value = 0.0
            if self.group.active:  # one all_reduce: the global loss and any rank's Ctrl-C
                value, stop_requested = self.group.sum([value, float(interrupt.requested)])
                interrupt.requested = stop_requested > 0
            loss_sum += value
            count += size * self.group.world_size
            state.step, state.partial = step + 1, (loss_sum, count)
            if interrupt.requested and step < self.steps_per_epoch - 1:
                state.partial = (loss_sum + self._graphed_epoch_loss(), count)
                path = self.save()
                raise _Stop(f"interrupted at epoch {state.epoch + 1}, step {step + 1}" + self._resume_hint(path))
        loss_sum += self._graphed_epoch_loss()
        state.epoch, state.step, state.partial = state.epoch + 1, 0, (0.0, 0)
        return -loss_sum / count if self.objective.reports_loss else None

    def _graphed_epoch_loss(self) -> float:
        """The loss summed on the device by this epoch's CUDA-graph steps: one read per epoch.
        A non-finite loss among them stops the run here, before anything is saved, with the
        parameters and optimiser put back to the epoch's start."""
        if self.graphs is None:
            return 0.0
        total, bad = self.graphs.take_epoch()
        if bad is not None:
            raise NonFiniteLossError(self._diverged(
                "loss", math.nan, step=bad,
                undone=f"found at the end of the epoch (its steps ran as CUDA graphs); the parameters and optimiser "
                       f"were put back to the start of epoch {self.state.epoch + 1}"))
        return total

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Validation ELBO (nats per datapoint) at full KL weight, with every module in eval mode."""
        if self.val_data is None:
            return None
        if self.scaler is not None:
            self.scaler.factor = 1.0
        total, n = 0.0, len(self.val_data)
        with self.pair.evaluating(), self._checks():
            for batch in _validation_batches(self.val_data, self.config.batch_size):
                args, kwargs = batch_arguments(batch)
                total += self.objective.validation_loss(self.model, self.guide, args, kwargs)
        # Every rank scores the whole validation set; the mean makes all ranks agree.
        return -self.group.sum([total])[0] / self.group.world_size / n

    def save(self, *, is_best: bool = False) -> Optional[Path]:
        """Commit a checkpoint and ``metrics.csv`` to the run folder (rank 0); a collective under torchrun."""
        if self.folder is None:
            return None
        rng_ranks = self.group.gather(rng.capture(self.state.generator))  # every rank takes part
        if not self.writer:
            return None
        fit_options = {**asdict(self.config), "elbo_spec": self.objective.describe()}
        ckpt = self.state.to_checkpoint(rng_ranks=rng_ranks, fit=fit_options, example=_cpu(self.example),
                                        keep_perm=not self.group.active)
        return self.folder.commit(checkpoint=ckpt, is_best=is_best,
                                  files={"metrics.csv": _metrics_csv(self.state.history)})

    # ------------------------------------------------------------------ the loop
    def _end_epoch(self, train_elbo: Optional[float], seconds_from: float) -> Tuple[bool, bool]:
        """Validate, schedule, record, checkpoint; returns (is_best, stop early)."""
        state, config = self.state, self.config
        val = self.validate()
        if state.scheduler is not None:
            state.scheduler.step()
        state.history.append({
            "epoch": state.epoch, "train_elbo": train_elbo, "val_elbo": val,
            "kl_weight": self.kl_weight() if self.scaler else 1.0,
            "lr": state.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - seconds_from,
            **({"sources": {e.name: e.take_epoch_elbo(state.data_state) for e in self.extras}} if self.extras else {}),
        })
        is_best = False
        if val is not None:
            if state.best["val_elbo"] is None or val > state.best["val_elbo"]:
                state.best.update(val_elbo=val, epoch=state.epoch, bad_epochs=0)
                is_best = True
            else:
                state.best["bad_epochs"] += 1
        stop = config.patience is not None and state.best["bad_epochs"] >= config.patience
        return is_best or val is None, stop

    def run(self) -> FitResult:
        """Train up to ``config.epochs`` epochs; returns the :class:`FitResult`."""
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        self._plan_static()
        stopped_early = False
        bar = tqdm(total=config.epochs, initial=state.epoch, desc="epochs", unit="epoch",
                   disable=not config.progress, dynamic_ncols=True)
        with _Interrupt() as interrupt, bar:
            while state.epoch < config.epochs:
                t0 = time.perf_counter()
                is_best, stop = self._end_epoch(self.run_epoch(interrupt), t0)
                row = state.history[-1]
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.2f}" for k in ("train_elbo", "val_elbo") if row[k] is not None})
                last = state.epoch == config.epochs
                if state.epoch % config.checkpoint_every == 0 or last or stop or interrupt.requested:
                    self.last_good = self.save(is_best=is_best)
                if interrupt.requested and not last:
                    raise _Stop(f"interrupted after epoch {state.epoch}" + self._resume_hint(self.last_good))
                if stop:
                    stopped_early = True
                    break
        return self._result(stopped_early)

    def _result(self, stopped_early: bool) -> FitResult:
        state = self.state
        return FitResult(
            history=tuple(state.history),
            best_epoch=state.best["epoch"] or (state.history[-1]["epoch"] if state.history else 0),
            stopped_early=stopped_early, run_dir=None if self.folder is None else self.folder.path,
            device=str(self.group.device), params={k: v.detach() for k, v in state.params.items()},
            rank=self.group.rank, world_size=self.group.world_size,
            static_graph=self.static is not None and self.static_steps > 0, static_graph_off=self.static_off,
            cuda_graph=self.graphs is not None and bool(self.graphs.steps), cuda_graph_off=self.graphs_off,
        )

    def _resume_hint(self, path) -> str:
        if not path:
            return "; no run_dir, nothing saved"
        run_dir = self.folder.path
        return (f"; checkpoint written to {path}; resume with fit(..., resume={str(run_dir)!r}) "
                f"or `pyrovae train --resume {run_dir}`")

    def _diverged(self, what: str, value: float, *, step: Optional[int] = None,
                  undone: str = "the parameters were not updated with it") -> str:
        state = self.state
        step = state.step if step is None else step  # 0-based, in the current epoch
        msg = (f"{what} became {value} at epoch {state.epoch + 1}, step {step + 1} "
               f"(global step {state.global_step - state.step + step + 1}); {undone}")
        if self.folder is not None:
            where = self.last_good or "the latest checkpoint in the run folder"
            msg += (f". The last good checkpoint is kept ({where}); resume with a lower learning rate: "
                    f"fit(..., resume={str(self.folder.path)!r}, lr=...)")
        return msg + ". Common causes: a learning rate too high, data outside the likelihood's support."


def _first_batch(data, batch_size: int):
    return data.first() if isinstance(data, LoaderBatches) else data.head(min(len(data), batch_size))


def _validation_batches(data, batch_size: int):
    if isinstance(data, LoaderBatches):
        with torch.random.fork_rng(devices=[]):  # a shuffling loader must not move training's random state
            yield from (batch for batch, _ in data.batches(0, data.epoch_state(), 0))
        return
    n = len(data)
    for i in range(0, n, batch_size):
        yield data.take(torch.arange(i, min(i + batch_size, n), device=data.device))  # follows the data


def _check_loader_sampler(data: LoaderBatches, group) -> None:
    from torch.utils.data import DistributedSampler

    if group.active and not isinstance(data.loader.sampler, DistributedSampler):
        raise ValueError(
            f"under torchrun every process needs its own shard: build the {data.name} DataLoader with "
            "sampler=DistributedSampler(dataset, shuffle=True, drop_last=True) (pyrovae calls its set_epoch); "
            "every rank must take the same number of steps"
        )


def _cpu(batch):
    """A CPU copy of a batch: a copy, not a view, so that a checkpoint stores these rows alone
    (torch.save writes a view's whole storage: the entire training set)."""
    if isinstance(batch, dict):
        return {k: v.detach().cpu().clone() for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(v.detach().cpu().clone() for v in batch)
    return batch.detach().cpu().clone()


# ---------------------------------------------------------------------- fit
def _make_elbo(elbo, num_particles) -> Tuple[str, ELBO]:
    if isinstance(elbo, ELBO):
        return "custom", elbo
    if isinstance(elbo, str):
        check_choice("elbo", elbo, ELBOS)
        return elbo, ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1)
    raise TypeError(f"elbo must be a key of {sorted(ELBOS)} or a pyro.infer.ELBO, got {elbo!r}")


def _open_folder(run_dir, resume) -> Tuple[Optional[RunFolder], Optional[Checkpoint]]:
    """The run folder to write, and the checkpoint to continue from (None: start afresh)."""
    if resume is None:
        if run_dir is None:
            return None, None
        folder = RunFolder(run_dir)
        if not folder.is_empty():
            raise ValueError(f"run_dir {str(folder.path)!r} already holds files; pass resume={str(folder.path)!r} to "
                             "continue that run, or another run_dir")
        return folder, None
    folder = RunFolder(resume)
    if not folder.path.is_dir():
        raise CheckpointError(f"run folder {folder.path} does not exist")
    if run_dir is not None and Path(run_dir).resolve() != folder.path.resolve():
        raise ValueError(f"resume={str(resume)!r} and run_dir={str(run_dir)!r} differ; a resumed run writes to its own folder")
    # A run killed before its first checkpoint has nothing to resume: start it over, same folder.
    if not folder.exists() or folder.manifest().get("latest") is None:
        return folder, None
    return folder, folder.load_checkpoint()


def _split_sources(data, batch_size: int):
    """The first source's data, and the others as (name, batches, batch_size, weight, model, guide, elbo)."""
    if not (isinstance(data, dict) and data and all(isinstance(v, Source) for v in data.values())):
        if isinstance(data, dict) and any(isinstance(v, Source) for v in data.values()):
            raise TypeError("data: a dict of sources must hold Source objects only")
        return data, []
    (first_name, first), *rest = data.items()
    if first.model is not None or first.elbo is not None or first.weight != 1.0 or \
            first.batch_size not in (None, batch_size):
        raise ValueError(f"data: the first source {first_name!r} uses fit's model, guide, elbo and batch_size "
                         "with weight 1 (weights are relative to it); give those options to the other sources")
    return first.data, [(name, _batches_of(src.data, f"data[{name!r}]"), src.batch_size, src.weight, src.model,
                         src.guide, src.elbo) for name, src in rest]


def _prepare_data(data, val_data, transform, metadata):
    if isinstance(data, DataSplits):
        if val_data is None and len(data.val):
            val_data = data.val
        transform = transform if transform is not None else data.batch_transform
        metadata = {"data": data.info(), **(metadata or {})}
        data = data.train
    train = _batches_of(data, "data")
    val = None if val_data is None else _batches_of(val_data, "val_data")
    if isinstance(train, TensorBatches) and isinstance(val, TensorBatches) \
            and val.event_shapes() != train.event_shapes():
        raise ValueError(f"val_data has event shapes {val.event_shapes()}, data has {train.event_shapes()}")
    return train, val, transform, metadata


def _batches_of(data, name: str):
    if isinstance(data, torch.utils.data.DataLoader):
        return LoaderBatches(data, name)
    return TensorBatches(data, name)


def fit(
    model: Callable,
    guide: Callable,
    data,
    *more_data,
    val_data=None,
    transform: Optional[Callable] = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    optimizer_options: Optional[dict] = None,
    elbo: Union[str, ELBO] = "trace",
    num_particles: int = 1,
    clip_norm: Optional[float] = None,
    lr_schedule: Optional[str] = None,
    kl_warmup_epochs: float = 0.0,
    patience: Optional[int] = None,
    seed: Optional[int] = 0,
    device: str = "auto",
    run_dir=None,
    resume=None,
    checkpoint_every: int = 1,
    shuffle: bool = True,
    progress: bool = True,
    validate: str = "first",
    static_graph: Union[bool, str] = "auto",
    cuda_graph: Union[bool, str] = "auto",
    metadata: Optional[dict] = None,
) -> FitResult:
    """Fit a model/guide pair by maximising the ELBO with a torch optimiser.

    Each step draws a batch, computes ``loss = elbo.differentiable_loss(model,
    guide, *args, **kwargs)`` (the negative ELBO summed over the batch) and
    takes an optimiser step. Reported ELBOs are in nats per datapoint; the
    validation ELBO uses the full KL weight, runs every network in eval mode
    and does not touch the optimiser.

    :param model: Pyro program with observations in a data plate.
    :param guide: Pyro program with the same signature.
    :param data: training data, one datapoint per leading row: a tensor or
        numpy array (``model(x)``), a tuple of tensors (``model(*batch)``), a
        dict of tensors (``model(**batch)``), a map-style Dataset of tensors,
        tuples or dicts (read once into memory), a ``DataLoader`` (streamed,
        with its own batch size, sampler and workers), or a
        :class:`~pyrovae.data.DataSplits` (its train split, with ``val_data``
        and ``transform`` defaulting to its validation split and binarisation).
        A dict of named :class:`~pyrovae.sources.Source` objects trains on
        several sources at once (semi-supervised learning, terms you add):
        each step sums one batch of each, and an epoch is one pass over the first.
    :param more_data: further tensors of the same batch, as Pyro's ``svi.step(xs, ys)``
        takes them: ``fit(model, guide, xs, ys)`` is ``fit(model, guide, (xs, ys))``.
    :param val_data: validation data, same forms; enables early stopping.
    :param transform: applied to each training batch, e.g.
        :func:`~pyrovae.data.dynamic_binarize`.
    :param int epochs: total epochs (a resumed run continues up to this number).
    :param int batch_size: datapoints per step.
    :param float lr: learning rate.
    :param str optimizer: key of :data:`OPTIMIZERS`.
    :param float weight_decay: optimiser weight decay.
    :param dict optimizer_options: further keyword arguments of the optimiser, e.g.
        ``{"eps": 1e-4}`` for Adam as in Burda et al. (2016), or ``{"betas": (0.9, 0.99)}``.
        Validated when ``fit`` is called; a resumed run must keep them. On the CPU, Adam
        and AdamW use torch's fused kernel (``fused=True``, about 5x faster per step)
        unless these options set ``fused`` or ``foreach``.
    :param elbo: key of :data:`ELBOS` (``"trace"``: Trace_ELBO, ``"meanfield"``:
        TraceMeanField_ELBO, analytic KL where available; ``"iwae"``: the IWAE-K
        bound per datapoint with K = ``num_particles``; ``"iwae-dreg"``: the same
        bound with the doubly-reparameterised guide gradient), or any Pyro ELBO
        instance (``TraceGraph_ELBO``, ``RenyiELBO``, ``TraceEnum_ELBO``, ...).
        Static-graph steps cover ``Trace_ELBO``; the others run eagerly.
    :param int num_particles: particles per step, vectorised (K for the IWAE bounds).
    :param float clip_norm: clip the gradient norm to this value; a non-finite
        gradient norm then stops training like a non-finite loss.
    :param str lr_schedule: key of :data:`LR_SCHEDULES` or None.
    :param float kl_warmup_epochs: scale the KL term (every unobserved site,
        in model and guide) linearly from ~0 to 1 over this many epochs.
    :param int patience: stop after this many epochs without a better
        validation ELBO (needs ``val_data``).
    :param int seed: seeds torch, numpy, Python and the batch order (None: don't seed).
    :param str device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``; resolved once. Module parameters and data are moved there.
    :param run_dir: a new (or empty) folder for checkpoints, metrics and
        config; None keeps nothing on disk. A folder that holds files is refused.
    :param resume: a run folder to continue from (its latest checkpoint); new
        outputs go to the same folder. Only :data:`RESUMABLE_CHANGES` may differ
        from the run's options; a different ``lr`` takes effect on resume. A
        folder with no checkpoint yet (a run stopped before its first) starts over.
    :param int checkpoint_every: epochs between checkpoints (the last epoch always).
    :param bool shuffle: reshuffle the training data every epoch.
    :param bool progress: show a tqdm progress bar.
    :param str validate: ``"first"`` (default) runs the first step of this call
        under the caller's Pyro validation setting, which checks distribution
        arguments, supports and shapes, then the rest with validation off:
        those checks never change a value but cost up to half a step on small
        networks. ``"always"`` keeps the caller's setting for every step.
    :param static_graph: replay the tensor operations of a step, recorded once
        per batch shape, instead of running Pyro's Python every step
        (:class:`~pyrovae.static.StaticStep`). Bitwise equal to eager Pyro,
        which is checked on the first batch of each shape; the run falls back to
        eager Pyro when the program cannot be recorded or disagrees. Needs
        ``Trace_ELBO`` and a program whose structure depends on nothing but the
        batch's shape. ``"auto"`` (default): on when this call has at least
        :data:`STATIC_GRAPH_MIN_STEPS` steps, the ELBO is ``"trace"`` and
        ``validate="first"``. ``True``: on, with a ``RuntimeWarning`` if it
        falls back. ``False``: always eager.
    :param cuda_graph: on CUDA, replay each recorded step, with the optimiser's
        update, as one CUDA graph (:mod:`pyrovae.cudagraph`): the loss is read
        once per epoch, and a non-finite loss is found at the end of its epoch,
        which is then undone. Checked bitwise against the same step run eagerly
        on the first batch of each shape, with a fall back to the static graph.
        ``"auto"`` (default): on wherever the static graph is on and the run
        allows it (Adam or AdamW, no ``clip_norm``, no ``lr_schedule``, one
        process, one data source). ``True``: refuse a run that does not allow it.
        ``False``: off.
    :param dict metadata: JSON-able extras stored in ``config.json`` (e.g. data provenance).
    :returns: :class:`FitResult`.
    :raises NonFiniteLossError: if the loss (or clipped gradient norm) is NaN or
        infinite; the message names epoch and step, and the run folder keeps the
        last good checkpoint.

    >>> from pyrovae import VAE
    >>> vae = VAE((4,), latent_dim=2, hidden=(8,))
    >>> x = torch.bernoulli(torch.full((32, 4), 0.5))
    >>> result = fit(vae.model, vae.guide, x, epochs=2, batch_size=8, progress=False, device="cpu")
    >>> len(result.history), result.history[-1]["train_elbo"] < 0
    (2, True)
    """
    pair = ModelGuidePair(model, guide)
    if more_data:
        if isinstance(data, DataSplits) or not all(hasattr(t, "shape") for t in (data, *more_data)):
            raise TypeError("several data arguments must all be tensors or arrays (the programs' arguments); "
                            "pass a Dataset or DataSplits alone")
        data = (data, *more_data)
    elbo_key, elbo_obj = _make_elbo(elbo, num_particles)
    config = FitConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        optimizer_options=optimizer_options,
        elbo=elbo_key, num_particles=num_particles, clip_norm=clip_norm, lr_schedule=lr_schedule,
        kl_warmup_epochs=kl_warmup_epochs, patience=patience, seed=seed, device=device,
        checkpoint_every=checkpoint_every, shuffle=shuffle, progress=progress, validate=validate,
        static_graph=static_graph, cuda_graph=cuda_graph,
    )
    if config.static_graph is True and type(elbo_obj) is not Trace_ELBO:
        raise ValueError(f"static_graph=True needs elbo='trace' (Trace_ELBO), got {type(elbo_obj).__name__}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {transform!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    data, extras = _split_sources(data, config.batch_size)
    train, val, transform, metadata = _prepare_data(data, val_data, transform, metadata)
    if config.patience is not None and val is None:
        raise ValueError("patience (early stopping) needs val_data")
    folder, ckpt = _open_folder(run_dir, resume)
    group = distributed.setup(config.device)
    try:
        with distributed.default_device(group.device):
            return _fit(pair, elbo_obj, config, train, val, transform, metadata, group, folder, ckpt, extras)
    except _Stop as stop:
        raise KeyboardInterrupt(str(stop)) from None
    finally:
        group.close()


def _fit(pair, elbo, config, train, val, transform, metadata, group, folder, ckpt, extras) -> FitResult:
    dev = group.device
    train.to(dev)
    for spec in extras:
        spec[1].to(dev)
    if val is not None:
        val.to(dev)
    pair.to(dev)
    # Check what the model will see: the transformed training data (a streamed loader: its first batch).
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        data = train.first() if isinstance(train, LoaderBatches) else train.structure
        args, kwargs = batch_arguments(data if transform is None else transform(data))
        pair.check_data(args, kwargs, "data")
    if val is not None:
        pair.check_data(*batch_arguments(val.first() if isinstance(val, LoaderBatches) else val.structure), "val_data")
    trainer = Trainer(pair, elbo, config, train, val, group=group, folder=folder, transform=transform, extras=extras)
    if trainer.objective.anchor:
        try:
            return _train(trainer, pair, config, metadata, group, folder, ckpt)
        finally:
            store = pyro.get_param_store()
            if ANCHOR in store:
                del store[ANCHOR]
    return _train(trainer, pair, config, metadata, group, folder, ckpt)


def _train(trainer, pair, config, metadata, group, folder, ckpt) -> FitResult:
    if ckpt is not None:
        trainer.restore(ckpt)
    if trainer.writer:
        config_json = {"pyrovae_format": 2, "pair": pair.describe(), "fit": asdict(config),
                       "elbo": trainer.objective.describe(),
                       "world_size": group.world_size, "metadata": metadata or {}}
        stale = [f for f in folder.manifest()["files"] if f.split("/")[0] in DERIVED_FOLDERS] if folder.exists() else []
        folder.commit(files={CONFIG: json_bytes(config_json)}, remove=tuple(stale))
    return trainer.run()
