"""AOTInductor package of a tiny DVAD: loads without the model code and equals PyTorch.

On CPU (the compile takes a minute or more on 2 cores: marked slow) and, tagged stack("cuda"), on a CUDA
device (skips without one)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from .conftest import FRAME_HW, fresh_frames

LOADER = r"""
import json, sys
import numpy as np, torch
from torch._inductor import aoti_load_package
assert "models" not in sys.modules and "kernels" not in sys.modules
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32
device = sys.argv[2]
runner = aoti_load_package(sys.argv[1])
meta = json.loads(runner.get_metadata()["edge_ad"])
res = {}
for name in sys.argv[3:]:
    frames = torch.from_numpy(np.load(name)).to(device)
    with torch.inference_mode():
        outs = runner(frames)
    assert all(o.device.type == device for o in outs)
    res[name] = [o.cpu().numpy().tolist() for o in outs]
    assert not any(m.startswith(("models", "kernels", "export")) for m in sys.modules), "model code imported"
print(json.dumps({"meta": meta, "outs": res}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)   # the CPU compile alone took 5-9 min on a shared, overloaded 2-core box
def test_aoti_package_loads_without_model_code_and_matches(tiny_ckpt, tiny_model, tmp_path):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("AOTInductor on CPU needs a C++ compiler")
    from export.aoti import export_aoti
    from deploy.artifacts import read_metadata

    import torch._inductor.config as icfg

    fast = ({"aot_inductor.compile_wrapper_opt_level": "O0"}
            if hasattr(icfg.aot_inductor, "compile_wrapper_opt_level") else {})   # test speed only
    res = export_aoti(tiny_ckpt, tmp_path / "out", frame_hw=FRAME_HW, frame_channels=1, max_batch=4, n=3, quiet=True,
                      inductor_configs=fast)
    assert res.parity.passed and res.path.suffix == ".pt2"
    meta = read_metadata(res.path)
    assert meta["export"]["format"] == "aoti" and meta["score_stats"] == tiny_model.score_stats.to_dict()
    _load_without_model_code_and_compare(res.path, "cpu", tiny_model, tmp_path)


@pytest.mark.stack("cuda")
@pytest.mark.timeout(900)
def test_aoti_cuda_package_passes_the_gate_and_matches_without_model_code(tiny_ckpt, tiny_model, tmp_path):
    """The CUDA package (Inductor's Triton kernels compiled in): the exporter's own parity gate
    passes, and a process without the model code runs it on CUDA tensors and equals eager CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (AOTInductor compiles the package for it)")
    from deploy.artifacts import read_metadata
    from export.aoti import export_aoti

    res = export_aoti(tiny_ckpt, tmp_path / "out", frame_hw=FRAME_HW, frame_channels=1, max_batch=4, n=3,
                      device="cuda", quiet=True)
    assert res.parity.passed, res.parity.report()
    assert read_metadata(res.path)["export"]["device"] == "cuda"
    _load_without_model_code_and_compare(res.path, "cuda", tiny_model, tmp_path)


def _load_without_model_code_and_compare(package, device, tiny_model, tmp_path):
    from deploy.graph import DeployModule

    inputs = []
    for b in (1, 3):
        p = tmp_path / f"frames{b}.npy"
        np.save(p, fresh_frames(b, FRAME_HW, 1, seed=300 + b))
        inputs.append(str(p))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(package), device, *inputs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["meta"]["export"]["frame_hw"] == list(FRAME_HW)
    dm = DeployModule(tiny_model, frame_hw=FRAME_HW, frame_channels=1).eval()
    for name in inputs:
        with torch.no_grad():
            ref = [o.numpy() for o in dm(torch.from_numpy(np.load(name)))]
        for r, g in zip(ref, out["outs"][name]):
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=1e-4, atol=2e-5)
