// Every nflux operator schema, in one place, and the nflux._C Python module (build info and one
// test switch: tensors never cross pybind11; Python reaches the ops through torch.ops.nflux).
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "lu_conv1x1.h"

#ifndef NFLUX_VERSION
#define NFLUX_VERSION "0.0.0"
#endif

TORCH_LIBRARY(nflux, m) {
  m.def(
      "rq_spline(Tensor inputs, Tensor unnormalized_widths, Tensor unnormalized_heights, "
      "Tensor unnormalized_derivatives, bool inverse, float tail_bound, float min_bin_width, "
      "float min_bin_height, float min_derivative) -> (Tensor outputs, Tensor logabsdet)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "rq_spline_backward(Tensor grad_outputs, Tensor grad_logabsdet, Tensor inputs, "
      "Tensor unnormalized_widths, Tensor unnormalized_heights, Tensor unnormalized_derivatives, "
      "bool inverse, float tail_bound, float min_bin_width, float min_bin_height, "
      "float min_derivative) -> (Tensor grad_inputs, Tensor grad_widths, Tensor grad_heights, "
      "Tensor grad_derivatives)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "affine_coupling(Tensor x, Tensor shift, Tensor? scale_logits, int scale_kind, "
      "float? clamp, bool inverse) -> (Tensor y, Tensor logabsdet)",
      {at::Tag::pt2_compliant_tag});
  // grad_shift is empty ([0]) for inverse=false: it equals grad_y, so it is neither computed
  // nor stored (grad_scale_logits is empty for the additive coupling, scale_kind 0).
  m.def(
      "affine_coupling_backward(Tensor grad_y, Tensor grad_logabsdet, Tensor x, Tensor shift, "
      "Tensor? scale_logits, int scale_kind, float? clamp, bool inverse) -> (Tensor grad_x, "
      "Tensor grad_shift, Tensor grad_scale_logits)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lu_conv1x1(Tensor x, Tensor perm, Tensor lower, Tensor upper, Tensor log_scale, "
      "Tensor sign, Tensor? bias, bool inverse, Tensor? input_shift=None, "
      "Tensor? input_log_scale=None) -> (Tensor y, Tensor logabsdet)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lu_conv1x1_backward(Tensor grad_y, Tensor grad_logabsdet, Tensor x, Tensor perm, "
      "Tensor lower, Tensor upper, Tensor log_scale, Tensor sign, Tensor? bias, bool inverse, "
      "Tensor? input_shift=None, Tensor? input_log_scale=None) -> (Tensor grad_x, "
      "Tensor grad_lower, Tensor grad_upper, Tensor grad_log_scale, Tensor grad_bias, "
      "Tensor grad_input_shift, Tensor grad_input_log_scale)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "masked_linear(Tensor input, Tensor weight, Tensor? bias, Tensor mask, int[] blocks=[]) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "masked_linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor mask, "
      "int[] blocks=[]) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // One-pass inversion of a MADE-conditioned autoregressive transform. degrees: the D input
  // degrees, then the degrees of every hidden layer's units (ints, so they are static under
  // tracing).
  m.def(
      "made_inverse(Tensor y, Tensor[] weights, Tensor[] biases, int[] degrees, "
      "Tensor[] context_terms, bool residual, str activation, str transformer, float tail_bound, "
      "float min_bin_width, float min_bin_height, float min_derivative) "
      "-> (Tensor x, Tensor logabsdet)",
      {at::Tag::pt2_compliant_tag});
  // Recomputes x from the saved inputs; grad_context_terms is empty when context_terms is.
  m.def(
      "made_inverse_backward(Tensor grad_x, Tensor grad_logabsdet, Tensor y, Tensor[] weights, "
      "Tensor[] biases, int[] degrees, Tensor[] context_terms, bool residual, str activation, "
      "str transformer, float tail_bound, float min_bin_width, float min_bin_height, "
      "float min_derivative) -> (Tensor grad_y, Tensor[] grad_weights, Tensor[] grad_biases, "
      "Tensor[] grad_context_terms)",
      {at::Tag::pt2_compliant_tag});
  // The ATen-composed implementation that serves CUDA, exposed so CPU tests cover it too.
  m.def(
      "_made_inverse_composite(Tensor y, Tensor[] weights, Tensor[] biases, int[] degrees, "
      "Tensor[] context_terms, bool residual, str activation, str transformer, float tail_bound, "
      "float min_bin_width, float min_bin_height, float min_derivative) "
      "-> (Tensor x, Tensor logabsdet)");
}

PYBIND11_MODULE(_C, module) {
  module.attr("__version__") = NFLUX_VERSION;
  module.attr("cpu_kernels") = true;
  module.def("_set_lu_host_path", &nflux::set_lu_host_path,
             "Turns lu_conv1x1's host path (CPU float/double) on or off; returns the previous "
             "setting. For tests of the ATen-composed path that CUDA takes.");
#ifdef NFLUX_WITH_CUDA
  module.attr("cuda_kernels") = true;
#else
  module.attr("cuda_kernels") = false;
#endif
}
