"""The C++ core and CUDA sources build and agree with the golden frames, wherever the compilers exist.

`make test` thereby runs `kernels-check`'s work: g++ builds kernels/tests/test_golden.cpp against kernels/cpu
and checks every golden verdict; nvcc (when on PATH) compiles every torch-free .cu for sm_80 and sm_90.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FLAGS = ["-std=c++17", "-O2", f"-I{ROOT / 'kernels/include'}", f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'kernels/cuda'}"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_golden_frames(tmp_path: Path) -> None:
    binary = tmp_path / "test_golden"
    sources = [
        ROOT / "kernels/tests/test_golden.cpp",
        ROOT / "kernels/cpu/frame.cpp",
        ROOT / "kernels/cpu/tables_file.cpp",
        ROOT / "kernels/cpu/codec_cpu.cpp",
    ]
    subprocess.run(["g++", *FLAGS, "-ffp-contract=off", "-pthread", *map(str, sources), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary), str(ROOT / "tests/golden")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
    assert "0 failure(s)" in result.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", sorted((ROOT / "kernels/cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_without_torch(source: Path, tmp_path: Path) -> None:
    archs = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    subprocess.run(["nvcc", "-c", *FLAGS, *archs, str(source), "-o", str(tmp_path / "k.o")], check=True)
    assert "torch" not in source.read_text()
