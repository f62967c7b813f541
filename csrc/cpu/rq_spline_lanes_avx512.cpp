// rq_spline CPU loops compiled for AVX-512 (F, DQ, BW, VL) with 512-bit vectors: one register
// holds all 16 float lanes. CMake sets the flags for this file only; picked at run time.
#define NFLUX_ISA_NAMESPACE avx512
#include "rq_spline_lanes.inc"
