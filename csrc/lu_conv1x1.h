// lu_conv1x1: the switch between the host path for the [C, C] parameter work (CPU float and
// double) and the ATen-composed path that serves every other device and dtype.
#pragma once

namespace nflux {

// Turns the host path on or off and returns the previous setting. Only tests turn it off, so
// that the CPU runs (and checks) the path CUDA takes.
bool set_lu_host_path(bool enabled);

}  // namespace nflux
