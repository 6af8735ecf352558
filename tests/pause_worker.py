"""Run ``pyrovae train`` and stop dead at a moment the test chooses, then wait to be killed.

The fault tests kill training at moments they observe, not after sleeps, so they
do not depend on how fast the machine is. ``PYROVAE_TEST_PAUSE`` names the moment:

* ``step:N``: after the N-th optimiser step of this process;
* ``write:N``: inside the N-th file write of the run folder, after the data is on
  disk and before the rename that would publish it.

At that moment the worker prints ``PAUSED <moment>`` on stdout and waits for a
signal: SIGKILL ends it there; after a handled signal (SIGINT, which training turns
into a flag checked between steps) it carries on, however soon after the announcement the
signal comes. Without the variable it runs the job to the end.
"""

import os
import sys
import signal
import time

import torch

from pyrovae import cli


HANDLED = (signal.SIGINT, signal.SIGTERM)


def _pause(what, announce=print):
    """Say where we are, then wait for a signal. A handled signal that comes at any moment after
    the announcement, even before the wait begins, ends the wait (``signal.pause()`` after the
    announcement would wait forever for one that came first): a handler of our own notes it,
    the wait polls the note, and the signal is raised again under the original handler.
    SIGKILL ends us wherever we are."""
    got = []
    originals = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        announce(f"PAUSED {what}", flush=True)
        while not got:
            time.sleep(0.01)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
    signal.raise_signal(got[0])


def _install(moment: str) -> None:
    kind, _, number = moment.partition(":")
    target = int(number)
    count = [0]
    if kind == "step":
        for cls in {torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop}:
            _wrap_step(cls, count, target)
    elif kind == "write":
        original_replace = os.replace

        def replace(src, dst, *a, **k):
            count[0] += 1
            if count[0] == target:
                _pause(moment)
            return original_replace(src, dst, *a, **k)

        os.replace = replace  # runs.py publishes every file of the run folder with os.replace
    else:
        raise SystemExit(f"unknown PYROVAE_TEST_PAUSE {moment!r}")


def _wrap_step(cls, count, target):
    original = cls.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == target:
            _pause(f"step:{target}")
        return out

    cls.step = step


if __name__ == "__main__":
    moment = os.environ.get("PYROVAE_TEST_PAUSE")
    if moment:
        _install(moment)
    raise SystemExit(cli.main(sys.argv[1:]))
