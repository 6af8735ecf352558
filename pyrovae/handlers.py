"""pyrovae's Pyro effect handlers.

Variants of the objective are handlers around the programs, never copies of
them: the same model and guide train with or without them.
"""

from pyro.poutine.messenger import Messenger

__all__ = ["ScaleLatents"]


class ScaleLatents(Messenger):
    """Multiply the log-density of every unobserved sample site by :attr:`factor`.

    Applied to both model and guide it scales log p(z) - log q(z|x), the KL
    term of the ELBO, and leaves log p(x|z) alone: the KL warm-up of Bowman et
    al. (2016) and Sønderby et al. (2016), for any model/guide pair. The
    trainer sets :attr:`factor` before each step.

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0., 1.))
    >>> warmup = ScaleLatents(factor=0.25)
    >>> poutine.trace(warmup(model)).get_trace().nodes["z"]["scale"]
    0.25

    References:

    * Bowman et al. (2016). Generating sentences from a continuous space. CoNLL.
    * Sønderby et al. (2016). Ladder variational autoencoders. NeurIPS.
    """

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.factor
