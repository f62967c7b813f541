"""The installation runs on the native extension, and the op is registered as documented."""

from __future__ import annotations

import os

import pytest
import torch

import nflux

BUILD_INFO_KEYS = {
    "version",
    "torch",
    "extension_loaded",
    "extension_error",
    "cpu_kernels",
    "cuda_kernels",
    "cuda_available",
}


def _require_extension() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("NFLUX_REQUIRE_EXTENSION", "") not in ("", "0")


def test_build_info_keys_and_types():
    info = nflux.build_info()
    assert set(info) == BUILD_INFO_KEYS
    assert info["version"] == nflux.__version__
    assert info["torch"] == torch.__version__
    for key in ("extension_loaded", "cpu_kernels", "cuda_kernels", "cuda_available"):
        assert isinstance(info[key], bool), key
    assert info["cuda_available"] == torch.cuda.is_available()
    # A loaded extension has no load error; a missing one says why.
    assert (info["extension_error"] is None) == info["extension_loaded"]
    if not info["extension_loaded"]:
        assert not info["cpu_kernels"] and not info["cuda_kernels"]


@pytest.mark.skipif(not _require_extension(), reason="set CI or NFLUX_REQUIRE_EXTENSION=1 to require the build")
def test_ci_runs_on_the_native_extension():
    # CI must never pass silently on the pure-torch fallback.
    info = nflux.build_info()
    assert info["extension_loaded"], f"nflux extension failed to load: {info['extension_error']}"
    assert info["cpu_kernels"], info


def test_op_registered_and_pt2_compliant():
    if not nflux.build_info()["extension_loaded"]:
        pytest.skip("extension not loaded (the fallback is covered by test_fallback_without_extension)")
    for name in ("rq_spline", "rq_spline_backward"):
        assert hasattr(torch.ops.nflux, name), name
        op = getattr(torch.ops.nflux, name).default
        assert torch.Tag.pt2_compliant_tag in op.tags, (name, op.tags)
    schema = torch.ops.nflux.rq_spline.default._schema
    assert [a.name for a in schema.arguments] == [
        "inputs",
        "unnormalized_widths",
        "unnormalized_heights",
        "unnormalized_derivatives",
        "inverse",
        "tail_bound",
        "min_bin_width",
        "min_bin_height",
        "min_derivative",
    ]
    assert [r.name for r in schema.returns] == ["outputs", "logabsdet"]
    assert not schema.is_mutable
    # The CPU kernel is what serves CPU tensors, not a fallback.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nflux::rq_spline", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nflux::rq_spline_backward", "CPU")
