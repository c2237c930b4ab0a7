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

(fp32 through oneDNN reads 6-14 GB/s of fp32 bytes.) Only fbgemm's kernel is faster than fp32, so
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
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: full 8-bit activations (half the rounding error of 7 bits); the
        # VNNI instructions this CPU has do not need the 7-bit range older x86 kernels used.
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, False).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def int8_available() -> bool:
    """True where PyTorch has the x86 int8 kernels (fbgemm) this module uses."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) with an `Int8Linear`; returns the model, in eval mode.

    ValueError if PyTorch has no x86 int8 kernels here (an ARM CPU: use the fp32 model, or the
    GGUF export's Q8_0 in llama.cpp).
    """
    if not int8_available():
        raise ValueError(
            f"int8 inference needs PyTorch's x86 int8 kernels (fbgemm); this build has only "
            f"{torch.backends.quantized.supported_engines}"
        )
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    # A tied head no longer shares its weight: `tie_weights` (called by generate's setup among
    # others) must not try to tie the int8 head back to the embedding.
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return model


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes one decoding step reads from a quantized model: the int8 layers, plus every other
    parameter except the token embedding (looked up one row at a time once the head is int8)."""
    int8 = sum(m.weight_bytes for m in model.modules() if isinstance(m, Int8Linear))
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    return int8 + rest
