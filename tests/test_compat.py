"""Every private Pyro/torch API pyrovae relies on, exercised against the installed versions.

A failure here names the versions: that upgrade broke a helper in pyrovae/_compat.py.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from pyrovae import _compat

VERSIONS = _compat.versions()


def _pair():
    w = torch.tensor(0.5, requires_grad=True)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w * z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 1.0))

    return model, guide, w


def test_pyro_module_names_split():
    net = torch.nn.Linear(2, 1)
    pyro.module("enc", net)
    names = list(pyro.get_param_store().keys())
    split = {_compat.split_module_param_name(n) for n in names}
    assert split == {("enc", "weight"), ("enc", "bias")}, f"pyro.module naming changed under {VERSIONS}: {names}"
    assert _compat.split_module_param_name("W") == (None, "W"), VERSIONS


def test_elbo_traces_and_log_r():
    model, guide, _ = _pair()
    pairs = list(_compat.get_elbo_traces(Trace_ELBO(), model, guide, (torch.zeros(3),), {}))
    assert len(pairs) == 1, f"ELBO._get_traces changed under {VERSIONS}"
    model_trace, guide_trace = pairs[0]
    assert "x" in model_trace.nodes and "z" in guide_trace.nodes, VERSIONS
    assert "log_prob_sum" in model_trace.nodes["x"], f"traces are no longer scored under {VERSIONS}"
    log_r = _compat.trace_elbo_log_r(model_trace, guide_trace)
    assert hasattr(log_r, "sum_to"), f"_compute_log_r changed under {VERSIONS}"


def test_make_fx_records_a_step():
    w = torch.tensor(2.0)
    graph = _compat.make_fx(lambda x: (x * w).sin())(torch.ones(3))
    assert torch.equal(graph(torch.ones(3)), (torch.ones(3) * 2).sin()), f"make_fx changed under {VERSIONS}"
    assert any(n.op == "call_function" for n in graph.graph.nodes), VERSIONS


def test_tested_versions_are_recorded():
    assert pyro.__version__.startswith(tuple(v.rsplit(".", 1)[0] for v in _compat.TESTED["pyro-ppl"])), \
        f"pyro-ppl {pyro.__version__} is not among the tested {_compat.TESTED['pyro-ppl']}"


def test_trace_packing_and_site_flags():
    def model():
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(3))
            pyro.deterministic("d", torch.ones(3))
        with pyro.plate("big", 10, subsample_size=4):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(4))

    trace = pyro.poutine.trace(model).get_trace()
    symbols = _compat.pack_trace(trace)
    assert set(symbols) >= {"data", "big"}, f"Trace.plate_to_symbol changed under {VERSIONS}"
    dims = _compat.packed_dims(trace.nodes["x"]["packed"]["log_prob"])
    assert dims == symbols["data"], f"packed tensors' _pyro_dims changed under {VERSIONS}: {dims!r}"
    assert _compat.is_deterministic(trace.nodes["d"]) and not _compat.is_deterministic(trace.nodes["x"]), VERSIONS
    (frame,) = trace.nodes["y"]["cond_indep_stack"]
    assert (_compat.plate_full_size(frame), frame.size) == (10, 4), f"CondIndepStackFrame changed under {VERSIONS}"


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(3)
    v = _compat.tensor_version(t)
    t.view(3).add_(1)
    assert _compat.tensor_version(t) > v, f"Tensor._version changed under {VERSIONS}"


def test_dispatch_mode_sees_aten_operations_without_importing_dynamo():
    import subprocess
    import sys

    code = ("import sys, torch; from pyrovae import _compat\n"
            "class M(_compat.DispatchMode):\n"
            "    seen = []\n"
            "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
            "        M.seen.append(str(func)); return func(*args, **(kwargs or {}))\n"
            "with M(): torch.ones(2).log()\n"
            "print(M.seen[-1], 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["aten.log.default", "False"], f"TorchDispatchMode changed under {VERSIONS}: {out}"
