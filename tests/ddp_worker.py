"""Run by tests/test_distributed.py under torchrun: fit a small VAE, save this rank's result."""

import os
import sys

import torch

import pyrovae


def main(out, epochs, run_dir, resume, static_graph):
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different initial weights per rank: fit must broadcast rank 0's
    splits = pyrovae.load_dataset("digits", binarize="static", subset=256)
    vae = pyrovae.VAE(splits.event_shape, latent_dim=2, hidden=(16,))
    result = pyrovae.fit(vae.model, vae.guide, splits, epochs=epochs, batch_size=32, lr=3e-3, seed=0,
                         device="cpu", progress=False, run_dir=None if resume else run_dir,
                         resume=run_dir if resume else None, static_graph=static_graph)
    torch.save({"params": result.params, "history": result.history, "world_size": result.world_size,
                "static_graph": result.static_graph},
               os.path.join(out, f"rank{result.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "resume", sys.argv[5] == "static")
