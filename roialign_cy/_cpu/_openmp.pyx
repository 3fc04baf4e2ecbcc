"""How many threads OpenMP will really use, respecting an explicit request; and what the CPU
can execute (CPUID and XCR0, decoded by ``_variants``), since this module is built for the
baseline instruction set on every platform."""
import os

from cython.parallel cimport prange
from libc.string cimport memset

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


# GNU OpenMP's thread pool does not survive fork(): a parallel region in a forked child of a
# process that already ran one waits forever for the parent's threads. As PyTorch does, a forked
# child runs the kernels on one thread. Pools started with "spawn" or "forkserver" are not
# affected.
cdef bint _forked_child = False


def _after_fork_in_child():
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# more threads than this only costs thread creation (and can exhaust the process's limits);
# os.cpu_count() takes microseconds, so it is asked once
cdef int _max_threads = 4 * (os.cpu_count() or 1)


def effective_n_threads(n_threads=None):
    """Threads a kernel will use: ``n_threads`` if given, else OpenMP's default (OMP_NUM_THREADS or
    the number of cores); always 1 in a serial build and in a forked child (see above)."""
    if not ROIALIGN_HAVE_OPENMP or _forked_child:
        return 1
    if n_threads is None:
        return max(1, omp_get_max_threads())
    return min(int(n_threads), _max_threads)


cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #include <cpuid.h>
    #define ROIALIGN_HAVE_CPUID 1
    /* all zero for a leaf beyond the CPU's highest one */
    static void roialign_cpuid(unsigned leaf, unsigned subleaf, unsigned* r) {
        r[0] = r[1] = r[2] = r[3] = 0;
        __get_cpuid_count(leaf, subleaf, &r[0], &r[1], &r[2], &r[3]);
    }
    /* XCR0: the register states the OS saves (and so enables); 0 when the OS does not say
       (OSXSAVE clear), since xgetbv would then fault */
    static unsigned long long roialign_xcr0(void) {
        unsigned r[4], lo, hi;
        roialign_cpuid(1, 0, r);
        if (!(r[2] & (1u << 27)))
            return 0;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        return ((unsigned long long)hi << 32) | lo;
    }
    #else
    /* other architectures and compilers run the baseline kernels only */
    #define ROIALIGN_HAVE_CPUID 0
    static void roialign_cpuid(unsigned leaf, unsigned subleaf, unsigned* r) {
        r[0] = r[1] = r[2] = r[3] = 0;
    }
    static unsigned long long roialign_xcr0(void) { return 0; }
    #endif
    """
    int ROIALIGN_HAVE_CPUID
    void roialign_cpuid(unsigned leaf, unsigned subleaf, unsigned* r) noexcept nogil
    unsigned long long roialign_xcr0() noexcept nogil


def x86_cpuid(unsigned leaf, unsigned subleaf=0):
    """(eax, ebx, ecx, edx) of CPUID leaf/subleaf on x86 (zeros past the highest leaf); None
    where this build cannot ask (another architecture, MSVC)."""
    cdef unsigned r[4]
    if not ROIALIGN_HAVE_CPUID:
        return None
    roialign_cpuid(leaf, subleaf, r)
    return (r[0], r[1], r[2], r[3])


def x86_xcr0():
    """XCR0, the register states the OS enables (0 when it does not say, or off x86)."""
    return roialign_xcr0()


def touch_pages(unsigned char[::1] buf, Py_ssize_t page, int n_threads):
    """Write 0 to the first byte of every ``page`` bytes of a zero-filled buffer, each thread a
    contiguous share: the OS maps fresh pages on first touch, and touched in order by few threads
    they fault faster than touched in scattered order by a kernel's threads (which contend)."""
    cdef Py_ssize_t i, n = (buf.shape[0] + page - 1) // page
    if n == 0:
        return
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        buf[i * page] = 0


def zero_fill(unsigned char[::1] buf, int n_threads):
    """Zero a buffer, each thread a contiguous share (a reused gradient block: several threads
    fill memory faster than one)."""
    cdef Py_ssize_t n = buf.shape[0], chunk = 1 << 20
    cdef Py_ssize_t i, m = (n + chunk - 1) // chunk
    for i in prange(m, nogil=True, schedule="static", num_threads=n_threads):
        memset(&buf[i * chunk], 0, min(chunk, n - i * chunk))
