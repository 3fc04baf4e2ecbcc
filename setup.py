"""Build the Cython kernels, with OpenMP when the compiler has it.

Metadata lives in pyproject.toml; this file only describes the extensions and ships the top-level
``cuda/`` sources inside the package as ``roialign_cy/cuda`` so that an installed wheel can compile
them at run time through CuPy.

On x86-64 the kernel modules are also built for the x86-64-v3 (AVX2, FMA) instruction set, from
the one-line ``*_x86_64_v3.pyx`` shims that include the kernel sources; ``roialign_cy._cpu._variants`` picks one at import. A compiler that
cannot target a level (MSVC, another architecture, an old GCC or Clang) builds the baseline only,
as does ROIALIGN_CY_BASELINE_ONLY=1.
"""
import os
import platform
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


# instruction-set variants of the kernel modules: module suffix -> compiler flags (the names and
# suffixes of roialign_cy/_cpu/_variants.py). No FMA contraction: fusing a * b + c rounds once
# instead of twice, and the variants would then differ from the baseline (and from one another
# where the compiler fuses differently) in the last bits; without it every variant computes the
# baseline's bits, wider vectors doing the same operations.
KERNELS = ["_roi_align", "_roi_align_rotated", "_roi_pool"]
# (x86-64-v4, AVX-512, measured no faster than v3 here and cost 40 s of CPU per build: not built)
VARIANT_FLAGS = {"_x86_64_v3": ["-march=x86-64-v3", "-ffp-contract=off"]}


def _variants_wanted():
    """Whether to build the x86-64 variants at all: on an x86-64 machine, unless told not to."""
    return (os.environ.get("ROIALIGN_CY_BASELINE_ONLY") != "1"
            and platform.machine().lower() in ("x86_64", "amd64"))


def _compiles_with(compiler, flags):
    """Whether the compiler builds a C file with these flags (e.g. knows -march=x86-64-v3)."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("int roialign_probe(int x) { return x + 1; }\n")
        compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # pip builds: compile the extensions side by side
            self.parallel = True

    def build_extensions(self):
        compile_args, link_args = _openmp_flags(self.compiler)
        opt = [] if self.compiler.compiler_type == "msvc" else ["-O3", "-fno-math-errno"]
        kept = []
        for ext in self.extensions:
            isa = next((f for s, f in VARIANT_FLAGS.items() if ext.name.endswith(s)), [])
            if isa and (self.compiler.compiler_type == "msvc"
                        or not _compiles_with(self.compiler, isa)):
                print(f"roialign_cy: the compiler cannot target {isa}; not building {ext.name}",
                      file=sys.stderr)
                continue
            ext.extra_compile_args = opt + isa + compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


def _extensions():
    from Cython.Build import cythonize

    suffixes = [""] + (list(VARIANT_FLAGS) if _variants_wanted() else [])
    names = ["_openmp", "_checks"] + [k + s for s in suffixes for k in KERNELS]
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
    package_data={"roialign_cy": ["py.typed"], "roialign_cy.cuda": ["*.cu", "*.cuh"],
                  "roialign_cy._cpu": ["*.pxd", "*.pyx"]},
    include_package_data=False,
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
