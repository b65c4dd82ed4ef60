"""kernels.lowering: the export-mode switch; the chunked lowering exported to ONNX runs in ONNX
Runtime and equals the sequential reference; graph size does not grow with L beyond levels."""
import numpy as np
import pytest
import torch

import kernels
from kernels import selective_scan, selective_scan_ref
from kernels.testing import make_scan_inputs, to_double


class Scan(torch.nn.Module):
    """A module holding A, D, delta_bias as parameters, like a Mamba block."""

    def __init__(self, kw):
        super().__init__()
        self.A = torch.nn.Parameter(kw["A"])
        self.D = torch.nn.Parameter(kw["D"]) if kw["D"] is not None else None
        self.bias = torch.nn.Parameter(kw["delta_bias"]) if kw["delta_bias"] is not None else None
        self.softplus = kw["delta_softplus"]

    def forward(self, u, delta, B, C, z):
        return selective_scan(u, delta, self.A, B, C, self.D, z, self.bias,
                              delta_softplus=self.softplus)


def _args(kw):
    return (kw["u"], kw["delta"], kw["B"], kw["C"], kw["z"])


def _export(model, args):
    return torch.onnx.export(model.eval(), args, dynamo=True, verbose=False).model_proto


def test_mode_switch_and_context_manager():
    assert kernels.get_export_mode() == "auto"
    with kernels.export_mode("chunked"):
        assert kernels.get_export_mode() == "chunked"
        with kernels.export_mode("plugin"):
            assert kernels.get_export_mode() == "plugin"
        assert kernels.get_export_mode() == "chunked"
    assert kernels.get_export_mode() == "auto"
    with pytest.raises(ValueError, match="mode"):
        kernels.set_export_mode("loop")


def test_op_is_one_node_for_torch_export_in_op_mode():
    kw = make_scan_inputs(1, 4, 9, 3, 2, seed=1)
    with kernels.export_mode("op"):
        ep = torch.export.export(Scan(kw), _args(kw))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("edgead.selective_scan" in t for t in targets) == 1
    # default ("auto") mode traces the chunked standard ops instead: no custom op left
    ep = torch.export.export(Scan(kw), _args(kw))
    assert not any("edgead" in str(n.target) for n in ep.graph.nodes)


def test_opcheck_and_compile_with_grad():
    kw = make_scan_inputs(1, 6, 11, 4, 3, seed=2)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args = [a.clone().requires_grad_(True) for a in args]
    torch.library.opcheck(torch.ops.edgead.selective_scan.default, (*args, True))

    f = torch.compile(lambda *t: selective_scan(*t, delta_softplus=True).square().sum(),
                      backend="aot_eager", fullgraph=True)
    loss = f(*args)
    grads = torch.autograd.grad(loss, args)
    ref_args = [a.detach().double().requires_grad_(True) for a in args]
    ref_grads = torch.autograd.grad(selective_scan_ref(*ref_args, delta_softplus=True).square().sum(),
                                    ref_args)
    for g, r in zip(grads, ref_grads):
        assert ((g.double() - r).abs().max() / r.abs().max()).item() <= 1e-4


def test_chunked_onnx_runs_in_onnxruntime():
    import onnxruntime as ort
    kw = make_scan_inputs(2, 6, 37, 5, 2, seed=3)
    proto = _export(Scan(kw), _args(kw))
    assert not any(n.domain not in ("", "ai.onnx") for n in proto.graph.node)
    assert not any(n.op_type in ("Loop", "Scan") for n in proto.graph.node)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), _args(kw))}
    out = sess.run(None, feeds)[0]
    ref = selective_scan_ref(**to_double(kw)).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_chunked_onnx_node_count_independent_of_length():
    counts = {}
    for length in (16, 64, 256, 1024):  # 1, 2, 3 and 4 levels of 4-step chunks
        kw = make_scan_inputs(1, 4, length, 4, 2, seed=4, with_z=False, with_D=False,
                              with_bias=False)
        counts[length] = len(_export(Scan(kw), _args(kw)[:4] + (None,)).graph.node)
    first_level = counts[64] - counts[16]
    per_level = counts[256] - counts[64]
    assert 0 < first_level < 60 and 0 < per_level < 60
    assert counts[1024] - counts[256] == per_level    # a constant cost per extra chunk level


def _scan_graph_ops(length=64):
    kw = make_scan_inputs(2, 8, length, 4, 2, seed=6)
    return [n.op_type for n in _export(Scan(kw), _args(kw)).graph.node]


def test_chunked_onnx_avoids_slow_ort_patterns():
    """The lowering's speed in ONNX Runtime rests on these (kernels/selective_scan.py, chunked
    lowering notes): no Transpose (ORT pushes it onto the (B, D, L, N)-sized products), no
    Softplus (scalar kernel in ORT), no Gather (per-element copies on the last axis)."""
    ops = set(_scan_graph_ops())
    assert not ops & {"Transpose", "Softplus", "Gather", "Loop", "Scan"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_ops_matches_torch(dtype):
    from kernels.selective_scan import _softplus_ops

    x = torch.cat([torch.linspace(-80, 120, 20001, dtype=torch.float64),
                   torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 5])
    x = x.to(dtype)
    got = _softplus_ops(x).double()
    xd = x.double()   # float64 reference without torch's threshold (softplus(x) = x above 20)
    ref = torch.where(xd > 0, xd + torch.log1p(torch.exp(-xd)), torch.log1p(torch.exp(xd)))
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("shape", [(2, 6, 37, 5, 2), (1, 8, 64, 4, 4), (3, 4, 1, 3, 1), (1, 6, 257, 16, 3)])
@pytest.mark.parametrize("steep", [False, True])
def test_both_chunked_forms_match_reference(shape, steep):
    """The ONNX Runtime form ("ort", what torch.onnx.export traces) and the Inductor form (eager,
    torch.compile, torch.export) against the float64 sequential reference, eagerly: odd L,
    L = 1, G > 1, steep decays (exp underflow), last state returned."""
    from kernels.selective_scan import selective_scan_chunked

    kw = make_scan_inputs(*shape, seed=sum(shape), steep=steep)
    if steep:
        kw["delta"] = kw["delta"] * 30
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    for form in ("ort", "inductor"):
        y, h = selective_scan_chunked(**kw, return_last_state=True, form=form)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() <= 1e-5, form
        assert ((h.double() - h_ref).abs().max() / h_ref.abs().max().clamp_min(1e-30)).item() <= 1e-5, form
    with pytest.raises(ValueError, match="form"):
        selective_scan_chunked(**kw, form="loop")
