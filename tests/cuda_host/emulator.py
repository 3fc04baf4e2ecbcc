"""Host emulation of roialign_cy's CUDA kernels: the very sources of cuda/ compiled by g++.

``build(cache_dir)`` compiles every kernel instantiation that ``roialign_cy._cuda`` loads (its
``name_expressions``) into one shared library, with cuda_shim.h force-included and the fiber
scheduler of emu_runtime.h; ``Emulator.ops`` is ``roialign_cy._cuda._Ops`` on numpy arrays with a
launch function that runs the kernels there, so the launch sequences of the CUDA backend (kernel
names, argument order and types, grid sizes, tile lists) are exercised as well as the kernels.
The library is cached under ``cache_dir`` by a digest of everything that goes into it.
"""
import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess

import numpy as np

from roialign_cy import _cuda

HERE = pathlib.Path(__file__).resolve().parent
RUNTIME_FILES = ("cuda_shim.h", "cuda_fp16.h", "emu_runtime.h")
# -O1: the kernels run quickly enough, and the build stays well under a minute on 2 cores.
CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fno-fast-math", "-w")
_CTYPES = {"i4": ctypes.c_int32, "i8": ctypes.c_int64, "f4": ctypes.c_float, "f8": ctypes.c_double}


def compiler():
    return shutil.which(os.environ.get("CXX", "g++"))


def all_kernels():
    """(source, scalar, name) of every kernel the CUDA backend can launch."""
    return [(source, scalar, name)
            for source in _cuda.SOURCES.values()
            for scalar in _cuda.SCALARS.values()
            for name in _cuda.name_expressions(source, scalar)]


def dispatch_source():
    """The translation unit: the kernel sources plus a name -> kernel dispatcher."""
    lines = ['#include "emu_runtime.h"']
    lines += [f'#include "{source}"' for source in _cuda.SOURCES.values()]
    lines.append("extern \"C\" int emu_launch(const char* name, const unsigned* dims, void** args, "
                 "const char** codes, int n_args, unsigned seed) {")
    seen = set()
    for _, _, name in all_kernels():
        if name in seen:  # the tile-list kernels are in every module
            continue
        seen.add(name)
        lines.append(f'    if (!std::strcmp(name, "{name}")) '
                     f"return emu::launch(name, &{name}, dims, args, codes, n_args, seed);")
    lines.append('    emu::last_error() = std::string("unknown kernel ") + name;')
    lines.append("    return emu::ERR_UNKNOWN;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def build(cache_dir):
    """Compile (or reuse) the emulation library; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) to build the CUDA host emulation")
    src_dir = _cuda.source_dir()
    tu = dispatch_source()
    digest = hashlib.sha256(tu.encode() + " ".join(CXXFLAGS).encode())
    for path in sorted(src_dir.glob("*.cu*")) + [HERE / f for f in RUNTIME_FILES]:
        digest.update(path.name.encode() + path.read_bytes())
    cache_dir = pathlib.Path(cache_dir)
    lib = cache_dir / f"roialign_cuda_host_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tu_path = cache_dir / "dispatch.cc"
        tu_path.write_text(tu)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *CXXFLAGS, "-include", str(HERE / "cuda_shim.h"), f"-I{HERE}", f"-I{src_dir}",
               str(tu_path), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return lib


class KernelError(RuntimeError):
    pass


class Emulator:
    """Runs the CUDA backend's launch sequences on the host; ``seed`` != 0 shuffles the order in
    which blocks and threads run."""

    def __init__(self, lib_path, seed=0):
        self._lib = ctypes.CDLL(str(lib_path))
        self._lib.emu_launch.restype = ctypes.c_int
        self._lib.emu_last_error.restype = ctypes.c_char_p
        self._names = {(s, c): set(_cuda.name_expressions(s, c)) for s, c, _ in all_kernels()}
        self.seed = seed
        self.launches = []
        self.ops = _cuda._Ops(np, self.launch)

    def launch(self, source, scalar, name, grid, block, args):
        # the device loader compiles one module per (source, scalar): the name must be in it
        if name not in self._names[(source, scalar)]:
            raise KernelError(f"{name} is not compiled into the module of {source} / {scalar}")
        holders, codes = [], []
        for a in args:
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise KernelError(f"{name}: non-contiguous array argument")
                holders.append(ctypes.c_void_p(a.ctypes.data))
                codes.append("p" + a.dtype.str[1:])
            elif isinstance(a, np.generic) and a.dtype.str[1:] in _CTYPES:
                holders.append(_CTYPES[a.dtype.str[1:]](a.item()))
                codes.append(a.dtype.str[1:])
            else:  # a Python scalar would reach the device with a type CuPy picks: be explicit
                raise KernelError(f"{name}: argument {a!r} is neither an array nor a sized numpy scalar")
        dims = (ctypes.c_uint * 6)(*(tuple(grid) + (1,) * (3 - len(grid))), *(tuple(block) + (1,) * (3 - len(block))))
        ptrs = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
        code_arr = (ctypes.c_char_p * len(codes))(*(c.encode() for c in codes))
        self.launches.append((name, tuple(grid), tuple(block)))
        rc = self._lib.emu_launch(name.encode(), dims, ptrs, code_arr, len(codes), ctypes.c_uint(self.seed))
        if rc:
            raise KernelError(self._lib.emu_last_error().decode())
