"""The benchmarks' user pair: a VAE written the way Pyro's VAE tutorial writes it.

Two ``nn.Module`` networks registered with ``pyro.module`` inside the programs,
softplus hidden layers, a decoder that ends in a sigmoid and gives the Bernoulli
``probs`` (not logits), 784-400-50 as in the tutorial. Beside it, the same
networks and the same single-sample ELBO estimator written in plain PyTorch,
and a hand-vectorised importance sampler: the references the benchmarks time
``pyrovae.fit`` and ``pyrovae.log_marginal`` against.
"""

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

PIXELS = 784


class Encoder(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400):
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)

    def forward(self, x):
        hidden = F.softplus(self.fc1(x.reshape(-1, PIXELS)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, PIXELS)

    def forward(self, z):
        return torch.sigmoid(self.fc21(F.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """Pyro's tutorial VAE. ``name`` prefixes the ``pyro.module`` names, so that several copies
    can share one param store."""

    def __init__(self, z_dim=50, hidden_dim=400, name="tutorial"):
        super().__init__()
        self.encoder, self.decoder = Encoder(z_dim, hidden_dim), Decoder(z_dim, hidden_dim)
        self.z_dim, self.name = z_dim, name

    def model(self, x):
        pyro.module(f"{self.name}_decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, PIXELS))

    def guide(self, x):
        pyro.module(f"{self.name}_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def copies(names, seed=0, **kwargs):
    """``TutorialVAE`` copies with the same initial weights, one per name."""
    torch.manual_seed(seed)
    first = TutorialVAE(name=names[0], **kwargs)
    out = {names[0]: first}
    for name in names[1:]:
        out[name] = TutorialVAE(name=name, **kwargs)
        out[name].load_state_dict(first.state_dict())
    return out


def _log_joint_minus_q(vae, x, z, loc, scale):
    # torch.distributions' Bernoulli(probs): clamped logits, then the cross-entropy with logits, as Pyro
    # computes it. (F.binary_cross_entropy on probs is 2-3x slower on a CPU.)
    probs = vae.decoder(z)
    log_px = torch.distributions.Bernoulli(probs=probs, validate_args=False).log_prob(x).sum(-1)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_px + log_pz - log_qz


def elbo_terms(vae, x):
    """Plain PyTorch: the single-sample ELBO per image, the estimator Trace_ELBO computes."""
    x = x.reshape(-1, PIXELS)
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    return _log_joint_minus_q(vae, x, z, loc, scale)


def hand_chunk(vae, x, loc, scale, num):
    """Log weights ``(num, N)`` of ``num`` particles drawn from q(z | x) = Normal(loc, scale), with the
    encoder's ``loc`` and ``scale`` computed once; ``x`` of shape ``(N, 784)``."""
    z = loc + scale * torch.randn(num, *loc.shape, device=loc.device)
    return _log_joint_minus_q(vae, x, z, loc, scale)


@torch.no_grad()
def hand_log_marginal(vae, x, K, chunk):
    """What a careful PyTorch user writes: chunked particles, a streaming float64 log-sum-exp."""
    x = x.reshape(-1, PIXELS)
    loc, scale = vae.encoder(x)
    chunks = (hand_chunk(vae, x, loc, scale, min(chunk, K - start)) for start in range(0, K, chunk))
    return streaming_log_mean_exp(chunks, K)


def streaming_log_mean_exp(chunks, K):
    """log (1/K) sum_k exp(lw_k) per datapoint from chunks of log weights ``(c, N)``, in float64,
    keeping only a running maximum and sum (the hand-written samplers' reduction)."""
    m = s = None
    for lw in chunks:
        lw = lw.double()
        cm = lw.max(0).values
        nm = cm if m is None else torch.maximum(m, cm)
        t = (lw - nm).exp().sum(0)
        s = t if s is None else s * (m - nm).exp() + t
        m = nm
    return m + s.log() - math.log(K)
