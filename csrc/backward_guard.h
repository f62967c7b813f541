// The dispatch mode of a native backward op called from a C++ autograd backward.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>

#include <optional>

namespace nflux {

// Grad mode is on inside a backward only under create_graph=True. Then the *_backward op must go
// through its own autograd (python/nflux/ops/_double_backward.py) so that the gradient can be
// differentiated again; otherwise it runs below autograd, so an ordinary backward never reaches
// Python.
class BackwardOpGuard {
 public:
  BackwardOpGuard() {
    if (!c10::GradMode::is_enabled()) below_autograd_.emplace();
  }

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd_;
};

}  // namespace nflux
