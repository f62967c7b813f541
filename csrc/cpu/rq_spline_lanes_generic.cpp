// rq_spline CPU loops for any x86-64 / ARM CPU (baseline instruction set).
#define NFLUX_ISA_NAMESPACE generic
#include "rq_spline_lanes.inc"
