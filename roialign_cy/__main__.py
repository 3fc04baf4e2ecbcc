"""Command line: ``python -m roialign_cy {demo,info,bench}`` (also installed as ``roialign-cy``).

demo   pool a few boxes of a built-in synthetic picture, print timings, write a PNG figure
info   version, OpenMP threads, the CPU kernels' instruction set, which backends work here, where
       the CUDA sources are
bench  the side-by-side benchmark of a source checkout (benchmarks/bench.py, extra arguments are
       passed on), or a short built-in timing of the forward when run from an installed package
"""
import argparse
import importlib.util
import os
import sys
import time

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _version():
    import roialign_cy

    v = getattr(roialign_cy, "__version__", None)
    if v:
        return v
    try:
        from importlib.metadata import version

        return version("roialign_cy")
    except Exception:  # a checkout that was never installed
        return "unknown (not installed)"


def _cuda_sources():
    """(folder, file names) of the CUDA sources the cuda backend compiles, or (None, why not)."""
    try:
        from roialign_cy import _cuda

        d = _cuda.source_dir()
    except Exception as exc:  # FileNotFoundError when neither a wheel's nor a checkout's is there
        return None, str(exc)
    return d, sorted(f for f in os.listdir(d) if f.endswith((".cu", ".cuh")))


def cmd_info(args):
    import numpy as np

    from roialign_cy import _demo

    print(f"roialign_cy {_version()}  ({_PACKAGE_DIR})")
    print(f"Python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPU cores")
    status = _demo.available_backends()
    if status["cpu"] is None:
        from roialign_cy import _cpu

        if _cpu.openmp_enabled():
            omp = f"OpenMP, {_cpu.effective_n_threads()} threads by default (n_threads=... or OMP_NUM_THREADS)"
        else:
            omp = "serial build (compiled without OpenMP): 1 thread"
        print(f"backend cpu:  available, {omp}")
        for line in _cpu._variants.describe():
            print(f"              {line}")
    else:
        print(f"backend cpu:  NOT available: {status['cpu']}")
    if status["cuda"] is None:
        import cupy

        dev = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        print(f"backend cuda: available, cupy {cupy.__version__}, device {dev.id}: {name}")
    else:
        print(f"backend cuda: not available: {status['cuda']}")
    import roialign_cy

    cache = roialign_cy.output_cache()
    print(f"output cache: up to {cache['max_bytes'] / 2**20:.0f} MiB of idle blocks kept for reuse "
          f"(ROIALIGN_CY_CACHE_BYTES, roialign_cy.set_output_cache), {cache['idle_blocks']} held now")
    d, files = _cuda_sources()
    print(f"CUDA sources: {d} ({', '.join(files)})" if d else f"CUDA sources: not found: {files}")
    ops = [n for op in roialign_cy.OPERATORS for n in (op, roialign_cy.gradient_of(op))
           if hasattr(roialign_cy, n)]
    print(f"operators: {', '.join(ops) if ops else 'none yet'}")
    return 0


def cmd_demo(args):
    from roialign_cy import _demo

    return _demo.run(out=args.out, backend=args.backend, renderer=args.renderer)


def _checkout_bench():
    path = os.path.join(os.path.dirname(_PACKAGE_DIR), "benchmarks", "bench.py")
    return path if os.path.isfile(path) else None


def _builtin_bench(n_threads_list):
    """Forward of a detector box head (2000 boxes, 7x7, sampling_ratio 2) at each thread count."""
    import numpy as np

    import roialign_cy

    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 256, 200, 304), dtype=np.float32)
    k = 2000
    wh = np.exp(rng.uniform(np.log(8), np.log(400), (k, 2)))
    c = rng.uniform((0, 0), (1216, 800), (k, 2))
    boxes = np.concatenate([np.sort(rng.integers(0, 2, (k, 1)), axis=0), c - wh / 2, c + wh / 2], axis=1)
    boxes = boxes.astype(np.float32)
    print("no benchmarks/bench.py next to this package (it lives in the source checkout); "
          "built-in timing of roi_align only:")
    print(f"features {features.shape} float32, {k} boxes, 7x7, sampling_ratio 2, spatial_scale 0.25, aligned")
    for t in n_threads_list:
        def call():
            return roialign_cy.roi_align(features, boxes, (7, 7), 0.25, 2, True, n_threads=t)

        call()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(f"  threads {t}: median {1e3 * float(np.median(times)):.2f} ms per call")
    return 0


def cmd_bench(args, extra):
    path = _checkout_bench()
    if path is None:
        return _builtin_bench(sorted({1, os.cpu_count() or 1}))
    spec = importlib.util.spec_from_file_location("roialign_cy_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(extra, prog="python -m roialign_cy bench")


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m roialign_cy", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{demo,info,bench}")
    sub.required = True
    d = sub.add_parser("demo", help="pool boxes of a synthetic picture and draw them")
    d.add_argument("--out", default="roialign_demo.png", help="PNG to write (default: %(default)s)")
    d.add_argument("--backend", choices=("all", "cpu", "cuda"), default="all",
                   help="backends to run and time (default: every available one)")
    d.add_argument("--renderer", choices=("auto", "matplotlib", "raster"), default="auto",
                   help="auto: matplotlib when installed, else the built-in rasteriser")
    sub.add_parser("info", help="version, threads, backends, CUDA source location")
    sub.add_parser("bench", help="benchmark against the peers; other arguments go to benchmarks/bench.py",
                   add_help=False)
    return ap


def main(argv=None):
    """Entry point of ``python -m roialign_cy`` and the ``roialign-cy`` console script."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"demo": cmd_demo, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
