# The x86-64-v3 build (AVX2, FMA) of _roi_pool.pyx, which setup.py compiles with
# -march=x86-64-v3 and _variants.py imports on CPUs that run it (a build needs its own module name).
include "_roi_pool.pyx"
