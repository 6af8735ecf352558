"""The Bayesian workflow on run folders: ``pyrovae check RUN`` and ``pyrovae compare RUN RUN...``.

:func:`check_run` diagnoses a trained VAE on one split of its data, in the
order a reader should trust the numbers:

1. **log p(x)** by importance sampling, led by its k-hat verdict
   (:class:`~pyrovae.importance.LogMarginalSummary`);
2. **posterior predictive checks** of two image statistics, from raw q and
   from the PSIS-reweighted posterior
   (:func:`~pyrovae.diagnostics.reweighted_predictive`);
3. **simulation-based calibration** of the amortised guide
   (:func:`~pyrovae.diagnostics.sbc`);
4. **collapse**: active units, KL per latent dimension, the ELBO split and
   the mutual information (:func:`~pyrovae.diagnostics.latent_usage`).

It writes ``check.json`` (format :data:`CHECK_SCHEMA`, checked by
:func:`validate_check_report`) and ``khat.png``, ``ppc.png``, ``sbc.png`` and
``collapse.png``, into the run folder's ``check/`` (committed through its
manifest) or into ``out_dir``. :func:`compare_runs` scores several runs on the
same datapoints and compares them, paired (:func:`~pyrovae.diagnostics.compare`).
"""

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import pyro
import torch

from . import plots
from ._checks import check_choice, check_int, check_path, check_seed
from .diagnostics import (PPCStatistic, _seeded, compare, khat_threshold, latent_usage, reweighted_predictive,
                          sbc, UNRELIABLE_LIMIT)
from .importance import LogMarginal, log_marginal
from .job import job_of_run, job_split
from .runs import RunFolder, json_bytes, load_run

__all__ = ["check_run", "compare_runs", "validate_check_report", "CHECK_SCHEMA", "CHECK_FORMAT"]


# ---------------------------------------------------------------------- the run folder (all coupling here)
@dataclass(frozen=True)
class _RunData:
    """What the workflow needs from a run folder written by ``pyrovae train``."""

    vae: torch.nn.Module
    x: torch.Tensor
    data: dict
    seed: int
    model: dict
    checkpoint: dict


def _open_run(run_dir, *, split: str, data_dir: Optional[str]) -> _RunData:
    """The trained VAE (CPU, eval mode) and one split of its data, as ``pyrovae train`` stored them.

    The job and its data come from :mod:`pyrovae.job`, as ``pyrovae evaluate`` reads them.
    """
    run = load_run(run_dir)
    if run.vae is None:
        raise ValueError(f"{run_dir} was not written by 'pyrovae train' (no VAE in config.json); "
                         "run the diagnostics of pyrovae.diagnostics on your own pair instead")
    job = job_of_run(RunFolder(run_dir))
    x, splits = job_split(job, split, data_dir)
    seed = job.seed
    if len(x) == 0:
        raise ValueError(f"the {split} split of {splits.name!r} is empty")
    description = run.config.get("pair") or run.config.get("model") or {}
    checkpoint = RunFolder(run_dir).checkpoint_entry("latest")  # what load_run loaded
    return _RunData(run.vae.eval(), x, {**splits.info(), "split": split}, seed, description, checkpoint)


def _write(run_dir, out_dir, files: Dict[str, bytes]) -> Path:
    """Commit ``files`` to the run folder's ``check/`` through its manifest, or write them to ``out_dir``."""
    if out_dir is None:
        RunFolder(run_dir).commit(files={f"check/{name}": data for name, data in files.items()})
        return Path(run_dir) / "check"
    out = check_path("out_dir", out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


# ---------------------------------------------------------------------- the report's format
#: Identifies the format of ``check.json``; a change to :data:`CHECK_SCHEMA` changes the number.
CHECK_FORMAT = "pyrovae-check/1"

_NUMBER = {"type": "number"}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_NUMBERS = {"type": "array", "items": _NUMBER}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_PPC_SIDE = {"type": "object", "required": ["replicated_mean", "replicated_sd", "pvalue_mean", "pvalue_sd",
                                            "extreme_fraction"],
             "properties": {"replicated_mean": _NUMBER, "replicated_sd": _NUMBER, "pvalue_mean": _FRACTION,
                            "pvalue_sd": _FRACTION, "extreme_fraction": _FRACTION}}

#: JSON Schema (draft 2020-12) of ``check.json``; documented in ``docs/workflow.md``.
CHECK_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pyrovae check report",
    "type": "object",
    "required": ["format", "run", "checkpoint", "model", "data", "seed", "settings", "verdicts", "log_marginal",
                 "ppc", "sbc", "collapse", "pictures", "seconds"],
    "properties": {
        "format": {"const": CHECK_FORMAT},
        "run": {"type": "string"},
        "checkpoint": {"type": "object", "required": ["file", "sha256", "epoch"],
                       "properties": {"file": {"type": "string"}, "sha256": {"type": "string"},
                                      "epoch": {"type": "integer"}}},
        "model": {"type": "object"},
        "data": {"type": "object", "required": ["name", "split", "binarize", "seed", "num_datapoints"],
                 "properties": {"name": {"type": "string"}, "split": {"enum": ["test", "val", "train"]},
                                "binarize": {"type": "string"}, "seed": {"type": "integer"},
                                "num_datapoints": {"type": "integer", "minimum": 1}}},
        "seed": {"type": "integer"},
        "settings": {"type": "object",
                     "required": ["num_particles", "ppc_samples", "num_simulations", "num_draws", "usage_samples"],
                     "properties": {k: {"type": "integer", "minimum": 1} for k in
                                    ("num_particles", "ppc_samples", "num_simulations", "num_draws", "usage_samples")}},
        "verdicts": _STRINGS,
        "log_marginal": {
            "type": "object",
            "required": ["verdict", "reliable", "log_marginal", "mc_stderr", "data_stderr", "num_particles",
                         "khat_threshold", "unreliable_fraction", "khat_note", "ess_mean", "ess_min"],
            "properties": {"verdict": {"type": "string"}, "reliable": {"type": "boolean"},
                           "log_marginal": _NUMBER, "mc_stderr": _NUMBER, "data_stderr": _NUMBER,
                           "num_particles": {"type": "integer", "minimum": 2}, "khat_threshold": _NUMBER,
                           "khat_max": {"type": ["number", "null"]},
                           "unreliable_fraction": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                           "khat_note": {"type": "string"}, "ess_mean": _NUMBER, "ess_min": _NUMBER},
        },
        "ppc": {
            "type": "object", "required": ["num_samples", "num_replicates", "khat_unreliable_fraction", "statistics"],
            "properties": {
                "num_samples": {"type": "integer"}, "num_replicates": {"type": "integer"},
                "khat_unreliable_fraction": _FRACTION,
                "statistics": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "observed_mean", "observed_sd", "reweighted", "raw"],
                    "properties": {"name": {"type": "string"}, "observed_mean": _NUMBER, "observed_sd": _NUMBER,
                                   "reweighted": _PPC_SIDE, "raw": _PPC_SIDE}}},
            },
        },
        "sbc": {
            "type": "object",
            "required": ["num_simulations", "num_draws", "num_bins", "dimensions", "pvalues", "pvalue_bonferroni",
                         "calibrated", "expected_coverage"],
            "properties": {"num_simulations": {"type": "integer"}, "num_draws": {"type": "integer"},
                           "num_bins": {"type": "integer"}, "dimensions": _STRINGS,
                           "pvalues": {"type": "array", "items": _FRACTION}, "pvalue_bonferroni": _FRACTION,
                           "calibrated": {"type": "boolean"},
                           "expected_coverage": {"type": "object", "required": ["levels", "hpd"],
                                                 "properties": {"levels": _NUMBERS, "hpd": _NUMBERS}}},
        },
        "collapse": {
            "type": "object",
            "required": ["active_units", "threshold", "dimensions", "activity", "kl_dimensions", "kl_per_dimension",
                         "elbo", "reconstruction", "kl", "mutual_information", "mutual_information_max",
                         "marginal_kl"],
            "properties": {"active_units": {"type": "integer", "minimum": 0}, "threshold": _NUMBER,
                           "dimensions": _STRINGS, "activity": _NUMBERS, "kl_dimensions": _STRINGS,
                           "kl_per_dimension": _NUMBERS, "elbo": _NUMBER, "reconstruction": _NUMBER, "kl": _NUMBER,
                           "mutual_information": _NUMBER, "mutual_information_max": _NUMBER, "marginal_kl": _NUMBER},
        },
        "pictures": {"type": "array", "items": {"enum": ["khat.png", "ppc.png", "sbc.png", "collapse.png"]}},
        "seconds": _NUMBER,
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (name == "number" or float(value).is_integer()) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def _violations(value, schema: dict, where: str):
    """The keywords of JSON Schema that :data:`CHECK_SCHEMA` uses, checked one by one."""
    types = schema.get("type")
    if types is not None and not any(_type_ok(value, t) for t in ([types] if isinstance(types, str) else types)):
        yield f"{where}: expected {types}, got {value!r}"
        return
    if "const" in schema and value != schema["const"]:
        yield f"{where}: expected {schema['const']!r}, got {value!r}"
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} is not one of {schema['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            yield f"{where}: {value} < minimum {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            yield f"{where}: {value} > maximum {schema['maximum']}"
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                yield f"{where}: missing {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _violations(value[key], sub, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            yield f"{where}: fewer than {schema['minItems']} items"
        for i, item in enumerate(value):
            yield from _violations(item, schema.get("items", {}), f"{where}[{i}]")


def validate_check_report(report: dict) -> None:
    """Raise ``ValueError`` listing every way ``report`` departs from :data:`CHECK_SCHEMA`.

    >>> validate_check_report({"format": "pyrovae-check/1"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: check report does not match CHECK_SCHEMA: report: missing 'run'; ...
    """
    problems = list(_violations(report, CHECK_SCHEMA, "report"))
    if problems:
        raise ValueError("check report does not match CHECK_SCHEMA: " + "; ".join(problems))


# ---------------------------------------------------------------------- the checks
def _statistics(event_dims: int) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Image statistics for the PPC, each mapping ``(..., *event_shape)`` to ``(...)``."""
    def intensity(t):
        return t.flatten(-event_dims).double().mean(-1)

    def edges(t):  # fraction of horizontally adjacent pixels that differ: spatial structure
        rows = t.reshape(*t.shape[: t.dim() - event_dims], -1, t.shape[-1]).double()
        return (rows[..., 1:] - rows[..., :-1]).abs().flatten(-2).mean(-1)

    return {"mean intensity": intensity, "horizontal edges": edges}


def _picture(plot, *args, **kwargs) -> bytes:
    buf = io.BytesIO()
    plot(*args, buf, **kwargs)
    return buf.getvalue()


def _estimate(vae, x, *, num_particles: int, seed: int, batch: int = 100) -> LogMarginal:
    with _seeded(seed, (x,), {}):
        parts = [log_marginal(vae.model, vae.guide, x[i: i + batch], num_particles=num_particles)
                 for i in range(0, len(x), batch)]
    return LogMarginal.cat(parts)


def _check_log_marginal(vae, x, *, num_particles: int, seed: int) -> Tuple[dict, bytes, LogMarginal]:
    est = _estimate(vae, x, num_particles=num_particles, seed=seed)
    summary = est.summary()
    return summary.to_dict(), _picture(plots.plot_khat, est.khat, threshold=summary.khat_threshold), est


def _check_ppc(vae, x, *, num_samples: int, num_replicates: int, seed: int) -> Tuple[dict, bytes]:
    stats = _statistics(len(vae.event_shape))
    # Datapoints per call: the replicates of a batch hold num_samples * batch images (at most 2**23 pixels).
    batch = max(1, min(100, 2**23 // (num_samples * math.prod(vae.event_shape))))
    parts = {name: [] for name in stats}
    khat = []
    for i in range(0, len(x), batch):
        ppc = reweighted_predictive(vae.model, vae.guide, x[i: i + batch], num_samples=num_samples, seed=seed + i)
        khat.append(ppc.khat)
        for name, statistic in stats.items():
            parts[name].append(ppc.check(statistic, name=name, num_replicates=num_replicates, seed=seed + i))
    checks = [PPCStatistic.cat(p) for p in parts.values()]
    unreliable = float((torch.cat(khat) > khat_threshold(num_samples)).double().mean())
    report = {"num_samples": num_samples, "num_replicates": num_replicates, "khat_unreliable_fraction": unreliable,
              "statistics": [c.to_dict() for c in checks]}
    return report, _picture(plots.plot_ppc, checks)


def _check_sbc(vae, x, *, num_simulations: int, num_draws: int, seed: int) -> Tuple[dict, bytes]:
    # The batch only sets how many datapoints one model call simulates; its values are unused.
    result = sbc(vae.model, vae.guide, x[: min(len(x), num_simulations)], num_simulations=num_simulations,
                 num_draws=num_draws, seed=seed)
    report = result.to_dict()
    report["calibrated"] = report["pvalue_bonferroni"] > 0.01
    return report, _picture(plots.plot_sbc, result)


def _check_collapse(vae, x, *, num_samples: int, seed: int) -> Tuple[dict, bytes]:
    usage = latent_usage(vae.model, vae.guide, x, num_samples=num_samples, seed=seed)
    return usage.to_dict(), _picture(plots.plot_collapse, usage)


def _verdicts(report: dict) -> list:
    """The findings, most important first, in words."""
    lm, sbc_, ppc, col = report["log_marginal"], report["sbc"], report["ppc"], report["collapse"]
    out = [f"log p(x): {lm['verdict']}"]
    if sbc_["calibrated"]:
        out.append(f"SBC: no miscalibration of q(z|x) detected (Bonferroni p = {sbc_['pvalue_bonferroni']:.3g})")
    else:
        bad = [d for d, p in zip(sbc_["dimensions"], sbc_["pvalues"]) if p * len(sbc_["pvalues"]) < 0.01]
        out.append(f"SBC: q(z|x) is miscalibrated in {', '.join(bad)} (Bonferroni p = {sbc_['pvalue_bonferroni']:.2g})")
    for st in ppc["statistics"]:
        w, r = st["reweighted"], st["raw"]
        out.append(f"PPC {st['name']}: {100 * w['extreme_fraction']:.1f}% of datapoints outside the central 95% "
                   f"(raw q: {100 * r['extreme_fraction']:.1f}%); whole-data p-values: mean {w['pvalue_mean']:.3f}, "
                   f"spread {w['pvalue_sd']:.3f} (raw q: {r['pvalue_mean']:.3f}, {r['pvalue_sd']:.3f})")
    if ppc["khat_unreliable_fraction"] > UNRELIABLE_LIMIT:
        out.append(f"PPC: {100 * ppc['khat_unreliable_fraction']:.1f}% of datapoints have unreliable weights; "
                   "the reweighted check is unreliable there")
    out.append(f"collapse: {col['active_units']} of {len(col['dimensions'])} latent units active; mutual information "
               f"{col['mutual_information']:.2f} nats (at most log N = {col['mutual_information_max']:.2f})")
    return out


def check_run(
    run_dir,
    *,
    out_dir=None,
    split: str = "test",
    limit: Optional[int] = 1000,
    num_particles: int = 1000,
    ppc_samples: int = 1000,
    num_simulations: int = 1000,
    num_draws: int = 99,
    usage_samples: int = 10,
    seed: int = 0,
    data_dir: Optional[str] = None,
) -> dict:
    """Write the workflow report of a run folder (``pyrovae check RUN``); see the module docs.

    Runs on the CPU, in its own scope of Pyro's param store, with every draw
    seeded from ``seed`` (the caller's generator state is restored).

    :param run_dir: a run folder written by ``pyrovae train``.
    :param out_dir: where to write; None commits into the run folder's ``check/``.
    :param str split: ``"test"``, ``"val"`` or ``"train"``.
    :param int limit: use the first ``limit`` datapoints of the split (None: all).
    :param int num_particles: K of the log p(x) estimate.
    :param int ppc_samples: guide draws per datapoint for the reweighted PPC.
    :param int num_simulations: SBC simulations.
    :param int num_draws: SBC draws of q per simulation.
    :param int usage_samples: draws per datapoint for the collapse diagnostics.
    :param int seed: seeds every draw.
    :param str data_dir: the dataset's folder, if not the one the run recorded.
    :returns: the report, as written to ``check.json`` (:data:`CHECK_SCHEMA`).
    """
    check_choice("split", split, ("test", "val", "train"))
    check_int("limit", limit, allow_none=True)
    for name, value, low in (("num_particles", num_particles, 2), ("ppc_samples", ppc_samples, 2),
                             ("num_simulations", num_simulations, 2), ("num_draws", num_draws, 1),
                             ("usage_samples", usage_samples, 1)):
        check_int(name, value, low)
    if check_seed("seed", seed) is None:
        raise TypeError("seed must be an int: the report records it")
    t0 = time.perf_counter()
    with pyro.get_param_store().scope():
        run = _open_run(run_dir, split=split, data_dir=data_dir)
        x = run.x[:limit] if limit else run.x
        report = {"format": CHECK_FORMAT, "run": str(run_dir), "checkpoint": run.checkpoint, "model": run.model,
                  "data": {**run.data, "num_datapoints": len(x)}, "seed": seed,
                  "settings": {"num_particles": num_particles, "ppc_samples": ppc_samples,
                               "num_simulations": num_simulations, "num_draws": num_draws,
                               "usage_samples": usage_samples}}
        files = {}
        report["log_marginal"], files["khat.png"], _ = _check_log_marginal(run.vae, x, num_particles=num_particles,
                                                                            seed=seed)
        report["ppc"], files["ppc.png"] = _check_ppc(run.vae, x, num_samples=ppc_samples, num_replicates=100,
                                                     seed=seed + 1)
        report["sbc"], files["sbc.png"] = _check_sbc(run.vae, x, num_simulations=num_simulations,
                                                     num_draws=num_draws, seed=seed + 2)
        report["collapse"], files["collapse.png"] = _check_collapse(run.vae, x, num_samples=usage_samples,
                                                                    seed=seed + 3)
    report["verdicts"] = _verdicts(report)
    report["pictures"] = sorted(files)
    report["seconds"] = time.perf_counter() - t0
    report = json.loads(json_bytes(report))  # exactly what check.json holds
    validate_check_report(report)
    _write(run_dir, out_dir, {**files, "check.json": json_bytes(report)})
    return report


def compare_runs(
    run_dirs: Sequence,
    *,
    names: Optional[Sequence[str]] = None,
    split: str = "test",
    limit: Optional[int] = 1000,
    num_particles: int = 1000,
    seed: int = 0,
    data_dir: Optional[str] = None,
    out=None,
):
    """Compare runs by their log p(x) on the same datapoints, paired (``pyrovae compare RUN RUN...``).

    Every run is scored on the same split of the same data with the same seed;
    runs trained on different data (dataset, binarisation, seed or subset) are
    refused, since their differences would not be paired.

    :param run_dirs: two or more run folders written by ``pyrovae train``.
    :param names: a name per run (default: the folders' names).
    :param int num_particles: K of each estimate.
    :param out: optional path of a JSON file for the comparison; with two runs
        a histogram of the per-datapoint differences is written beside it (``.png``).
    :returns: :class:`~pyrovae.diagnostics.ComparisonResult` (it warns with
        :class:`~pyrovae.diagnostics.UnreliableEstimateWarning` when k-hat says so).
    """
    if isinstance(run_dirs, (str, Path)) or len(run_dirs) < 2:
        raise TypeError(f"run_dirs must be a sequence of at least two run folders, got {run_dirs!r}")
    names = [Path(r).name for r in run_dirs] if names is None else list(names)
    if len(names) != len(run_dirs) or len(set(names)) != len(names):
        raise ValueError(f"names must give each run a distinct name, got {names} for {len(run_dirs)} runs")
    check_choice("split", split, ("test", "val", "train"))
    check_int("limit", limit, allow_none=True)
    check_int("num_particles", num_particles, 2)
    check_seed("seed", seed)
    estimates, first = {}, None
    for name, run_dir in zip(names, run_dirs):
        with pyro.get_param_store().scope():
            run = _open_run(run_dir, split=split, data_dir=data_dir)
            x = run.x[:limit] if limit else run.x
            if first is not None and (x.shape != first[0].shape or not torch.equal(x, first[0])):
                raise ValueError(f"{run_dir} holds different {split} data than {first[1]} (dataset, binarisation, "
                                 "seed or subset differ): a paired comparison needs the same datapoints")
            first = first or (x, run_dir, run.data)
            estimates[name] = _estimate(run.vae, x, num_particles=num_particles, seed=seed)
    result = compare(estimates)
    if out is not None:
        out = check_path("out", out)
        out.parent.mkdir(parents=True, exist_ok=True)
        body = {"runs": {n: str(r) for n, r in zip(names, run_dirs)}, "data": {**first[2], "num_datapoints": len(first[0])},
                "seed": seed, **result.to_dict()}
        out.write_bytes(json_bytes(body))
        if len(names) == 2:
            plots.plot_paired_differences(estimates[names[0]], estimates[names[1]], out.with_suffix(".png"),
                                          names=tuple(names))
    return result
