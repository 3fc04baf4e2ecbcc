"""Build the Cython kernels, with OpenMP when the compiler has it.

Metadata lives in pyproject.toml; this file only describes the extensions and ships the top-level
``cuda/`` sources inside the package as ``roialign_cy/cuda`` so that an installed wheel can compile
them at run time through CuPy.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _openmp_flags(compiler):
    """Return (compile_args, link_args) enabling OpenMP, or empty lists when it does not work.

    ROIALIGN_CY_NO_OPENMP=1 forces the serial build (used by the tests of that fallback).
    """
    if os.environ.get("ROIALIGN_CY_NO_OPENMP") == "1":
        return [], []
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    flags = ["-fopenmp"]
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
        subprocess.run([os.path.join(tmp, "probe")], check=True)
        return flags, flags
    except Exception as exc:  # any failure means: build serially
        print(f"roialign_cy: OpenMP not available ({exc!r}); building serial kernels", file=sys.stderr)
        return [], []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        compile_args, link_args = _openmp_flags(self.compiler)
        opt = [] if self.compiler.compiler_type == "msvc" else ["-O3", "-fno-math-errno"]
        for ext in self.extensions:
            ext.extra_compile_args = opt + compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()


def _extensions():
    from Cython.Build import cythonize

    names = ["_openmp", "_checks", "_roi_align", "_roi_align_rotated"]
    exts = [
        Extension(
            f"roialign_cy._cpu.{name}",
            [f"roialign_cy/_cpu/{name}.pyx"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in names
    ]
    return cythonize(
        exts,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    )


setup(
    packages=["roialign_cy", "roialign_cy._cpu", "roialign_cy.cuda"],
    package_dir={"roialign_cy": "roialign_cy", "roialign_cy.cuda": "cuda"},
    package_data={"roialign_cy.cuda": ["*.cu", "*.cuh"], "roialign_cy._cpu": ["*.pxd", "*.pyx"]},
    include_package_data=False,
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
