"""`device`: run a kernel test on the CPU and, tagged stack("cuda"), on a CUDA device (skips without one)."""
import pytest
import torch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.stack("cuda"))])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param
