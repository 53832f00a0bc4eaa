"""optax8: 8-bit optimizers for JAX, as optax ``GradientTransformation``\\ s.

Optimizer state is stored blockwise-quantized (uint8 codes plus a float32 absmax per block),
about 2 bytes per parameter for Adam instead of 8, with bitsandbytes' dynamic maps.
"""

from optax8._src import integrations as _integrations
from optax8._src.alias import (
    adagrad8bit,
    adam8bit,
    adamw8bit,
    ademamix8bit,
    lamb8bit,
    lars8bit,
    lion8bit,
    rmsprop8bit,
    sgd8bit,
)
from optax8._src.clipping import PercentileClippingState, clip_by_unorm, percentile_clipping
from optax8._src.convert import convert_state
from optax8._src.fused import FusedStep, fused
from optax8._src.integrations import export_safety_checks, register_kernels
from optax8._src.labels import default_labels
from optax8._src.native import get_implementation, set_implementation
from optax8._src.offload import offload
from optax8._src.quantization import (
    NEGATIVE_STRETCH,
    SIGNED_MAP,
    UNSIGNED_MAP,
    QuantizedArray,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    rounding_bits,
    state_bytes,
)
from optax8._src.sharding import state_sharding
from optax8._src.transform import (
    ScaleByAdam8bitState,
    ScaleByAdemamix8bitState,
    ScaleByLion8bitState,
    ScaleByRms8bitState,
    ScaleByRss8bitState,
    Trace8bitState,
    scale_by_adam8bit,
    scale_by_ademamix8bit,
    scale_by_lion8bit,
    scale_by_rms8bit,
    scale_by_rss8bit,
    trace8bit,
)

_integrations.register_serialization()  # flax.serialization's handlers, once Flax is imported
_integrations.register_export()  # jax.export's serialization of the state types

__version__ = "0.1.0"

__all__ = [
    "NEGATIVE_STRETCH",
    "SIGNED_MAP",
    "UNSIGNED_MAP",
    "FusedStep",
    "PercentileClippingState",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "ScaleByAdemamix8bitState",
    "ScaleByLion8bitState",
    "ScaleByRms8bitState",
    "ScaleByRss8bitState",
    "Trace8bitState",
    "adagrad8bit",
    "adam8bit",
    "adamw8bit",
    "clip_by_unorm",
    "convert_state",
    "ademamix8bit",
    "default_labels",
    "dequantize_blockwise",
    "dynamic_map",
    "export_safety_checks",
    "fused",
    "get_implementation",
    "lamb8bit",
    "lars8bit",
    "lion8bit",
    "offload",
    "percentile_clipping",
    "quantize_blockwise",
    "register_kernels",
    "rounding_bits",
    "rmsprop8bit",
    "scale_by_adam8bit",
    "scale_by_ademamix8bit",
    "scale_by_lion8bit",
    "scale_by_rms8bit",
    "scale_by_rss8bit",
    "set_implementation",
    "sgd8bit",
    "state_bytes",
    "state_sharding",
    "trace8bit",
]
