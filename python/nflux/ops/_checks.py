"""Argument checks shared by the native ops' Python entry points and the reference.

They run on shapes and dtypes only (never on values), so they cost nothing under
torch.compile and never synchronise with a device.
"""

from __future__ import annotations

import torch


def check_floating(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"nflux: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"nflux: {name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_like(tensor: torch.Tensor, reference: torch.Tensor, name: str, reference_name: str) -> None:
    check_floating(tensor, name)
    if tensor.dtype != reference.dtype:
        raise ValueError(
            f"nflux: {name} has dtype {tensor.dtype} but {reference_name} has dtype {reference.dtype}"
        )
    if tensor.device != reference.device:
        raise ValueError(
            f"nflux: {name} is on {tensor.device} but {reference_name} is on {reference.device}"
        )


def check_rq_spline_args(
    inputs: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    tail_bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
) -> int:
    """Validates rq_spline's arguments and returns the number of bins K."""
    check_floating(inputs, "inputs")
    named = (
        ("unnormalized_widths", widths),
        ("unnormalized_heights", heights),
        ("unnormalized_derivatives", derivatives),
    )
    for name, tensor in named:
        check_like(tensor, inputs, name, "inputs")
        if tensor.dim() != inputs.dim() + 1 or tensor.shape[:-1] != inputs.shape:
            raise ValueError(
                f"nflux: {name} must have shape [*inputs.shape, n] = [{', '.join(map(str, inputs.shape))}, n], "
                f"got {list(tensor.shape)}"
            )
    K = widths.shape[-1]
    if K < 1:
        raise ValueError(f"nflux: unnormalized_widths needs at least one bin, got K = {K}")
    if heights.shape[-1] != K:
        raise ValueError(
            f"nflux: unnormalized_heights has {heights.shape[-1]} bins but unnormalized_widths has {K}"
        )
    if derivatives.shape[-1] != K - 1:
        raise ValueError(
            f"nflux: unnormalized_derivatives must have K-1 = {K - 1} entries in its last dimension, "
            f"got {derivatives.shape[-1]}"
        )
    if not tail_bound > 0:
        raise ValueError(f"nflux: tail_bound must be positive, got {tail_bound}")
    for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
        if not (0 <= value and value * K < 1):
            raise ValueError(f"nflux: {name} * K must be in [0, 1), got {value} * {K}")
    if not min_derivative > 0:
        raise ValueError(f"nflux: min_derivative must be positive, got {min_derivative}")
    return K


SCALE_KINDS = {"exp": 1, "sigmoid": 2}


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def check_affine_coupling_args(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_logits: torch.Tensor | None,
    scale: str,
    clamp: float | None,
) -> int:
    """Validates affine_coupling's arguments and returns the schema's scale_kind int."""
    check_floating(x, "x")
    if x.dim() < 1:
        raise ValueError("nflux: x must have a batch dimension [batch, ...], got a 0-d tensor")
    named = [("shift", shift)] + ([("scale_logits", scale_logits)] if scale_logits is not None else [])
    for name, tensor in named:
        check_like(tensor, x, name, "x")
        if tensor.shape != x.shape:
            raise ValueError(f"nflux: {name} must have the shape of x {_shape(x)}, got {_shape(tensor)}")
    if scale not in SCALE_KINDS:
        raise ValueError(f"nflux: scale must be one of {sorted(SCALE_KINDS)}, got {scale!r}")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"nflux: clamp must be positive or None, got {clamp}")
    return 0 if scale_logits is None else SCALE_KINDS[scale]


def check_lu_conv1x1_args(
    x: torch.Tensor,
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
    bias: torch.Tensor | None,
) -> int:
    """Validates lu_conv1x1's arguments and returns the number of channels C."""
    check_floating(x, "x")
    if x.dim() not in (2, 4):
        raise ValueError(f"nflux: x must have shape [B, C] or [B, C, H, W], got {_shape(x)}")
    C = x.shape[1]
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64:
        got = perm.dtype if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"nflux: perm must be an int64 tensor (a permutation of range(C)), got {got}")
    if perm.device != x.device:
        raise ValueError(f"nflux: perm is on {perm.device} but x is on {x.device}")
    if perm.shape != (C,):
        raise ValueError(f"nflux: perm must have shape [{C}], got {_shape(perm)}")
    for name, tensor, shape in (
        ("lower", lower, (C, C)),
        ("upper", upper, (C, C)),
        ("log_scale", log_scale, (C,)),
        ("sign", sign, (C,)),
        ("bias", bias, (C,)),
    ):
        if tensor is None:
            continue
        check_like(tensor, x, name, "x")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"nflux: {name} must have shape {list(shape)}, got {_shape(tensor)}")
    return C
