# The x86-64-v4 build (AVX-512) of _roi_align_rotated.pyx, which setup.py compiles with
# -march=x86-64-v4 and _variants.py imports on CPUs that run it (a build needs its own module name).
include "_roi_align_rotated.pyx"
