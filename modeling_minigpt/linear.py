"""The linear layer every projection uses: `nn.Linear`, with a faster kernel for CPU inference.

PyTorch runs an fp32 `nn.Linear` on the CPU through MKL (bf16 already goes through oneDNN). On
the AMD EPYC CPU this was measured on, MKL's fp32 matrix-vector product, which is what a decoding
step is made of, reads gpt2-small's weights at 11-15 GB/s; oneDNN's reads the same weights, in
the same layout, at 13-21 GB/s, and it is ahead at 8 and 128 rows too (1.2-2.8x in all,
`python benchmarks/bench_model.py --linear`). Greedy decoding of gpt2-small is 1.4x faster with it at
batch 1 and 1.6x at batch 8 (`--generate`).

oneDNN's kernel has no backward, so it is used only where no gradient can be asked for: under
`torch.no_grad()` / `inference_mode()` (generate(), evaluation), or when neither the input nor
the weight requires one (a frozen base layer under LoRA). Everything else, and every other
device, dtype or tensor subclass, is plain `F.linear`. Each call to oneDNN costs ~20 us more than
MKL's, so weights under `ONEDNN_MIN_WEIGHT` elements (tiny models, where that is more than the
bandwidth saved) stay on MKL. `torch.export` and TorchScript tracing (the ONNX exporter) always
get `F.linear`, so an exported graph holds only core ATen ops.

`Linear` subclasses `nn.Linear` and changes only `forward` (same parameters, names and state
dict), so PEFT wraps it, GPT-2 conversion maps it and `_init_weights` initialises it as any
linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's kernel is used where the CPU reports AVX2 or AVX-512 (an x86-64 CPU, where MKL is the
# alternative; only an AMD EPYC was measured) and PyTorch has that kernel. Set it to False to run
# MKL everywhere, or to leave the linear layers of a compiled, frozen model to inductor, which then
# packs the weights itself: with a dynamic batch it packs them for oneDNN, faster at batch 8 than
# our op on plain weights (34 against 50 ms per gpt2-small decoding step).
USE_ONEDNN = (
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
# 2**18 fp32 elements = 1 MiB, about where reading a weight ~1.4x faster saves more than the
# ~20 us a call to oneDNN costs over one to MKL (both measured on small weights, where MKL wins).
ONEDNN_MIN_WEIGHT = 1 << 18


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# torch.compile cannot trace oneDNN's op with plain weights (inductor lowers it only for frozen,
# pre-packed ones), so compiled code calls it through an opaque op of ours. A `Library` op with a
# CPU kernel costs ~2 ms less per gpt2-small decoding step than a `torch.library.custom_op`. The
# saved model folder imports this file under another module name: register the op only once.
if not hasattr(torch.ops.minigpt, "onednn_linear"):
    _LIBRARY = torch.library.Library("minigpt", "FRAGMENT")
    _LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    _LIBRARY.impl("onednn_linear", _onednn_linear, "CPU")
    torch.library.register_fake("minigpt::onednn_linear", _onednn_linear_shape, lib=_LIBRARY)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where oneDNN computes x @ weight.T for this layer (see the module docstring)."""
    return (
        USE_ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.numel() >= ONEDNN_MIN_WEIGHT
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()  # the ONNX exporter traces with TorchScript: core ops only
    )


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return torch.ops.minigpt.onednn_linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias)  # direct: no dispatch through our op
