"""Training any model/guide pair by stochastic variational inference.

:func:`fit` is the trainer. Nothing in it is specific to :class:`~pyrovae.VAE`:
it takes two Pyro programs with the same signature, called as
``model(batch)`` and ``guide(batch)``, and follows Pyro's ``svi_torch``
pattern: a Pyro ELBO gives a differentiable loss, and a plain torch optimiser
steps the parameters.

Parameters are found the way Pyro's ``SVI`` finds them, from a ``param_only``
trace of one call (so networks registered with ``pyro.module``, ``pyro.param``
statements and :class:`~pyro.nn.PyroModule` attributes all count), plus the
``parameters()`` of an ``nn.Module`` whose bound methods ``model`` and
``guide`` are. Create every parameter in the first call.
"""

import contextlib
import csv
import io
import math
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import pyro
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from . import distributed, runs
from .static import StaticStep
from ._checks import check_int
from .data import DataSplits
from .runs import CheckpointError, write_json
from .vae import VAE

__all__ = ["fit", "FitConfig", "FitResult", "NonFiniteLossError", "restore_params", "ELBOS", "OPTIMIZERS", "LR_SCHEDULES"]

#: ELBO estimators by key (relatives of Trace_ELBO that keep per-datapoint plates)
ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
#: optimisers by key
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
#: with ``static_graph="auto"``, record a static graph when a call has at least this
#: many steps to run: recording and checking cost about as much as a few hundred
#: eager steps of a small network (measured in benchmarks/README.md)
STATIC_GRAPH_MIN_STEPS = 300
#: learning-rate schedules by key, stepped once per epoch
LR_SCHEDULES = {
    "cosine": lambda opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)),
    "exponential": lambda opt, epochs: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95),
}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; parameters were not updated with it."""


def _positive_int(name, value, *, allow_none=False):
    return None if value is None and allow_none else check_int(name, value)


def _nonneg_float(name, value, *, positive=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite float, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit`, validated when constructed (see :func:`fit` for meanings)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
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

    def __post_init__(self):
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _nonneg_float("lr", self.lr, positive=True)
        if self.lr > torch.finfo(torch.float32).max:
            raise ValueError(f"lr must be representable in float32 (<= 3.4e38), got {self.lr!r}")
        _nonneg_float("weight_decay", self.weight_decay)
        _positive_int("num_particles", self.num_particles)
        _nonneg_float("clip_norm", self.clip_norm, positive=True, allow_none=True)
        _nonneg_float("kl_warmup_epochs", self.kl_warmup_epochs)
        _positive_int("patience", self.patience, allow_none=True)
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {sorted(OPTIMIZERS)}")
        if self.elbo not in ELBOS and self.elbo != "custom":
            raise ValueError(f"elbo {self.elbo!r} is not one of {sorted(ELBOS)} (or pass an ELBO instance)")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {sorted(LR_SCHEDULES)} or None")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.validate not in ("first", "always"):
            raise ValueError(f"validate must be 'first' or 'always', got {self.validate!r}")
        if not (isinstance(self.static_graph, bool) or self.static_graph == "auto"):
            raise ValueError(f"static_graph must be True, False or 'auto', got {self.static_graph!r}")
        if self.static_graph is True and self.validate == "always":
            raise ValueError("static_graph=True replays recorded steps, which cannot run Pyro's checks every step; "
                             "use validate='first' or static_graph=False")
        for name in ("shuffle", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    :ivar history: one dict per completed epoch with ``epoch``, ``train_elbo``
        and ``val_elbo`` (nats per datapoint, higher is better; ``val_elbo`` is
        None without validation data), ``kl_weight``, ``lr`` and ``seconds``.
    :ivar best_epoch: epoch (1-based) of the best validation ELBO, or the last epoch.
    :ivar stopped_early: True if early stopping ended the run.
    :ivar run_dir: the run folder, or None.
    :ivar device: the device that was used.
    :ivar params: trained parameters by name (unconstrained, detached).
    :ivar rank: this process's rank under ``torchrun`` (0 in a single process).
    :ivar world_size: number of processes (see :mod:`pyrovae.distributed`).
    :ivar static_graph: True if the steps after the first ran from a recorded
        graph to the end (see :mod:`pyrovae.static`).
    :ivar static_graph_off: why they did not, or None.
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

    @property
    def train_elbo(self):
        return [h["train_elbo"] for h in self.history]

    @property
    def val_elbo(self):
        return [h["val_elbo"] for h in self.history]


class _ScaleLatents(Messenger):
    """Multiply the log-density of every unobserved sample site by ``factor``.

    Applied to both model and guide this scales log p(z) - log q(z|x), i.e.
    the KL term, and leaves log p(x|z) alone: the KL warm-up of Bowman et al.
    (2016) and Sønderby et al. (2016), for any model/guide pair.
    """

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.factor


def _as_tensor(data, name: str) -> torch.Tensor:
    """Bring a tensor, numpy array or map-style Dataset into one float tensor."""
    if isinstance(data, torch.Tensor):
        x = data
    elif isinstance(data, np.ndarray):
        if data.dtype == object:
            raise TypeError(f"{name} must be numeric, got a numpy array of dtype object")
        x = torch.as_tensor(np.array(data))
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, dict)):
        items = []
        for i in range(len(data)):
            item = data[i]
            if isinstance(item, (tuple, list)):
                item = item[0]
            items.append(torch.as_tensor(item))
        if not items:
            raise ValueError(f"{name} is empty")
        x = torch.stack(items)
    else:
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a Dataset, got {type(data).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.float()
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero()[0].item()
        raise ValueError(f"{name} contains NaN or infinite values (first at index {bad})")
    return x


def _owners(model, guide):
    """nn.Modules whose bound methods are the model and guide, with their role as name prefix."""
    out = []
    for role, fn in (("model", model), ("guide", guide)):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not o for _, o in out):
            out.append((role, owner))
    return out


def _collect_params(model, guide, x) -> Dict[str, torch.Tensor]:
    """Trainable tensors by stable name: module parameters, then param-store ones."""
    params: Dict[str, torch.Tensor] = {}
    owned: Dict[str, torch.Tensor] = {}
    seen = set()
    for role, owner in _owners(model, guide):
        for name, p in owner.named_parameters():
            owned[name] = p
            if p.requires_grad and id(p) not in seen:
                params[f"{role}.{name}"] = p
                seen.add(id(p))
    with torch.no_grad(), poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(guide).get_trace(x)
        poutine.replay(model, trace=guide_trace)(x)
    for name, site in capture.trace.nodes.items():
        value = site["value"]
        p = value.unconstrained() if hasattr(value, "unconstrained") else value
        clash = _stale_registration(name, p, owned) if id(p) not in seen else None
        if clash is not None:
            raise ValueError(
                f"Pyro's param store holds {name!r} for a different tensor than the module's own "
                f"{clash!r}: another module was registered under the same pyro.module name "
                "(e.g. two VAEs with the same name=). Give each model a distinct name, or call "
                "pyro.clear_param_store() before fitting"
            )
        if id(p) not in seen:
            params[f"param.{name}"] = p
            seen.add(id(p))
    if not params:
        raise ValueError(
            "the model and guide have no parameters: register networks with pyro.module, "
            "use pyro.param, or pass bound methods of an nn.Module"
        )
    return params


def _stale_registration(store_name: str, tensor, owned: Dict[str, torch.Tensor]) -> Optional[str]:
    """The owner parameter that ``pyro.module`` meant to register as ``store_name``,
    if the store returned a different tensor for it (a name clash), else None."""
    if "$$$" not in store_name:
        return None
    module_name, param_name = store_name.split("$$$", 1)
    for name, q in owned.items():
        prefix = name[: -len(param_name) - 1]
        if name.endswith("." + param_name) and module_name.endswith(prefix) and q is not tensor and q.shape == tensor.shape:
            return name
    return None


def restore_params(params: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor], *, source="checkpoint") -> None:
    """Copy saved tensors into live parameters in place, checking names and shapes."""
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match this model/guide: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise CheckpointError(f"{source}: parameter {name!r} has shape {tuple(saved[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(saved[name])


def _rng_state(gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": (int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "data": gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj):
    return tuple(_tuplify(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


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


def _write_metrics(run_dir: Path, history) -> None:
    cols = ["epoch", "train_elbo", "val_elbo", "kl_weight", "lr", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    runs._atomic_write(run_dir / "metrics.csv", buf.getvalue().encode())


def _model_config(model) -> dict:
    """What config.json records about the model: enough to rebuild a VAE."""
    owner = getattr(model, "__self__", None)
    if isinstance(owner, VAE):
        return {"type": "VAE", "config": owner.config.to_dict()}
    return {"type": "custom", "model": getattr(model, "__qualname__", repr(model))}


def fit(
    model: Callable,
    guide: Callable,
    data,
    *,
    val_data=None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
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
    metadata: Optional[dict] = None,
) -> FitResult:
    """Fit a model/guide pair by maximising the ELBO with a torch optimiser.

    Each step draws a batch ``x`` of shape ``(batch_size, *event_shape)``,
    computes ``loss = elbo.differentiable_loss(model, guide, x)`` (the negative
    ELBO summed over the batch) and takes an optimiser step. Reported ELBOs are
    in nats per datapoint; the validation ELBO uses the full KL weight and does
    not touch the optimiser.

    :param model: Pyro program ``model(x)`` with observations in a data plate.
    :param guide: Pyro program ``guide(x)``.
    :param data: training data: tensor or numpy array of shape
        ``(n, *event_shape)``, a map-style Dataset (read once into memory; tuple
        items use their first element), or a :class:`~pyrovae.data.DataSplits`
        (its train split, with ``val_data`` and ``transform`` defaulting to its
        validation split and binarisation).
    :param val_data: validation data, same forms; enables early stopping.
    :param transform: applied to each training batch, e.g.
        :func:`~pyrovae.data.dynamic_binarize`.
    :param int epochs: total epochs (a resumed run continues up to this number).
    :param int batch_size: datapoints per step.
    :param float lr: learning rate.
    :param str optimizer: key of :data:`OPTIMIZERS`.
    :param float weight_decay: optimiser weight decay.
    :param elbo: key of :data:`ELBOS` (``"trace"``: Trace_ELBO, ``"meanfield"``:
        TraceMeanField_ELBO, analytic KL where available), or an ELBO instance.
    :param int num_particles: particles per step, vectorised.
    :param float clip_norm: clip the gradient norm to this value; a non-finite
        gradient norm then stops training like a non-finite loss.
    :param str lr_schedule: key of :data:`LR_SCHEDULES` or None.
    :param float kl_warmup_epochs: scale the KL term (every unobserved site,
        in model and guide) linearly from ~0 to 1 over this many epochs.
    :param int patience: stop after this many epochs without a better
        validation ELBO (needs ``val_data``).
    :param int seed: seeds torch, numpy, Python and the batch order (None: don't seed).
    :param str device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``;
        resolved once. Module parameters and data are moved there.
    :param run_dir: folder for checkpoints, metrics and config; None keeps nothing on disk.
    :param resume: a run folder to continue from (its latest checkpoint); new
        outputs go to the same folder. A different ``lr`` takes effect on resume.
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
        batch's shape: no branching on Python randomness or counters. ``"auto"``
        (default): on when this call has at least :data:`STATIC_GRAPH_MIN_STEPS`
        steps, the ELBO is ``"trace"`` and ``validate="first"``. ``True``: on,
        with a ``RuntimeWarning`` if it falls back. ``False``: always eager.
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
    if not callable(model) or not callable(guide):
        raise TypeError(f"model and guide must be callables, got {type(model).__name__} and {type(guide).__name__}")
    if isinstance(elbo, ELBO):
        elbo_key, elbo_obj = "custom", elbo
    elif isinstance(elbo, str):
        elbo_key, elbo_obj = elbo, None
    else:
        raise TypeError(f"elbo must be a key of {sorted(ELBOS)} or a pyro.infer.ELBO, got {elbo!r}")
    config = FitConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        elbo=elbo_key, num_particles=num_particles, clip_norm=clip_norm, lr_schedule=lr_schedule,
        kl_warmup_epochs=kl_warmup_epochs, patience=patience, seed=seed, device=device,
        checkpoint_every=checkpoint_every, shuffle=shuffle, progress=progress, validate=validate,
        static_graph=static_graph,
    )
    if elbo_obj is None:
        elbo_obj = ELBOS[elbo_key](num_particles=num_particles, vectorize_particles=num_particles > 1)
    if config.static_graph is True and type(elbo_obj) is not Trace_ELBO:
        raise ValueError(f"static_graph=True needs elbo='trace' (Trace_ELBO), got {type(elbo_obj).__name__}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {transform!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if isinstance(data, DataSplits):
        if val_data is None and len(data.val):
            val_data = data.val
        transform = transform if transform is not None else data.batch_transform
        metadata = {"data": data.info(), **(metadata or {})}
        data = data.train
    if resume is not None:
        resume = runs._check_run_dir(resume)
        if run_dir is not None and Path(run_dir).resolve() != resume.resolve():
            raise ValueError(f"resume={str(resume)!r} and run_dir={str(run_dir)!r} differ; a resumed run writes to its own folder")
        run_dir = resume
    if config.patience is not None and val_data is None:
        raise ValueError("patience (early stopping) needs val_data")

    group = distributed.setup(config.device)
    dev = group.device
    x_train = _as_tensor(data, "data").to(dev)
    x_val = None if val_data is None else _as_tensor(val_data, "val_data").to(dev)
    if x_val is not None and x_val.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"val_data has event shape {tuple(x_val.shape[1:])}, data has {tuple(x_train.shape[1:])}")
    for _, owner in _owners(model, guide):
        owner.to(dev)
        if hasattr(owner, "check_data"):
            # Check what the model will see: the transformed training data.
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                owner.check_data(x_train if transform is None else transform(x_train), "data")
            if x_val is not None:
                owner.check_data(x_val, "val_data")

    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    writer = run_dir is not None and group.rank == 0  # one process writes the run folder

    gen = torch.Generator()
    if config.seed is not None:
        pyro.set_rng_seed(config.seed + group.rank)  # ranks draw different z; rank 0 as one process
        gen.manual_seed(config.seed)

    scaler = _ScaleLatents() if config.kl_warmup_epochs > 0 else None
    model_fn = scaler(model) if scaler else model
    guide_fn = scaler(guide) if scaler else guide

    # Collect from the unwrapped programs: their owner modules give the stable names.
    params = _collect_params(model, guide, x_train[: min(len(x_train), config.batch_size)])
    for name, p in params.items():
        if p.device != dev:
            raise ValueError(
                f"parameter {name!r} lives on {p.device} but training runs on {dev}; "
                "create pyro.param values from the data (e.g. x.new_zeros) or pass device="
                f"'{p.device.type}'"
            )
    plist = list(params.values())
    group.broadcast_(plist)
    opt = OPTIMIZERS[config.optimizer](plist, lr=config.lr, weight_decay=config.weight_decay)
    sched = LR_SCHEDULES[config.lr_schedule](opt, config.epochs) if config.lr_schedule else None

    n = len(x_train)
    n_local = n // group.world_size if group.active else n  # DistributedSampler(drop_last=True)
    if n_local == 0:
        raise ValueError(f"data has {n} datapoints, fewer than the {group.world_size} processes")
    steps_per_epoch = math.ceil(n_local / config.batch_size)
    history: list = []
    start_epoch, start_step, global_step = 0, 0, 0
    perm = None
    partial = (0.0, 0)  # (loss sum, datapoints) of an interrupted epoch
    best = {"val_elbo": None, "epoch": 0, "bad_epochs": 0}

    # A run killed before its first checkpoint has nothing to resume: start it over, same folder.
    if resume is not None and (resume / runs.MANIFEST).exists():
        state = runs.load_checkpoint(resume)
        restore_params(params, state["params"], source=f"checkpoint in {resume}")
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        saved_lr = state.get("config", {}).get("lr")
        if saved_lr is not None and saved_lr != config.lr:  # a new lr on resume, e.g. after a divergence
            for g in opt.param_groups:
                g["lr"] = config.lr
                g["initial_lr"] = config.lr
            if sched is not None:
                sched.base_lrs = [config.lr] * len(opt.param_groups)
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != group.world_size:
            raise CheckpointError(
                f"checkpoint in {resume} was written by {len(ranks)} process(es); resume it with the same number, "
                f"not {group.world_size}"
            )
        _set_rng_state(ranks[group.rank], gen)
        history = list(state["history"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        perm = state.get("perm")
        partial = tuple(state.get("partial", (0.0, 0)))
        best = dict(state["best"])

    if writer:
        write_json(run_dir / runs.CONFIG, {
            "pyrovae_format": runs.FORMAT_VERSION,
            "model": _model_config(model),
            "fit": asdict(config),
            "world_size": group.world_size,
            "metadata": metadata or {},
        })

    def checkpoint(epoch, step, is_best=False):
        if run_dir is None:
            return None
        rng_ranks = group.gather(_rng_state(gen))  # a collective: every rank takes part
        if not writer:
            return None
        state = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "params": {k: v.detach().cpu().clone() for k, v in params.items()},
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "history": history,
            "best": best,
            "perm": None if step == 0 or group.active else perm,
            "partial": partial,
            "config": asdict(config),
        }
        path = runs.save_checkpoint(run_dir, state, epoch=epoch, step=step, is_best=is_best)
        _write_metrics(run_dir, history)
        return path

    static, static_off, static_steps = None, None, 0
    steps_to_run = (config.epochs - start_epoch) * steps_per_epoch - start_step
    if config.static_graph == "auto":
        if type(elbo_obj) is not Trace_ELBO:
            static_off = f"auto: the ELBO is {type(elbo_obj).__name__}, not Trace_ELBO"
        elif config.validate != "first":
            static_off = "auto: validate='always'"
        elif steps_to_run < STATIC_GRAPH_MIN_STEPS:
            static_off = f"auto: {steps_to_run} steps to run, fewer than STATIC_GRAPH_MIN_STEPS={STATIC_GRAPH_MIN_STEPS}"
    elif not config.static_graph:
        static_off = "static_graph=False"
    if static_off is None:
        buffers = [b for _, owner in _owners(model, guide) for b in owner.buffers()]
        static = StaticStep(elbo_obj, model_fn, guide_fn, plist, identity=(model, guide, scaler is not None),
                            buffers=buffers)

    validated = [False]

    def checks():
        """The caller's validation setting for the first step, then off (validate="first")."""
        if config.validate == "always" or not validated[0]:
            validated[0] = True
            return contextlib.nullcontext()
        return pyro.validation_enabled(False)

    def kl_weight():
        if scaler is None:
            return 1.0
        return min(1.0, (global_step + 1) / (config.kl_warmup_epochs * steps_per_epoch))

    def validate():
        if x_val is None:
            return None
        if scaler is not None:
            scaler.factor = 1.0
        total = 0.0
        with torch.no_grad(), checks():
            for i in range(0, len(x_val), config.batch_size):
                xb = x_val[i : i + config.batch_size]
                total += float(elbo_obj.differentiable_loss(model_fn, guide_fn, xb))
        # Every rank scores the whole validation set; the mean makes all ranks agree.
        return -group.sum([total])[0] / group.world_size / len(x_val)

    from tqdm.auto import tqdm

    stopped_early = False
    last_good = None
    bar = tqdm(total=config.epochs, initial=start_epoch, desc="epochs", unit="epoch",
               disable=not config.progress, dynamic_ncols=True)
    with _Interrupt() as interrupt, bar:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            if group.active:
                perm = group.shard(n, epoch, config.seed or 0, config.shuffle)
            if start_step == 0 or perm is None:
                if not group.active:
                    perm = torch.randperm(n, generator=gen) if config.shuffle else torch.arange(n)
                loss_sum, count = 0.0, 0
            else:
                loss_sum, count = partial
            for step in range(start_step, steps_per_epoch):
                idx = perm[step * config.batch_size : (step + 1) * config.batch_size].to(dev)
                xb = x_train.index_select(0, idx)
                if transform is not None:
                    xb = transform(xb)
                if scaler is not None:
                    scaler.factor = kl_weight()
                out = None
                # The first step runs eagerly under the caller's validation; KL warm-up changes a
                # Python scale factor every step, so a recorded step waits for it to reach 1.
                if static is not None and validated[0] and (scaler is None or scaler.factor == 1.0):
                    out = static(xb)
                    static_steps += out is not None
                    if static.failure is not None:
                        static, static_off = None, static.failure
                        if config.static_graph is True:
                            warnings.warn(f"static_graph=True: {static_off}; training eagerly", RuntimeWarning, stacklevel=2)
                if out is None:
                    with checks():
                        loss = elbo_obj.differentiable_loss(model_fn, guide_fn, xb)
                    grads = None
                else:
                    loss, grads = out
                value = loss.item()
                if group.active:  # one all_reduce: the global loss and any rank's Ctrl-C
                    value, stop_requested = group.sum([value, float(interrupt.requested)])
                    interrupt.requested = stop_requested > 0
                if not math.isfinite(value):
                    raise NonFiniteLossError(_diverged_message("loss", value, epoch, step, global_step, run_dir, last_good))
                opt.zero_grad(set_to_none=True)
                if grads is None:
                    loss.backward()
                else:
                    for p, g in zip(plist, grads):
                        p.grad = g
                group.average_grads_(plist)
                if config.clip_norm is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(plist, config.clip_norm))
                    if not math.isfinite(norm):
                        raise NonFiniteLossError(_diverged_message("gradient norm", norm, epoch, step, global_step, run_dir, last_good))
                opt.step()
                global_step += 1
                loss_sum += value
                count += len(xb) * group.world_size
                if interrupt.requested and step < steps_per_epoch - 1:
                    bar.close()
                    partial = (loss_sum, count)
                    path = checkpoint(epoch, step + 1)
                    group.close()
                    raise KeyboardInterrupt(
                        f"interrupted at epoch {epoch + 1}, step {step + 1}"
                        + (f"; checkpoint written to {path}; resume with fit(..., resume={str(run_dir)!r}) "
                           f"or `pyrovae train --resume {run_dir}`" if path else "; no run_dir, nothing saved")
                    )
            start_step = 0
            partial = (0.0, 0)
            val = validate()
            if sched is not None:
                sched.step()
            history.append({
                "epoch": epoch + 1,
                "train_elbo": -loss_sum / count,
                "val_elbo": val,
                "kl_weight": kl_weight() if scaler else 1.0,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            })
            bar.update(1)
            bar.set_postfix(train_elbo=f"{history[-1]['train_elbo']:.2f}",
                            **({} if val is None else {"val_elbo": f"{val:.2f}"}))
            is_best = False
            if val is not None:
                if best["val_elbo"] is None or val > best["val_elbo"]:
                    best.update(val_elbo=val, epoch=epoch + 1, bad_epochs=0)
                    is_best = True
                else:
                    best["bad_epochs"] += 1
            last_epoch = epoch + 1 == config.epochs
            stop = config.patience is not None and best["bad_epochs"] >= config.patience
            if (epoch + 1) % config.checkpoint_every == 0 or last_epoch or stop or interrupt.requested:
                last_good = checkpoint(epoch + 1, 0, is_best=is_best or (val is None))
            if interrupt.requested and not last_epoch:
                raise KeyboardInterrupt(
                    f"interrupted after epoch {epoch + 1}; checkpoint written to {last_good}; "
                    f"resume with fit(..., resume={str(run_dir)!r})" if last_good else
                    f"interrupted after epoch {epoch + 1}; no run_dir, nothing saved"
                )
            if stop:
                stopped_early = True
                break

    group.close()
    return FitResult(
        history=tuple(history),
        best_epoch=best["epoch"] or (history[-1]["epoch"] if history else 0),
        stopped_early=stopped_early,
        run_dir=run_dir,
        device=str(dev),
        params={k: v.detach() for k, v in params.items()},
        rank=group.rank,
        world_size=group.world_size,
        static_graph=static is not None and static_steps > 0,
        static_graph_off=static_off,
    )


def _diverged_message(what, value, epoch, step, global_step, run_dir, last_good):
    msg = (f"{what} became {value} at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}); "
           "the parameters were not updated with it")
    if run_dir is not None:
        where = last_good or "the latest checkpoint in the run folder"
        msg += (f". The last good checkpoint is kept ({where}); resume with a lower learning rate: "
                f"fit(..., resume={str(run_dir)!r}, lr=...)")
    return msg + ". Common causes: a learning rate too high, data outside the likelihood's support."
