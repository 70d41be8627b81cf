"""FLOP handles for the operators fvcore leaves out but that do real work.

Each handle maps an operator's ``(inputs, outputs)`` to FLOPs in fvcore's convention (one fused
multiply-add = one FLOP): fused attention, pooling and reductions, LSTMs, convolutions with
string padding, RMSNorm, bicubic and linear interpolation. `flops_report` adds `FLOP_HANDLES` to
fvcore's defaults; a user extends it, or passes ``handles=``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["FLOP_HANDLES"]


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape  # lazy: importing fvcore.nn runs torch.jit.script, which warns on import

    shape = get_shape(value)
    if shape is None:
        raise ValueError("an input of the operator has no known shape")
    return shape


def _attention_flops(inputs, outputs) -> int:
    """``softmax(q k^T) v``: the two matmuls, ``(..., L, d) x (..., S, d)`` then ``(..., L, S) x (..., S, dv)``."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _input_flops(inputs, outputs) -> int:
    """Reductions (``mean``, ``sum``, norms, adaptive pooling): one FLOP per input element, as fvcore counts adaptive average pooling."""
    return math.prod(_shape(inputs[0]))


def _ints(value) -> list[int]:
    """A traced int-list argument: a constant, or a list built from constants."""
    node = value.node()
    items = [v.toIValue() for v in node.inputs()] if node.kind() == "prim::ListConstruct" else value.toIValue()
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if not all(isinstance(v, int) for v in items):
        raise ValueError(f"the kernel size is not a constant: {items}")
    return items


def _window_flops(inputs, outputs) -> int:
    """Windowed pooling: one FLOP per element of every window (output elements x kernel area).

    The traced kernel already has one entry per pooled dimension (the functional API expands an
    int before the operator sees it), whether or not the input has a batch dimension.
    """
    return math.prod(_shape(outputs[0])) * math.prod(_ints(inputs[1]))


def _fused_mha_flops(inputs, outputs) -> int:
    """``nn.MultiheadAttention``'s inference fast path (batch first): q, k, v and output projections, and attention."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    rows_q, rows_kv, dim = math.prod(q[:-1]), math.prod(k[:-1]), q[-1]
    return 2 * rows_q * dim * dim + 2 * rows_kv * dim * dim + 2 * rows_q * k[-2] * dim


def _conv_mode_flops(inputs, outputs) -> int:
    """A convolution with string padding (``padding="same"``): output elements x (C_in / groups) x kernel area."""
    return math.prod(_shape(outputs[0])) * math.prod(_shape(inputs[1])[1:])


def _lstm_flops(inputs, outputs) -> int:
    """``nn.LSTM``: every weight matrix (all gates, layers, directions) multiplies one vector per sample and time step.

    ``aten::lstm`` takes ``(input, hx, weights, ...)``; over a packed sequence ``(data, batch_sizes,
    hx, weights, ...)``, whose data rows are the time steps of all sequences.
    """
    packed = inputs[1].type().kind() == "TensorType"
    weights = inputs[3 if packed else 2].node()
    if weights.kind() != "prim::ListConstruct":
        raise ValueError("the LSTM's weights are not a list the trace can read")
    shapes = [_shape(w) for w in weights.inputs()]
    return math.prod(_shape(inputs[0])[:-1]) * sum(math.prod(s) for s in shapes if len(s) == 2)


def _per_output(scale: int) -> Callable:
    """Interpolation: `scale` FLOPs per output element (the points each output mixes), as fvcore counts bilinear."""
    return lambda inputs, outputs: scale * math.prod(_shape(outputs[0]))


def _rms_norm_flops(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import norm_flop_counter  # lazy: as above

    return norm_flop_counter(2)(inputs, outputs)


#: Handles added to fvcore's defaults (name -> ``(inputs, outputs) -> FLOPs``). Extend it, or pass
#: ``handles=`` to `flops_report`; a handle of ``None`` leaves that operator uncounted.
FLOP_HANDLES: dict[str, Callable | None] = {
    "aten::scaled_dot_product_attention": _attention_flops,
    "aten::_native_multi_head_attention": _fused_mha_flops,
    "aten::_convolution_mode": _conv_mode_flops,
    "aten::lstm": _lstm_flops,
    "aten::rms_norm": _rms_norm_flops,
    "aten::upsample_bicubic2d": _per_output(16),
    "aten::upsample_linear1d": _per_output(2),
    "aten::upsample_trilinear3d": _per_output(8),
    "aten::mean": _input_flops,
    "aten::sum": _input_flops,
    "aten::amax": _input_flops,
    "aten::linalg_vector_norm": _input_flops,
    "aten::adaptive_max_pool1d": _input_flops,
    "aten::adaptive_max_pool2d": _input_flops,
    "aten::adaptive_avg_pool1d": _input_flops,
    "aten::adaptive_avg_pool3d": _input_flops,
    "aten::max_pool1d": _window_flops,
    "aten::max_pool2d": _window_flops,
    "aten::max_pool3d": _window_flops,
    "aten::avg_pool1d": _window_flops,
    "aten::avg_pool2d": _window_flops,
    "aten::avg_pool3d": _window_flops,
}
