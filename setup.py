"""Builds the CPU codec extension (kernels/) with the CPython C API: no torch or pybind11 at build time.

CUDA kernels are not built here: `make gpu-check` builds them with nvcc on GPU machines (STYLE §6).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cachegen.codec._cpu",
            sources=["kernels/bindings.cpp", "kernels/cpu/codec_cpu.cpp", "kernels/cpu/transform_cpu.cpp"],
            include_dirs=["kernels/include", "kernels"],
            extra_compile_args=["-O3", "-std=c++17", "-fno-fast-math", "-ffp-contract=off"],
            language="c++",
        )
    ],
)
