"""Builds the optional CPU kernel of ling_jax: the routed MoE experts as an XLA FFI target
(cpu_kernels/moe_experts.cc, OpenBLAS sgemm from scipy-openblas32, OpenMP).

Everything else is in pyproject.toml. The extension is optional: without a C++ compiler (or off
Linux) the install goes on without it and the MoE layer uses the pure-JAX "blocked" dispatch
(`cpu_kernels.moe_experts.unavailable_reason()` says why).
"""

import os
import sys

from setuptools import Extension, setup


def _kernel_extensions():
    if not sys.platform.startswith("linux"):
        return []
    try:  # build requirements (pyproject.toml [build-system]): the XLA FFI headers and OpenBLAS's cblas.h
        import jaxlib
        import scipy_openblas32
    except ImportError as err:
        print(f"ling_jax: not building the CPU MoE kernel ({err})", file=sys.stderr)
        return []
    return [
        Extension(
            "cpu_kernels._moe_experts",
            sources=["cpu_kernels/moe_experts.cc"],
            include_dirs=[
                os.path.join(os.path.dirname(jaxlib.__file__), "include"),
                scipy_openblas32.get_include_dir(),
            ],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-w"],
            extra_link_args=["-fopenmp"],
            optional=True,  # a failed build skips the kernel instead of failing the install
        )
    ]


setup(ext_modules=_kernel_extensions())
