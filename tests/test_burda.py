"""benchmarks/burda_table1.py end to end at a tiny budget: every stage, both layer counts, the k = 1 run
shared by both objectives, evaluation, the table and the JSON, and a rerun that trains nothing."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from .common import data_dir, requires_mnist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "burda_table1.py"


def _script():
    spec = importlib.util.spec_from_file_location("burda_table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(burda, argv):
    threads = torch.get_num_threads()
    try:  # one thread: the fastest for these small networks, and immune to other jobs on the cores
        return burda.main(burda.parser().parse_args([*argv, "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)


def _checkpoints(root):
    return {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/run/checkpoint-*.pt")}


def test_schedule_is_the_papers_and_compresses():
    burda = _script()
    full = burda.schedule(burda.total_passes("full"))
    assert [end for end, _ in full] == [1, 4, 13, 40, 121, 364, 1093, 3280], full
    assert [lr for _, lr in full] == pytest.approx([1e-3 * 10 ** (-i / 7) for i in range(8)])
    # a fraction or a number of passes: the same 8 stages, at least one pass each, the total kept
    assert burda.total_passes("0.05") == 164 and burda.schedule(164)[-1][0] == 164
    ends = [end for end, _ in burda.schedule(8)]
    assert ends == list(range(1, 9)), ends
    for bad in ("0", "1.5", "-3", "x"):
        with pytest.raises(ValueError, match="budget"):
            burda.total_passes(bad)


@requires_mnist
def test_tiny_budget_writes_every_configuration_and_resumes_without_training(tmp_path):
    burda = _script()
    argv = ["--data-dir", str(data_dir()), "--layers", "1", "2", "--k", "1", "2", "--objectives", "iwae",
            "--budget", "8", "--batch-size", "50", "--train-images", "100", "--val-images", "20",
            "--eval-images", "10", "--eval-particles", "60", "--device", "cpu",
            "--out-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    report = _main(burda, argv)
    checkpoints = _checkpoints(tmp_path)
    again = _main(burda, argv)  # the same command again: nothing to train or score
    names = {(r["layers"], r["k"], r["objective"]) for r in report["runs"]}
    assert names == {(1, 1, "both"), (1, 2, "iwae"), (2, 1, "both"), (2, 2, "iwae")}, names
    for run in report["runs"]:
        assert "error" not in run, run
        assert run["passes"] == 8 and run["passes_this_call"] == 8, run
        assert set(run["neg_bounds"]) == {"1", "5", "50"}, run["neg_bounds"]
        assert 0 < run["nll"] < run["neg_bounds"]["1"] < 1000, run  # more particles, a tighter bound
        assert set(run["active_units"]["per_layer"]) == {f"z{i + 1}" for i in range(run["layers"])}, run
    assert [s["end_pass"] for s in report["schedule"]] == list(range(1, 9))

    table = (tmp_path / "results" / "burda_table1.md").read_text()
    saved = json.loads((tmp_path / "results" / "burda_table1.json").read_text())
    assert {r["name"] for r in saved["runs"]} == {r["name"] for r in report["runs"]}
    for run in report["runs"]:
        assert run["name"] in table
    for paper in ("86.76", "85.33"):  # the paper's values beside ours
        assert paper in table
    assert "epsilon 1e-4" in table and "--budget 8" in saved["command"]
    config = json.loads(next((tmp_path / "runs").glob("*/run/config.json")).read_text())
    assert config["fit"]["optimizer_options"] == {"betas": [0.9, 0.999], "eps": 1e-4}

    for before, after in zip(report["runs"], again["runs"]):
        assert after["passes_this_call"] == 0 and not after["evaluated_this_call"], after
        assert after["nll"] == before["nll"]
    assert _checkpoints(tmp_path) == checkpoints
