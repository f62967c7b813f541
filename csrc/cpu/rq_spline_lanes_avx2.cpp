// rq_spline CPU loops compiled with -mavx2 -mfma (CMake sets the flags for this file only);
// used when the CPU reports both at run time.
#define NFLUX_ISA_NAMESPACE avx2
#include "rq_spline_lanes.inc"
