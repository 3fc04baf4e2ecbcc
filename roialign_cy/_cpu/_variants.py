"""Which build of the CPU kernels runs: the instruction set is chosen at import.

On x86-64 (GCC or Clang) the wheel carries the kernel modules twice: ``baseline`` (the SSE2
every x86-64 CPU has) and ``x86-64-v3`` (AVX2; compiled with ``-march=x86-64-v3``; AVX-512 was
measured no faster, see benchmarks/results/2026-11-29-cpu-2core-simd.txt). Elsewhere, and where the compiler lacks those levels,
only the baseline is built (setup.py). The import takes the highest level that is built and that the CPU
and the OS both support (CPUID bits and the register states the OS saves, XCR0), unless
``ROIALIGN_CY_SIMD`` names one: ``baseline`` (or another built level) is then used, or refused
with a RuntimeError when this CPU cannot run it or it was not built.

Variants are compiled without FMA contraction, so they compute the baseline's bits with wider
vectors: which one runs changes the speed only (README, "Instruction sets").
"""
import importlib
import importlib.util
import os

from . import _openmp

ENV = "ROIALIGN_CY_SIMD"
# highest first; the module suffix each build's kernels carry (setup.py builds the same list)
VARIANTS = ("x86-64-v3", "baseline")
SUFFIX = {"baseline": "", "x86-64-v3": "_x86_64_v3"}
KERNELS = ("_roi_align", "_roi_align_rotated", "_roi_pool")

# CPUID bits of the x86-64 psABI levels: feature -> (leaf, register 0..3 = eax..edx, bit); the
# names are Linux's /proc/cpuinfo flags
_CPUID = {
    # x86-64-v2
    "pni": (1, 2, 0), "ssse3": (1, 2, 9), "cx16": (1, 2, 13), "sse4_1": (1, 2, 19),
    "sse4_2": (1, 2, 20), "popcnt": (1, 2, 23), "lahf_lm": (0x80000001, 2, 0),
    # x86-64-v3
    "fma": (1, 2, 12), "movbe": (1, 2, 22), "xsave": (1, 2, 26), "avx": (1, 2, 28),
    "f16c": (1, 2, 29), "bmi1": (7, 1, 3), "avx2": (7, 1, 5), "bmi2": (7, 1, 8),
    "abm": (0x80000001, 2, 5),  # LZCNT
}
_LEVEL_FEATURES = {
    "x86-64-v3": ("pni", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "lahf_lm", "fma", "movbe",
                  "xsave", "avx", "f16c", "bmi1", "avx2", "bmi2", "abm"),
}
# XCR0 bits the OS must set for the level's registers to survive a context switch: SSE and AVX
# state (bits 1, 2)
_LEVEL_XCR0 = {"x86-64-v3": 0x06}

# what each variant's compiler flags add (for `roialign-cy info`)
ISA = {"baseline": "SSE2", "x86-64-v3": "AVX2"}

# the variant in use, once kernels() ran
active = None


def cpu_features():
    """The CPUID flags of the psABI levels that this CPU reports, or None off x86 (or MSVC)."""
    if _openmp.x86_cpuid(0) is None:
        return None
    leaves = {}
    found = set()
    for name, (leaf, reg, bit) in _CPUID.items():
        if leaf not in leaves:
            leaves[leaf] = _openmp.x86_cpuid(leaf)
        if leaves[leaf][reg] >> bit & 1:
            found.add(name)
    return found


def missing(variant):
    """What this machine lacks to run ``variant``: CPU flags, or "OS support for ..." (empty
    when it can run it)."""
    if variant == "baseline":
        return []
    features = cpu_features()
    if features is None:
        return ["an x86-64 CPU"]
    lack = [f for f in _LEVEL_FEATURES[variant] if f not in features]
    need = _LEVEL_XCR0[variant]
    if not lack and _openmp.x86_xcr0() & need != need:
        lack.append(f"OS support for its registers (XCR0 {_openmp.x86_xcr0():#x}, needs {need:#x})")
    return lack


def built():
    """The variants whose kernel modules are present, highest first."""
    return [v for v in VARIANTS if all(importlib.util.find_spec(f"{__package__}.{k}{SUFFIX[v]}")
                                       for k in KERNELS)]


def runnable():
    """The built variants this machine can run, highest first."""
    return [v for v in built() if not missing(v)]


def modules(variant):
    """The kernel modules (_roi_align, _roi_align_rotated, _roi_pool) of ``variant``."""
    return tuple(importlib.import_module(f"{__package__}.{k}{SUFFIX[variant]}") for k in KERNELS)


def choose(requested=None):
    """The variant to use: ``requested`` (default: $ROIALIGN_CY_SIMD), or the highest runnable.
    RuntimeError for a request that names no variant, was not built, or this CPU cannot run."""
    if requested is None:
        requested = os.environ.get(ENV, "")
    requested = requested.strip().lower()
    if requested in ("", "auto"):
        return (runnable() or ["baseline"])[0]
    if requested not in VARIANTS:
        raise RuntimeError(f"{ENV}={requested!r} names no instruction-set variant; use one of "
                           f"{', '.join(VARIANTS)} (or 'auto', the default)")
    if requested not in built():
        raise RuntimeError(f"{ENV}={requested!r}: this installation has no {requested} build of "
                           f"the CPU kernels (built: {', '.join(built()) or 'none'})")
    lack = missing(requested)
    if lack:
        raise RuntimeError(f"{ENV}={requested!r}: this machine cannot run the {requested} kernels "
                           f"(it lacks {', '.join(lack)}); it can run: {', '.join(runnable())}")
    return requested


def kernels():
    """Import and return the kernel modules of the chosen variant (``choose``)."""
    global active
    variant = choose()
    mods = modules(variant)  # ImportError when the extension is not built at all
    active = variant
    return mods


def describe():
    """Lines for ``roialign-cy info``: the variant in use and why, and the alternatives."""
    forced = os.environ.get(ENV, "").strip().lower() not in ("", "auto")
    why = f"chosen by {ENV}" if forced else f"the highest this machine runs ({ENV} overrides)"
    return [f"instruction set: {active} ({ISA[active]}), {why}",
            f"built: {', '.join(built())}; this machine runs: {', '.join(runnable())}"]
