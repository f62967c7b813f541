// masked_linear: y = x (W * M)^T + b, with dL/dW masked. Composed of ATen ops, so one
// implementation serves CPU and CUDA (BLAS / cuBLAS through ATen).
//
// Dense path (no blocks): W * M is formed once per call, O(out*in) next to the O(batch*out*in)
// products; the stored weights stay free to be anything (the mask, not the storage, defines the
// network).
//
// Block path: `blocks` lists rectangles [r0, r1) x [c0, c1) of the mask (disjoint, ascending
// output-row ranges) outside which the mask is zero. A MADE whose units are sorted by degree has
// staircase masks, so a few rectangles cover them with little waste; each rectangle is one GEMM
// over only its admitted inputs, in the forward pass and in both gradients, and rows in no
// rectangle get the bias alone. W * M is formed only inside the rectangles. Only in float32 and
// float64: half types run on AMX or tensor cores, where one dense GEMM beats several narrow ones.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace nflux {
namespace {

struct MaskBlock {
  int64_t r0, r1, c0, c1;
};

std::vector<MaskBlock> parse_blocks(at::IntArrayRef blocks, int64_t out, int64_t in) {
  TORCH_CHECK(blocks.size() % 4 == 0,
              "nflux: blocks must hold [row_start, row_end, col_start, col_end] per block, got ",
              blocks.size(), " ints");
  std::vector<MaskBlock> parsed;
  int64_t previous_end = 0;
  for (size_t i = 0; i < blocks.size(); i += 4) {
    const MaskBlock b{blocks[i], blocks[i + 1], blocks[i + 2], blocks[i + 3]};
    TORCH_CHECK(previous_end <= b.r0 && b.r0 <= b.r1 && b.r1 <= out,
                "nflux: block row ranges must be ascending, disjoint and within [0, ", out,
                "], got [", b.r0, ", ", b.r1, ")");
    TORCH_CHECK(0 <= b.c0 && b.c0 <= b.c1 && b.c1 <= in,
                "nflux: block column ranges must lie within [0, ", in, "], got [", b.c0, ", ",
                b.c1, ")");
    previous_end = b.r1;
    parsed.push_back(b);
  }
  return parsed;
}

// The rectangles of `blocks`, or none (the dense path) for half types.
std::vector<MaskBlock> blocks_for(const at::Tensor& input, at::IntArrayRef blocks, int64_t out, int64_t in) {
  std::vector<MaskBlock> parsed = parse_blocks(blocks, out, in);
  if (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble) parsed.clear();
  return parsed;
}

at::Tensor masked_block(const at::Tensor& weight, const at::Tensor& mask, const MaskBlock& b) {
  return weight.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1) *
         mask.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1);
}

// Output columns [begin, end) that no block computes: the bias alone (their mask rows are zero).
void fill_uncovered(at::Tensor& y, const c10::optional<at::Tensor>& bias, int64_t begin, int64_t end) {
  if (begin >= end) return;
  at::Tensor part = y.slice(1, begin, end);
  if (bias.has_value() && bias->defined()) {
    part.copy_(bias->slice(0, begin, end).expand_as(part));
  } else {
    part.zero_();
  }
}

// The rows of `[..., n]` as one count: reshape({-1, n}) is ambiguous when n is 0 (a MADE head
// of zero parameters, as a one-bin spline's derivatives).
int64_t leading_rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

at::Tensor masked_linear(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                         at::IntArrayRef blocks) {
  check_masked_linear_args(input, weight, bias, mask);
  const int64_t out = weight.size(0), in = weight.size(1);
  const std::vector<MaskBlock> parsed = blocks_for(input, blocks, out, in);
  if (parsed.empty()) return at::linear(input, weight * mask, bias);

  const int64_t rows = leading_rows(input);
  const at::Tensor x2 = input.reshape({rows, in});
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out;
  // Allocated in its final shape: a returned view would forbid in-place use of the output.
  at::Tensor result = at::empty(shape, input.options());
  at::Tensor y = result.view({rows, out});
  const bool has_bias = bias.has_value() && bias->defined();
  int64_t covered = 0;
  for (const MaskBlock& b : parsed) {
    fill_uncovered(y, bias, covered, b.r0);
    covered = b.r1;
    if (b.c0 == b.c1) {
      fill_uncovered(y, bias, b.r0, b.r1);
      continue;
    }
    at::Tensor y_block = y.slice(1, b.r0, b.r1);
    const at::Tensor w_block = masked_block(weight, mask, b);
    const at::Tensor x_block = x2.slice(1, b.c0, b.c1);
    if (has_bias) {
      at::addmm_out(y_block, bias->slice(0, b.r0, b.r1), x_block, w_block.t());
    } else {
      at::mm_out(y_block, x_block, w_block.t());
    }
  }
  fill_uncovered(y, bias, covered, out);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mask, at::IntArrayRef blocks) {
  check_masked_linear_args(input, weight, c10::nullopt, mask);
  check_same_dtype_device(grad_output, input, "grad_output", "input");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.size(-1) == out,
              "nflux: grad_output must have shape [..., ", out, "] matching input, got ",
              grad_output.sizes());
  const std::vector<MaskBlock> parsed = blocks_for(input, blocks, out, in);
  const int64_t rows = leading_rows(input);
  const at::Tensor g2 = grad_output.reshape({rows, out});
  const at::Tensor x2 = input.reshape({rows, in});
  at::Tensor grad_bias = g2.sum(0);
  if (parsed.empty()) {
    at::Tensor grad_input = at::matmul(grad_output, weight * mask);
    at::Tensor grad_weight = at::mm(g2.t(), x2).mul_(mask);
    return {grad_input, grad_weight, grad_bias};
  }
  // W * M inside the rectangles only (the rest of w_masked is never read).
  at::Tensor w_masked = at::empty({out, in}, weight.options());
  // dL/dW: zero outside the rectangles, g^T x masked inside.
  at::Tensor grad_weight = at::zeros({out, in}, weight.options());
  std::vector<int64_t> bounds{0, in};
  for (const MaskBlock& b : parsed) {
    if (b.c0 == b.c1 || b.r0 == b.r1) continue;
    const at::Tensor mask_block = mask.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1);
    at::Tensor wm_block = w_masked.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1);
    at::mul_out(wm_block, weight.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1), mask_block);
    at::Tensor gw_block = grad_weight.slice(0, b.r0, b.r1).slice(1, b.c0, b.c1);
    at::mm_out(gw_block, g2.slice(1, b.r0, b.r1).t(), x2.slice(1, b.c0, b.c1));
    gw_block.mul_(mask_block);
    bounds.push_back(b.c0);
    bounds.push_back(b.c1);
  }
  // dL/dx by input-column segments (between rectangle edges), each written once: a segment
  // gathers the rows of every rectangle spanning it, one GEMM per contiguous run of rows (a
  // staircase has one run), so no zero fill and no accumulation passes.
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_input2 = grad_input.view({rows, in});
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    const int64_t a = bounds[s], z = bounds[s + 1];
    at::Tensor gi_segment = grad_input2.slice(1, a, z);
    bool written = false;
    size_t k = 0;
    while (k < parsed.size()) {
      const MaskBlock& first = parsed[k];
      if (first.r0 == first.r1 || !(first.c0 <= a && z <= first.c1)) {
        ++k;
        continue;
      }
      int64_t run_end = first.r1;
      size_t next = k + 1;
      while (next < parsed.size() && parsed[next].r0 == run_end && parsed[next].r0 < parsed[next].r1 &&
             parsed[next].c0 <= a && z <= parsed[next].c1) {
        run_end = parsed[next].r1;
        ++next;
      }
      const at::Tensor g_run = g2.slice(1, first.r0, run_end);
      const at::Tensor wm_run = w_masked.slice(0, first.r0, run_end).slice(1, a, z);
      if (written) {
        gi_segment.addmm_(g_run, wm_run);
      } else {
        at::mm_out(gi_segment, g_run, wm_run);
        written = true;
      }
      k = next;
    }
    if (!written) gi_segment.zero_();
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

#ifdef NFLUX_WITH_CUDA
TORCH_LIBRARY_IMPL(nflux, CUDA, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}
#endif

}  // namespace nflux
