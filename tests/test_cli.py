import json

import pytest

from pyrovae.cli import main

TINY = ["--epochs", "2", "--eval-particles", "10", "--subset", "64", "--hidden", "16", "--latent-dim", "2",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


def test_train_writes_a_complete_run_folder(run):
    names = {p.name for p in run.iterdir()}
    expected = {"manifest.json", "config.json", "metrics.csv", "report.json", "samples.png", "reconstructions.png",
                "interpolation.png", "latent_map.png", "elbo_curves.png", "khat.png"}
    assert expected <= names, expected - names
    report = json.loads((run / "report.json").read_text())
    assert report["test_log_marginal"]["num_particles"] == 10
    verdict = report["test_log_marginal"]["verdict"]
    assert report["headline"].startswith("test set, K=10: ") and verdict.split(":")[0] in report["headline"]
    assert report["dataset"]["binarize"] == "dynamic"


def test_evaluate_sample_reconstruct(run, capsys):
    assert main(["evaluate", str(run), "--num-particles", "20", "--limit", "30", "--device", "cpu"]) == 0
    result = json.loads((run / "evaluate" / "evaluation.json").read_text())
    assert result["num_datapoints"] == 30 and result["num_particles"] == 20
    manifest = json.loads((run / "manifest.json").read_text())
    assert result["checkpoint"] == manifest["latest"], "the evaluation names the checkpoint it scored"
    assert main(["sample", str(run), "--num", "4", "--out", str(run / "s.png"), "--device", "cpu"]) == 0
    assert main(["reconstruct", str(run), "--num", "4", "--out", str(run / "r.png"), "--device", "cpu"]) == 0
    assert (run / "s.png").stat().st_size > 0 and (run / "r.png").stat().st_size > 0


def test_resume_continues(run):
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress", "--eval-particles", "0"]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    assert main(["train", "--resume", str(run), "--latent-dim", "5"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "/nonexistent/run"], "run folder /nonexistent/run does not exist"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "not found in"),
        (["train", "--dataset", "cifar"], "'cifar' is not one of"),
        (["train", "--lr", "-1", "--epochs", "1"], "lr must be a positive finite float, got -1.0"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--run-dir", str(tmp_path / "r")] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyrovae: error:") and message in err and "Traceback" not in err, err


def test_corrupt_checkpoint_is_named(run, capsys):
    manifest = json.loads((run / "manifest.json").read_text())
    (run / manifest["latest"]["file"]).write_bytes(b"garbage")
    assert main(["sample", str(run)]) == 2
    assert manifest["latest"]["file"] in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(run, capsys):
    assert main(["train", "--run-dir", str(run), *TINY]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_static_graph_flag(tmp_path):
    assert TINY[:2] == ["--epochs", "2"]
    assert main(["train", "--run-dir", str(tmp_path / "on"), *TINY[2:], "--epochs", "3", "--batch-size", "16",
                 "--static-graph", "on"]) == 0
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["static_graph"] is True and report["static_graph_off"] is None, report
    assert main(["train", "--run-dir", str(tmp_path / "off"), *TINY, "--static-graph", "off"]) == 0
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["static_graph"] is False and report["static_graph_off"] == "static_graph=False", report


def test_check_and_compare_commands(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    small = ["--limit", "30", "--num-particles", "20"]
    assert main(["check", str(run), *small, "--ppc-samples", "20", "--num-simulations", "50", "--num-draws", "9",
                 "--usage-samples", "2"]) == 0
    report = json.loads((run / "check" / "check.json").read_text())
    assert report["format"] == "pyrovae-check/1"
    out = tmp_path / "comparison.json"
    assert main(["compare", str(run), str(run), "--names", "a", "b", *small, "--out", str(out)]) == 0
    assert json.loads(out.read_text()) and "a" in capsys.readouterr().out
    # a resume moves the checkpoint on; the check described the old one and goes
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress", "--eval-particles", "0"]) == 0
    assert not (run / "check" / "check.json").exists()
