"""deploy.cuda_buffers: backend selection and its errors against the real environment, the
host -> device -> host round trip where a CUDA device is visible, and injected CUDA error codes.

Each expected failure reason is found here independently of the module (importlib for pycuda,
cuda-python's own cudaGetDeviceCount, torch's own torch.cuda.init) and then looked for in the
module's message. On a machine without a GPU the round-trip tests skip with the reason."""
import importlib.util
from unittest import mock

import numpy as np
import pytest

from deploy import cuda_buffers as cb


def _find(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:       # parent package absent
        return False


def _cudart():
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        if _find(mod):
            return importlib.import_module(mod)
    return None


def _expected(name):
    """(kind, text that must appear in the detail) for backend `name` on this machine, found
    without the module under test; None when the backend looks usable here."""
    if name == "pycuda":
        if not _find("pycuda"):
            return cb.NOT_INSTALLED, "no module named 'pycuda'"
        try:
            import pycuda.driver as drv
            drv.init()
        except ImportError as e:               # pycuda present, libcuda absent
            return cb.NO_DRIVER, str(e).splitlines()[0]
        except Exception as e:                 # cuInit failed
            first = str(e).splitlines()[0]
            return (cb.NO_DEVICE if "no cuda-capable device" in first.lower() else cb.NO_DRIVER), first
        return None if drv.Device.count() > 0 else (cb.NO_DEVICE, "0 visible")
    if name == "cuda-python":
        rt = _cudart()
        if rt is None:
            return cb.NOT_INSTALLED, "imports"
        res = rt.cudaGetDeviceCount()
        if res[0] == rt.cudaError_t.cudaSuccess:
            return None if res[1] > 0 else (cb.NO_DEVICE, "0 visible")
        kind = cb.NO_DRIVER if res[0].name == "cudaErrorInsufficientDriver" else cb.NO_DEVICE
        return kind, res[0].name
    import torch
    if torch.version.cuda is None:
        return cb.NOT_INSTALLED, "CPU-only build"
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as e:
        first = str(e).splitlines()[0]
        return (cb.NO_DRIVER if "driver" in first.lower() else cb.NO_DEVICE), first
    return cb.NO_DEVICE, "is_available() is False"


@pytest.mark.parametrize("name", cb.BACKENDS)
def test_a_forced_backend_that_cannot_run_says_why(name):
    exp = _expected(name)
    if exp is None:
        pytest.skip(f"{name} is usable on this machine: no failure to report")
    kind, text = exp
    with pytest.raises(cb.BuffersUnavailable) as ei:
        cb.select_buffers(name)
    e = ei.value
    assert [r[0] for r in e.reasons] == [name]
    assert e.reasons[0][1] == kind
    msg = str(e)
    assert f"- {name}: {kind}: " in msg and text in msg
    assert "--backend ort-cpu" in msg


def test_auto_tries_each_backend_in_order_and_lists_every_reason():
    exp = {n: _expected(n) for n in cb.BACKENDS}
    if any(v is None for v in exp.values()):
        pytest.skip(f"a backend is usable here ({[n for n, v in exp.items() if v is None]}): auto succeeds")
    with pytest.raises(cb.BuffersUnavailable) as ei:
        cb.select_buffers("auto")
    e = ei.value
    assert [r[0] for r in e.reasons] == ["pycuda", "cuda-python", "torch"]
    msg = str(e)
    assert msg.count("\n  - ") == 3
    for name, kind, detail in e.reasons:
        assert kind == exp[name][0] and exp[name][1] in detail
        assert f"- {name}: {kind}: {detail}" in msg
    # the install hint appears exactly for the backends that are not installed
    assert ("pip install pycuda" in msg) == (exp["pycuda"][0] == cb.NOT_INSTALLED)
    assert cb.usable("auto") is None


@pytest.mark.stack("cuda")
def test_auto_picks_the_first_usable_backend_in_design_order():
    exp = {n: _expected(n) for n in cb.BACKENDS}
    usable = [n for n in cb.BACKENDS if exp[n] is None]
    if not usable:
        pytest.skip("no CUDA device-buffer backend is usable here (no GPU / driver)")
    with cb.select_buffers("auto") as b:
        assert b.name == usable[0]


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="buffers='cupy'; expected one of auto, pycuda, cuda-python, torch"):
        cb.select_buffers("cupy")
    for name in cb.BACKENDS:
        with pytest.raises(ValueError, match="device=-1"):
            cb.select_buffers(name, device=-1)


# ------------------------------------------------------------------------------------------
# round trip (needs a visible CUDA device)
# ------------------------------------------------------------------------------------------
def _open(name):
    try:
        return cb.select_buffers(name)
    except cb.BuffersUnavailable as e:
        pytest.skip(f"{name} device buffers unavailable here: {e.reasons[0][1]} ({e.reasons[0][2]})")


@pytest.mark.parametrize("name", cb.BACKENDS)
@pytest.mark.stack("cuda")
def test_host_device_host_round_trip(name):
    rng = np.random.default_rng()
    with _open(name) as b:
        assert isinstance(b.stream_handle, int)
        arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 7, 4099, 3 * 65537)]
        arrays += [rng.standard_normal((3, 5, 7)).astype(np.float32),
                   rng.standard_normal((2, 33)).astype(np.float16)]
        bufs = [b.alloc(a.nbytes + 13) for a in arrays]          # larger than the data: partial copies
        for buf, a in zip(bufs, arrays):
            b.upload(buf, a)
        outs = [np.empty_like(a) for a in arrays]
        for buf, o in zip(bufs, outs):
            b.download(buf, o)
        b.synchronize()
        for a, o in zip(arrays, outs):
            np.testing.assert_array_equal(o, a)
        # a second upload into a buffer whose transfer is still pending synchronizes first
        again = rng.integers(0, 256, 4099, dtype=np.uint8)
        b.upload(bufs[2], arrays[2][::-1].copy())
        b.upload(bufs[2], again)
        out = np.zeros_like(again)
        b.download(bufs[2], out)
        b.synchronize()
        np.testing.assert_array_equal(out, again)
        # argument errors
        n0 = bufs[0].nbytes
        with pytest.raises(ValueError, match=f"upload of {n0 + 1} bytes into a {n0}-byte device buffer"):
            b.upload(bufs[0], np.zeros(n0 + 1, np.uint8))
        with pytest.raises(ValueError, match="C-contiguous"):
            b.download(bufs[3], np.empty((8, 8), np.uint8)[:, ::2])
        b.free(bufs[0])
        with pytest.raises(cb.CudaBuffersError, match="not a live buffer"):
            b.upload(bufs[0], arrays[0])
    assert b.closed
    with pytest.raises(cb.CudaBuffersError, match="closed"):
        b.alloc(8)


# ------------------------------------------------------------------------------------------
# injected CUDA errors
# ------------------------------------------------------------------------------------------
def _rt_or_skip():
    rt = _cudart()
    if rt is None:
        pytest.skip("cuda-python (cuda-bindings) is not installed")
    return rt


def test_a_failed_cuda_python_call_names_the_call_and_the_error():
    rt = _rt_or_skip()
    err = rt.cudaError_t.cudaErrorInvalidValue
    text = rt.cudaGetErrorString(err)[1].decode()
    with pytest.raises(cb.CudaBuffersError) as ei:
        cb._check(rt, (err,), "cudaMemcpyAsync(host to device)")
    msg = str(ei.value)
    assert "cudaMemcpyAsync(host to device)" in msg and "cudaErrorInvalidValue" in msg and text in msg
    assert cb._check(rt, (rt.cudaError_t.cudaSuccess, 1234), "cudaMalloc") == 1234
    assert cb._check(rt, (rt.cudaError_t.cudaSuccess,), "cudaFree") is None


@pytest.mark.parametrize("result, kind, text", [
    ("cudaErrorNoDevice", cb.NO_DEVICE, "cudaErrorNoDevice"),
    ("cudaErrorInsufficientDriver", cb.NO_DRIVER, "cudaErrorInsufficientDriver"),
    (0, cb.NO_DEVICE, "device 0 requested, 0 visible"),
])
def test_cuda_python_device_count_failures_are_classified(result, kind, text):
    rt = _rt_or_skip()
    ret = (rt.cudaError_t.cudaSuccess, 0) if result == 0 else (getattr(rt.cudaError_t, result), 0)
    with mock.patch.object(rt, "cudaGetDeviceCount", return_value=ret):
        with pytest.raises(cb.BuffersUnavailable) as ei:
            cb.select_buffers("cuda-python")
    assert ei.value.reasons[0][:2] == ("cuda-python", kind)
    assert text in str(ei.value)


@pytest.mark.stack("cuda")
def test_a_failed_copy_on_a_real_device_names_the_call():
    rt = _rt_or_skip()
    b = _open("cuda-python")
    with b:
        buf = b.alloc(64)
        with mock.patch.object(b.rt, "cudaMemcpyAsync", return_value=(rt.cudaError_t.cudaErrorInvalidValue,)):
            with pytest.raises(cb.CudaBuffersError,
                               match=r"cudaMemcpyAsync\(host to device\) failed: cudaErrorInvalidValue"):
                b.upload(buf, np.arange(64, dtype=np.uint8))
