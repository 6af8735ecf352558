"""Long run (slow marker): memory stays flat and the run folder stays small."""

import pytest
import torch

from pyrovae import VAE, fit, load_dataset

from .common import DEVICE


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system")


@pytest.mark.slow
def test_memory_flat_and_files_bounded_over_many_epochs(tmp_path):
    s = load_dataset("digits")
    torch.manual_seed(0)
    vae = VAE(s.event_shape, latent_dim=8, hidden=(256,))
    rss = []
    for leg, epochs in enumerate(range(50, 301, 50)):
        fit(vae.model, vae.guide, s, epochs=epochs, batch_size=64, progress=False, device=DEVICE,
            run_dir=tmp_path if leg == 0 else None, resume=tmp_path if leg else None)
        rss.append(_rss_mib())
        files = sorted(p.name for p in tmp_path.iterdir())
        assert len(files) <= 6, files  # manifest, config, metrics, latest and best checkpoints
    growth = rss[-1] - rss[1]  # after warm-up (first leg allocates caches)
    print(f"RSS by leg (MiB): {[round(r, 1) for r in rss]}; growth after warm-up {growth:.1f} MiB")
    assert growth < 25, rss
