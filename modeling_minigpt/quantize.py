"""Fast int8 inference on a CPU, opt-in: `quantize_int8(model)` swaps every linear layer for an int8 one.

A decoding step at batch 1 is a chain of matrix-vector products: it reads every weight once and
does two FLOPs per weight, so its speed is the speed at which weights come out of memory. int8
weights are a quarter of fp32's bytes. Measured here (AMD EPYC, AVX-512 VNNI, 1 thread, gpt2-small's
weight shapes, one row; `python scripts/bench_model.py --int8`):

| kernel                                                    | int8 weight read  |
|-----------------------------------------------------------|-------------------|
| `torch._weight_int8pack_mm` (weight-only, eager)          | 0.7-1.0 GB/s      |
| torchao 0.18 `Int8WeightOnlyConfig` (eager / compiled)    | 1.8 / 0.3 GB/s    |
| torchao 0.18 `Int8DynamicActivationInt8WeightConfig`      | 1.3 / 2.9 GB/s    |
| fbgemm's dynamic int8 linear (`quantized::linear_dynamic`) | 7-16 GB/s        |

(fp32 through oneDNN reads 6-14 GB/s of fp32 bytes.) On the Intel Xeon (AVX-512, AMX) of later
runs, 40 distinct 768x3072 weights in turn: fbgemm 9-10 GB/s (oneDNN's engine for the same op: 9),
`_weight_int8pack_mm` 1.5, inductor's code for `F.linear(x, w.to(x.dtype)) * scale` (frozen, default
or max-autotune) 3.3-3.5; fp32 through oneDNN 14. Only fbgemm's kernel is faster than fp32, so
that is the one used: weights int8 with one scale per output channel (symmetric, zero point 0);
each call quantizes its whole input to 8 bits with one scale and zero point from that input's
range (dynamic quantization) and accumulates in int32. So this is int8 weights *and* int8
activations, not weight-only: the activation rounding is part of the error measured (the
perplexity delta in the README), and since the range is taken over all rows of a call, the rows
of a batch (or a prefill and the one-token steps after it) are rounded slightly differently. No
calibration data is needed.

The token embedding stays fp32 (a lookup reads one row); the language-model head, tied to it,
gets its own int8 copy. The quantized model is for inference on a CPU only (no gradients, no
`save_pretrained`): quantize after loading.

At batch 1 the int8 matrix products take about 11 of the ~17 ms a gpt2-small decoding step takes
here; most of the rest is Python (module calls, the cache's bookkeeping, small ops).
`quantize_int8(model, compile_decoding=True)` removes most of it: `generate()` then keeps the
keys and values in a static cache and runs each one-token step through `torch.compile`'d code
(the prompt's pass stays eager), 10-15 % faster per token once compiled. The first `generate()`
compiles (~10 s for gpt2-small here), and so does one that needs a longer cache or another batch size.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn
from transformers import CompileConfig

# torch.compile cannot trace fbgemm's prepacked weight (a TorchScript object, not a tensor), so
# compiled code calls an op of ours that takes the layer's number in this table instead; the
# table holds each live layer's packed weight and output width. Eager calls skip it.
_PACKED: dict[int, tuple[torch.ScriptObject, int]] = {}
_NUMBERS = itertools.count()


def _int8_linear(x: torch.Tensor, number: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[number][0], False)


def _int8_linear_shape(x: torch.Tensor, number: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _PACKED[number][1]))


if not hasattr(torch.ops.minigpt, "int8_linear"):
    _LIBRARY = torch.library.Library("minigpt", "FRAGMENT")
    _LIBRARY.define("int8_linear(Tensor x, int number) -> Tensor")
    _LIBRARY.impl("int8_linear", _int8_linear, "CPU")
    torch.library.register_fake("minigpt::int8_linear", _int8_linear_shape, lib=_LIBRARY)


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W int8 per output channel, through fbgemm's dynamic int8 linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Symmetric per-channel scales: the largest |w| of each output row maps to 127.
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).double()
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensors deprecated; their fbgemm kernels are still the fastest here.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
            )
        # Prepacked once into fbgemm's blocked layout (it keeps the int8 weight and the bias).
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.weight_bytes = qweight.numel() + scales.numel() * 4 + bias.numel() * 4
        self._register()

    def _register(self) -> None:
        """Enter this layer's packed weight in the table compiled code reads, until the layer is freed."""
        self._number = next(_NUMBERS)
        _PACKED[self._number] = (self._packed, self.out_features)
        weakref.finalize(self, _PACKED.pop, self._number, None)

    def __setstate__(self, state: dict) -> None:
        # A deepcopy or unpickled copy owns its packed weight: give it its own entry.
        super().__setstate__(state)
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float().contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.minigpt.int8_linear(x32, self._number)
        else:
            # reduce_range=False: full 8-bit activations (half the rounding error of 7 bits); the
            # VNNI instructions this CPU has do not need the 7-bit range older x86 kernels used.
            y = torch.ops.quantized.linear_dynamic(x32, self._packed, False)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def int8_available() -> bool:
    """True where PyTorch has the x86 int8 kernels (fbgemm) this module uses."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_int8(model: nn.Module, compile_decoding: bool = False) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) with an `Int8Linear`; returns the model, in eval mode.

    compile_decoding: make `generate()` use a static cache and a compiled one-token step (see the
    module docstring); needs a model whose forward compiles whole (`_can_compile_fullgraph`).
    ValueError if PyTorch has no x86 int8 kernels here (an ARM CPU: use the fp32 model, or the
    GGUF export's Q8_0 in llama.cpp).
    """
    if not int8_available():
        raise ValueError(
            f"int8 inference needs PyTorch's x86 int8 kernels (fbgemm); this build has only "
            f"{torch.backends.quantized.supported_engines}"
        )
    if compile_decoding and not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(f"compile_decoding needs a model that compiles whole; {type(model).__name__} does not")
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    # A tied head no longer shares its weight: `tie_weights` (called by generate's setup among
    # others) must not try to tie the int8 head back to the embedding.
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    if compile_decoding:
        model.generation_config.cache_implementation = "static"
        # mode="default": the "reduce-overhead" default records CUDA graphs, which a CPU has not.
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        # generate() compiles only on accelerators unless told; this flag is how it is told.
        config._compile_all_devices = True
        model.generation_config.compile_config = config
    return model


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes one decoding step reads from a quantized model: the int8 layers, plus every other
    parameter except the token embedding (looked up one row at a time once the head is int8)."""
    int8 = sum(m.weight_bytes for m in model.modules() if isinstance(m, Int8Linear))
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    return int8 + rest
