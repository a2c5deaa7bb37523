"""The public face of cogview's kernels.

Every op here dispatches to a hand-written C++/CUDA kernel when one is registered for the
input's device, and otherwise computes through its plain-PyTorch twin in
`cogview.ops.reference` (correct, slower). `python -m cogview.info` shows which runs where.
"""
from cogview.ops._registry import KERNELS, cpu_isa, force_reference, has_kernel, use_cpu_isa, usable_cpu_isas
from cogview.ops.decoding import (
    SANDWICH_LAYER_PARAMS,
    bind_sandwich_decode_step,
    decode_attention,
    kv_cache_write,
    pack_projection_weights,
    sandwich_decode_step,
)
from cogview.ops.activation import gelu_tanh
from cogview.ops.layer_norm import add_layer_norm, layer_norm
from cogview.ops.linear import linear, linear_activations, pack_linear_weight, tile_linear_available
from cogview.ops.local_attention import (
    local_attention,
    local_attention_bf16_dot,
    local_attention_bf16_dot_available,
)
from cogview.ops.sampling import sample_tokens

__all__ = [
    "layer_norm",
    "add_layer_norm",
    "gelu_tanh",
    "linear",
    "linear_activations",
    "pack_linear_weight",
    "tile_linear_available",
    "kv_cache_write",
    "decode_attention",
    "sandwich_decode_step",
    "bind_sandwich_decode_step",
    "pack_projection_weights",
    "SANDWICH_LAYER_PARAMS",
    "sample_tokens",
    "local_attention",
    "local_attention_bf16_dot_available",
    "local_attention_bf16_dot",
    "KERNELS",
    "has_kernel",
    "force_reference",
    "cpu_isa",
    "usable_cpu_isas",
    "use_cpu_isa",
]
