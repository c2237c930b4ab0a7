"""modeling_minigpt.linear: oneDNN computes the inference projections, F.linear everything else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM, linear
from modeling_minigpt.linear import ONEDNN_MIN_WEIGHT, Linear, onednn_applies

pytestmark = pytest.mark.skipif(not linear.USE_ONEDNN, reason="oneDNN's linear kernel is not used on this CPU")

# 512 x 512 = 2**18 elements, the smallest weight oneDNN takes.
WIDTH = 512


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The weight shape of every eager call to oneDNN's kernel."""
    seen: list[tuple[int, ...]] = []
    kernel = linear._onednn_linear

    def counting(x, weight, bias):
        seen.append(tuple(weight.shape))
        return kernel(x, weight, bias)

    monkeypatch.setattr(linear, "_onednn_linear", counting)
    return seen


def test_the_rule_takes_only_gradient_free_fp32_cpu_calls_on_large_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.nn.Parameter(torch.randn(WIDTH, WIDTH))
    x = torch.randn(2, WIDTH)
    assert WIDTH * WIDTH == ONEDNN_MIN_WEIGHT
    with torch.no_grad():
        assert onednn_applies(x, weight)
        assert not onednn_applies(x, weight[:, :-1])  # one column fewer than the minimum
        assert not onednn_applies(x.bfloat16(), weight.bfloat16())  # bf16 is on oneDNN already
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_applies(x, weight)  # autocast must see the call to cast it
    assert not onednn_applies(x, weight)  # training: the weight wants a gradient
    assert not onednn_applies(x.requires_grad_(), weight.detach())  # the input wants one
    assert onednn_applies(x.detach(), weight.detach())  # a frozen base layer on a frozen input
    monkeypatch.setattr(linear, "USE_ONEDNN", False)
    with torch.no_grad():
        assert not onednn_applies(x, weight)


@pytest.mark.parametrize("shape", [(1, WIDTH), (1, 1, WIDTH), (3, 5, WIDTH)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_output_equals_f_linear(shape: tuple[int, ...], bias: bool, calls: list) -> None:
    torch.manual_seed(0)
    layer = Linear(WIDTH, 2 * WIDTH, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        ours = layer(x)
    assert calls == [(2 * WIDTH, WIDTH)]
    assert ours.shape == (*shape[:-1], 2 * WIDTH)
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), rtol=0.0, atol=1e-5)


def test_training_keeps_f_linear_and_its_gradients(calls: list) -> None:
    torch.manual_seed(0)
    layer = Linear(WIDTH, WIDTH)
    reference = torch.nn.Linear(WIDTH, WIDTH)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(4, WIDTH)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert calls == []
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)


def test_compiled_inference_calls_the_custom_op_in_one_graph() -> None:
    torch.manual_seed(0)
    layer = Linear(WIDTH, WIDTH).eval()
    graphs: list[torch.fx.GraphModule] = []

    def recording(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=recording, fullgraph=True)
    x = torch.randn(2, 3, WIDTH)
    with torch.no_grad():
        out = compiled(x)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.minigpt.onednn_linear in targets and F.linear not in targets
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=0.0, atol=1e-5)


def test_export_holds_only_core_aten_ops() -> None:
    layer = Linear(WIDTH, WIDTH).eval()
    with torch.no_grad():
        program = torch.export.export(layer, (torch.randn(2, WIDTH),))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("minigpt" in op or "mkldnn" in op for op in ops), ops
    assert any("linear" in op or "addmm" in op for op in ops), ops


def test_model_generates_the_same_ids_with_onednn_and_mkl(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """A model with weights at the threshold: its MLP and LM head go to oneDNN under generate()."""
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=1024, emb_dim=256, n_heads=4, n_layers=2, context_length=64, drop_rate=0.0
    )
    model = MiniGPTForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (2, 8))
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        fast_ids = model.generate(ids, **settings)
        fast_logits = model(ids).logits
    # fc_in, fc_out (256 x 1024) in both layers and the LM head (1024 x 256), once per forward
    assert set(calls) == {(1024, 256), (256, 1024)} and len(calls) == 5 * 13
    monkeypatch.setattr(linear, "USE_ONEDNN", False)
    with torch.no_grad():
        mkl_ids = model.generate(ids, **settings)
        mkl_logits = model(ids).logits
    assert torch.equal(fast_ids, mkl_ids)
    torch.testing.assert_close(fast_logits, mkl_logits, rtol=0.0, atol=1e-5)


def test_a_saved_folder_loaded_as_remote_code_shares_the_op(tmp_path, calls: list) -> None:
    """The folder's copy of linear.py is imported under transformers' module name beside the
    package's: it must not register the op a second time, and its layers compute the same."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset("tiny", vocab_size=1024, emb_dim=256, n_heads=4, n_layers=1, context_length=32)
    model = MiniGPTForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    # What AutoModelForCausalLM(..., trust_remote_code=True) does where the package is not installed
    # (with it installed, the Auto classes take the package's own classes).
    remote_class = get_class_from_dynamic_module("modeling_minigpt.MiniGPTForCausalLM", tmp_path)
    assert remote_class.__module__.startswith("transformers_modules")
    remote = remote_class.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1024, (2, 8))
    with torch.no_grad():
        ours, theirs = model(ids).logits, remote(ids).logits
    assert len(calls) == 3  # the package's layers; the remote copy calls its own module's kernel
    torch.testing.assert_close(theirs, ours, rtol=0.0, atol=1e-6)
    with torch.no_grad():
        compiled = torch.compile(remote, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, ours, rtol=0.0, atol=1e-5)
