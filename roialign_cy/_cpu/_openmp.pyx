"""How many threads OpenMP will really use, respecting an explicit request."""
import os

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define ROIALIGN_HAVE_OPENMP 1
    #else
    /* serial fallback build: no omp.h on this compiler */
    #define ROIALIGN_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int ROIALIGN_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (False: the serial fallback build)."""
    return bool(ROIALIGN_HAVE_OPENMP)


def effective_n_threads(n_threads=None):
    """Threads a kernel will use: ``n_threads`` if given, else OpenMP's default (OMP_NUM_THREADS or
    the number of cores); always 1 in a serial build."""
    if not ROIALIGN_HAVE_OPENMP:
        return 1
    if n_threads is None:
        return max(1, omp_get_max_threads())
    # more threads than this only costs thread creation (and can exhaust the process's limits)
    return min(int(n_threads), 4 * (os.cpu_count() or 1))
