"""Argument checks shared by the native ops' Python entry points and the reference.

They run on shapes and dtypes only (never on values), so they cost nothing under
torch.compile and never synchronise with a device.
"""

from __future__ import annotations

import math

import torch


def check_floating(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"nflux: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"nflux: {name} must be a floating-point tensor, got dtype {tensor.dtype}")


# Built once: torch.finfo per call costs microseconds, and an lru_cache makes torch.compile
# warn on every compile.
_COMPUTE_FINFO = {torch.float64: torch.finfo(torch.float64), torch.float32: torch.finfo(torch.float32)}


def compute_finfo(dtype: torch.dtype) -> torch.finfo:
    """The range and precision the native kernels compute in for `dtype`: float64 for float64,
    float32 for every narrower type."""
    return _COMPUTE_FINFO[torch.float64 if dtype == torch.float64 else torch.float32]


def check_like(
    tensor: torch.Tensor, reference: torch.Tensor, name: str, reference_name: str, same_dtype: bool = True
) -> None:
    check_floating(tensor, name)
    if same_dtype and tensor.dtype != reference.dtype:
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
    if not 0 < tail_bound < math.inf:
        raise ValueError(f"nflux: tail_bound must be positive and finite, got {tail_bound}")
    # A zero minimum lets a bin collapse to zero width or height: a 0/0 slope inside it. So does
    # one below the arithmetic's resolution: its knot rounds onto the neighbour next to
    # +-tail_bound (a bin of 2 * tail_bound * value must span a few units in the last place),
    # and the knots' running sum carries up to ~K/2 units of rounding into the last bin.
    finfo = compute_finfo(inputs.dtype)
    smallest_bin = (K + 2) * finfo.eps
    for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
        if not (0 < value and value * K < 1):
            raise ValueError(f"nflux: {name} * K must be in (0, 1), got {value} * {K}")
        if value < smallest_bin:
            raise ValueError(f"nflux: {name} = {value} is below what {finfo.dtype} arithmetic resolves with K = {K} "
                             f"bins (at least (K + 2) * eps = {smallest_bin:.3g}); use float64 inputs for smaller bins")
    if not 0 < min_derivative < math.inf:
        raise ValueError(f"nflux: min_derivative must be positive and finite, got {min_derivative}")
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
    # clamp * tanh(s / clamp) needs clamp and 1 / clamp finite in the kernels' arithmetic.
    if clamp is not None:
        finfo = compute_finfo(x.dtype)
        if not finfo.tiny <= clamp <= finfo.max:
            raise ValueError(f"nflux: clamp must be positive and finite, with 1 / clamp finite in {finfo.dtype}, "
                             f"or None, got {clamp}")
    return 0 if scale_logits is None else SCALE_KINDS[scale]


def check_lu_conv1x1_args(
    x: torch.Tensor,
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
    bias: torch.Tensor | None,
    input_shift: torch.Tensor | None = None,
    input_log_scale: torch.Tensor | None = None,
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
        ("input_shift", input_shift, (C,)),
        ("input_log_scale", input_log_scale, (C,)),
    ):
        if tensor is None:
            continue
        check_like(tensor, x, name, "x")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"nflux: {name} must have shape {list(shape)}, got {_shape(tensor)}")
    return C


def check_masked_linear_args(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor, same_dtype: bool = True
) -> None:
    """Validates masked_linear's arguments: input [..., I], weight and mask [O, I], bias [O]
    (of one dtype, unless `same_dtype=False`: autocast then casts them)."""
    check_floating(input, "input")
    check_like(weight, input, "weight", "input", same_dtype)
    check_like(mask, input, "mask", "input", same_dtype)
    if weight.dim() != 2:
        raise ValueError(f"nflux: weight must have shape [out, in], got {list(weight.shape)}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"nflux: mask must have the shape of weight {list(weight.shape)}, got {list(mask.shape)}"
        )
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"nflux: input must have shape [..., {weight.shape[1]}], got {list(input.shape)}")
    if bias is not None:
        check_like(bias, input, "bias", "input", same_dtype)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"nflux: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


def check_masked_linear_blocks(blocks: list[int], weight: torch.Tensor) -> None:
    """Validates masked_linear's blocks: [r0, r1, c0, c1] per rectangle, row ranges ascending
    and disjoint, everything within weight's shape (the mask itself is not read: no sync)."""
    out, in_ = weight.shape
    if len(blocks) % 4:
        raise ValueError(f"nflux: blocks must hold [row_start, row_end, col_start, col_end] per block, got {len(blocks)} ints")
    previous_end = 0
    for k in range(0, len(blocks), 4):
        r0, r1, c0, c1 = blocks[k : k + 4]
        if not previous_end <= r0 <= r1 <= out:
            raise ValueError(f"nflux: block row ranges must be ascending, disjoint and within [0, {out}], got [{r0}, {r1})")
        if not 0 <= c0 <= c1 <= in_:
            raise ValueError(f"nflux: block column ranges must lie within [0, {in_}], got [{c0}, {c1})")
        previous_end = r1


ACTIVATIONS = ("relu", "elu", "tanh", "gelu")
TRANSFORMERS = ("affine", "rq_spline")


def check_made_inverse_args(
    y: torch.Tensor,
    weights: list,
    biases: list,
    degrees: list,
    context_terms: list,
    residual: bool,
    activation: str,
    transformer: str,
) -> int:
    """Validates made_inverse's arguments (shapes and static ints only); returns params per feature."""
    check_floating(y, "y")
    if y.dim() != 2:
        raise ValueError(f"nflux: y must have shape [batch, features], got {list(y.shape)}")
    B, D = y.shape
    n = len(weights)
    if n < 2:
        raise ValueError(f"nflux: weights needs at least one hidden layer and the output layer, got {n} matrices")
    if len(biases) != n:
        raise ValueError(f"nflux: biases must have one entry per weight ({n}), got {len(biases)}")
    if residual and (n % 2 or n < 4):
        raise ValueError(
            f"nflux: a residual MADE has weights [initial, (2 per block)..., output], an even number >= 4, got {n}"
        )
    if context_terms and len(context_terms) != n - 1:
        raise ValueError(
            f"nflux: context_terms must be empty or have one entry per hidden layer ({n - 1}), got {len(context_terms)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"nflux: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if transformer not in TRANSFORMERS:
        raise ValueError(f"nflux: transformer must be 'affine' or 'rq_spline', got {transformer!r}")
    fan_in = D
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_like(w, y, f"weights[{i}]", "y")
        check_like(b, y, f"biases[{i}]", "y")
        if w.dim() != 2 or w.shape[1] != fan_in:
            raise ValueError(f"nflux: weights[{i}] must have shape [out, {fan_in}], got {list(w.shape)}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"nflux: biases[{i}] must have shape [{w.shape[0]}], got {list(b.shape)}")
        if context_terms and i < n - 1:
            c = context_terms[i]
            check_like(c, y, f"context_terms[{i}]", "y")
            if c.shape != (B, w.shape[0]):
                raise ValueError(
                    f"nflux: context_terms[{i}] must have shape [{B}, {w.shape[0]}], got {list(c.shape)}"
                )
        fan_in = w.shape[0]
    if D < 1 or fan_in % D:
        raise ValueError(f"nflux: the output layer must have features * params rows, got {fan_in} for {D} features")
    P = fan_in // D
    if transformer == "affine" and P != 2:
        raise ValueError(f"nflux: the affine transformer needs 2 params per feature (shift, log_scale), got {P}")
    if transformer == "rq_spline" and (P < 2 or (P + 1) % 3):
        raise ValueError(f"nflux: the rq_spline transformer needs 3K-1 params per feature, got {P}")
    total = D + sum(w.shape[0] for w in weights[:-1])
    if len(degrees) != total:
        raise ValueError(
            f"nflux: degrees must hold the {D} input degrees and then every hidden unit's degree "
            f"({total} in all), got {len(degrees)}"
        )
    if sorted(degrees[:D]) != list(range(1, D + 1)):
        raise ValueError(f"nflux: the input degrees must be a permutation of 1..{D}, got {list(degrees[:D])}")
    if any(k < 0 for k in degrees[D:]):
        raise ValueError("nflux: hidden degrees must be >= 0")
    if residual:
        H = weights[0].shape[0]
        first = list(degrees[D : D + H])
        for i in range(1, n - 1):
            start = D + H * i
            if weights[i].shape[0] != H or list(degrees[start : start + H]) != first:
                raise ValueError("nflux: a residual MADE needs the same degrees in every hidden layer")
    return P
