"""Every CUDA source shipped in medfeat/kernels/cuda compiles with nvcc (no GPU needed).

Compiled to an sm_90 cubin and to PTX with an integer source type, so a kernel that does not compile fails CI even on machines without a GPU.
"""
import shutil
import subprocess
from importlib import resources

import pytest

from medfeat.kernels._gpu import _CTYPES

NVCC = shutil.which("nvcc")
SOURCES = sorted(p.name for p in resources.files("medfeat.kernels").joinpath("cuda").iterdir() if p.name.endswith(".cu"))


def test_sources_are_shipped():
    assert "resample.cu" in SOURCES


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("ctype, flags", [("float", ["-cubin", "-arch=sm_90"]), ("unsigned char", ["--ptx"])])
def test_nvcc_compiles(name, ctype, flags, tmp_path):
    """A cubin for H100 (runs ptxas too) with float input; PTX with an integer input type."""
    assert ctype in _CTYPES.values()
    src = resources.files("medfeat.kernels").joinpath("cuda", name)
    with resources.as_file(src) as path:
        cmd = [NVCC, *flags, f"-DTIN={ctype}", "-std=c++14", str(path), "-o", str(tmp_path / "out")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{name} with TIN={ctype}: {res.stderr[-2000:]}"
