"""Data-parallel training across processes started by ``torchrun``.

:func:`setup` turns the environment that ``torchrun`` provides (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...) into a :class:`Group`: gloo on
CPU, NCCL on CUDA, one device per process. :func:`pyrovae.fit` then runs the
data-parallel algorithm of ``DistributedDataParallel``:

* each rank trains on its own shard of every epoch, from a
  :class:`~torch.utils.data.DistributedSampler` (same seed on every rank,
  ``drop_last=True``, so all ranks take the same number of steps);
* parameters start identical (broadcast from rank 0), and gradients are
  averaged with ``all_reduce`` after every backward pass, so they stay identical;
* rank 0 alone writes checkpoints, metrics and pictures; a checkpoint holds
  every rank's RNG state, so a resumed run continues exactly.

It does this with explicit collectives rather than by wrapping a module in
``DistributedDataParallel``, because a model/guide pair is two Pyro programs
whose parameters may live in Pyro's param store rather than in one module.
In a single process every operation here is a no-op.
"""

import contextlib
import os
from typing import Iterable, List, Optional

import torch

__all__ = ["Group", "setup", "resolve_device", "check_device", "default_device"]


def check_device(device) -> str:
    """Refuse anything but ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    ok = isinstance(device, str) and (device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit()))
    if not ok:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def resolve_device(device: str) -> torch.device:
    """The one place a device name becomes a ``torch.device``.

    ``"auto"`` is CUDA when available, else the CPU. A CUDA device always
    carries its index (``"cuda"`` becomes ``cuda:<current device>``), so it
    compares equal to the device of a tensor that lives there.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


def default_device(device: torch.device):
    """Make ``device`` the default device while the programs run, if it is not already.

    Pyro creates tensors on the default device (a plate's subsample indices,
    for one), and so do programs that write ``torch.zeros(k)``. When a user has
    set another default (``torch.set_default_device("cuda")``, as Pyro advises
    for GPUs) but trains or evaluates on ``device``, those tensors must follow
    the training device. The switch costs a Python call per operation, so it is
    made only when the two differ.
    """
    current = torch.get_default_device()
    same = current.type == device.type and (current.index is None or device.index is None
                                            or current.index == device.index)
    return contextlib.nullcontext() if same else torch.device(device)


class Group:
    """The processes of one training run; ``world_size == 1`` is a single process."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None, owns: bool = False):
        self.rank, self.world_size, self.device, self._owns = rank, world_size, device, owns

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors, in place."""
        if self.active:
            import torch.distributed as dist

            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def average_grads_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace each gradient by its mean over ranks (missing gradients count as zero)."""
        if not self.active:
            return
        import torch.distributed as dist

        tensors = list(tensors)
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t, g in zip(tensors, grads):
            n = g.numel()
            t.grad = flat[offset : offset + n].view_as(t).clone()
            offset += n

    def sum(self, values: List[float]) -> List[float]:
        """Sum floats over ranks (one small all_reduce)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> Optional[list]:
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` in one process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def shard(self, n: int, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
        """This rank's indices for one epoch, from a DistributedSampler."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=shuffle, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.int64, device="cpu")

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it."""
        if self._owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns = False


def setup(device: str) -> Group:
    """A :class:`Group` for this process: from ``torchrun``'s environment, or a single process.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the default process group is created
    here unless the caller already created one, and ``device="auto"`` or
    ``"cuda"`` means ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialised = dist.is_available() and dist.is_initialized()
    if world <= 1 and not initialised:
        return Group(device=resolve_device(device))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if not initialised:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, owns=owns)
