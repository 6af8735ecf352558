"""pyrovae: variational autoencoders as Pyro model/guide pairs.

Importing pyrovae loads torch and Pyro and nothing else: no CUDA
initialisation, no downloads, no ArviZ, no torchvision.
"""

from .data import DataSplits, from_arrays, load_dataset
from .importance import LogMarginal, log_marginal
from .likelihoods import LIKELIHOODS, Bernoulli, ContinuousBernoulli, Gaussian, Laplace, Likelihood
from .runs import CheckpointError, Run, load_run
from .sources import Source
from .train import FitConfig, FitResult, NonFiniteLossError, fit
from .vae import VAE, VAEConfig

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "VAEConfig",
    "fit",
    "Source",
    "FitConfig",
    "FitResult",
    "NonFiniteLossError",
    "log_marginal",
    "LogMarginal",
    "load_run",
    "Run",
    "CheckpointError",
    "load_dataset",
    "from_arrays",
    "DataSplits",
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "ContinuousBernoulli",
    "Laplace",
    "LIKELIHOODS",
]
