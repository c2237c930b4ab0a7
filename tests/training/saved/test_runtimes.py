"""scripts/export.py and training/saved/runtimes: each export checked by its real runtime.

ONNX Runtime and ExecuTorch's runtime run the exported files here: logits against PyTorch within
the tolerance each module documents, and greedy decoding of 32 new tokens equal to `generate` on
several prompts. llama.cpp runs the GGUF where llama-cpp-python is installed (it builds from source:
`MINIGPT_LLAMA_CPP=1 bash scripts/test.sh`, see scripts/setup.sh; the tests skip without it): its
tokenization equals ours, f32 logits and cached greedy decoding match PyTorch, and the perplexity
of held-out text in f32 and q8_0. Everywhere, the GGUF is also read back with the gguf package's
reader: metadata, tensor names from the package's own GPT-2 table, and the weights (our own check).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.processes import SUBPROCESS_ENV, run_checked
from helpers.runs import REPO_ROOT, listing, load_script
from helpers.texts import STRESS_TEXT

from modeling_minigpt import MiniGPTForCausalLM, linear
from tokenization.alpaca import ALPACA_TEMPLATE, format_prompt
from training.evaluation.metrics import perplexity
from training.saved.runtimes import load_for_export

PROMPTS = ["The for statement", "Return the value of", "class A:\n    def"]
NEW_TOKENS = 32
F32_TOLERANCE = 1e-4  # measured: ONNX Runtime 7.6e-6, ExecuTorch portable 8.6e-6 (fp32, other kernel orders)
XNNPACK_TOLERANCE = 1e-2  # measured 2.1e-3: XNNPACK's fp32 kernels round differently
# llama.cpp on the f32 GGUF is not exact fp32: ggml's CPU GELU rounds its input and output to fp16 (a
# lookup table) and the KV cache is f16 by default. Measured 9.5e-5 here (logits below 0.5), 2.8e-3
# on the quickstart's pretrained model (logits up to 9); 5x margin.
LLAMA_CPP_TOLERANCE = 5e-4
# Perplexity of held-out text, relative: f32 GGUF against PyTorch measured 1.8e-7; q8_0 against f32
# measured 6.0e-5 (this random model; the quickstart's pretrained model: +0.11 %, README). ~10x margin.
F32_PERPLEXITY_RTOL = 2e-6
Q8_0_PERPLEXITY_RTOL = 6e-4


@pytest.fixture(scope="module")
def export_script():
    return load_script("export")


@pytest.fixture(scope="module")
def reference(lm_dir):
    """The fp32 MiniGPT the exports are made from, and its tokenizer."""
    return load_for_export(lm_dir)


def torch_greedy(model: MiniGPTForCausalLM, ids: list[int]) -> list[int]:
    """`generate`'s greedy continuation: exactly NEW_TOKENS new ids (eos does not stop it)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def runtime_greedy(logits_of, ids: list[int]) -> list[int]:
    """Greedy decoding with a runtime that maps (1, T) ids to (1, T, vocab) logits, no cache."""
    ids = list(ids)
    start = len(ids)
    for _ in range(NEW_TOKENS):
        ids.append(int(np.argmax(logits_of(np.array([ids], dtype=np.int64))[0, -1])))
    return ids[start:]


def export(export_script, tmp_path, lm_dir, *flags: str):
    out = tmp_path / "out"
    assert export_script.main(["--model", str(lm_dir), "--output_dir", str(out), *flags]) == 0
    return out


# ----------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_dirs(export_script, lm_dir, tmp_path_factory):
    """The tiny LM exported in each GGUF type."""
    pytest.importorskip("gguf")
    return {
        t: export(export_script, tmp_path_factory.mktemp(f"gguf_{t}"), lm_dir, "--gguf_type", t)
        for t in ("f32", "f16", "q8_0")
    }


def test_gguf_metadata_and_tensors_read_back(gguf_dirs, reference):
    import gguf

    from training.saved.runtimes.gguf import gguf_fields

    model, tokenizer = reference
    assert list(listing(gguf_dirs["f32"])) == ["Modelfile", "model.gguf"]
    reader = gguf.GGUFReader(gguf_dirs["f32"] / "model.gguf")
    fields = gguf_fields(reader)
    config = model.config
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == config.context_length
    assert fields["gpt2.embedding_length"] == config.emb_dim
    assert fields["gpt2.feed_forward_length"] == 4 * config.emb_dim
    assert fields["gpt2.block_count"] == config.n_layers
    assert fields["gpt2.attention.head_count"] == config.n_heads
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in backend["model"]["merges"]]
    specials = set(tokenizer.all_special_ids)
    assert [i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL] == sorted(
        specials
    )
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    template = fields["tokenizer.chat_template"]
    assert "{%- generation -%}" not in template and "### Instruction:" in template

    # Every tensor is one llama.cpp's GPT-2 loads, named from the gguf package's own tables.
    allowed = {
        gguf.TENSOR_NAMES[kind].format(bid=i) + suffix
        for kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]
        for i in range(config.n_layers)
        for suffix in (".weight", ".bias")
    }
    names = {t.name for t in reader.tensors}
    assert names <= allowed
    assert len(names) == 5 + 12 * config.n_layers  # embeddings, output norm and head; 12 per block
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    assert list(qkv.shape) == [config.emb_dim, 3 * config.emb_dim]  # ggml order: (in, out)


def test_gguf_read_back_gives_the_logits(gguf_dirs, reference):
    from training.saved.runtimes.gguf import read_gguf

    model, tokenizer = reference
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        expected = model(ids).logits
        f32 = read_gguf(gguf_dirs["f32"] / "model.gguf")(ids).logits
        f16 = read_gguf(gguf_dirs["f16"] / "model.gguf")(ids).logits
    torch.testing.assert_close(f32, expected, rtol=0, atol=1e-6)
    assert (f16 - expected).abs().max() < 1e-2


def test_gguf_q8_0_weights_are_blocks_of_32_within_half_a_step(gguf_dirs, reference):
    import gguf

    model, _ = reference
    reader = gguf.GGUFReader(gguf_dirs["q8_0"] / "model.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_up.bias"] == gguf.GGMLQuantizationType.F32
    fc_in = model.model.trf_blocks[0].ff.fc_in.weight.detach().numpy()
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    restored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(fc_in.shape)
    blocks = fc_in.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    # Half a step of rounding, plus the rounding of the fp16 scale itself.
    assert np.all(np.abs(restored.reshape(-1, 32) - blocks) <= 0.5 * step + 1e-3 * np.abs(blocks) + 1e-7)


def test_modelfile_renders_the_alpaca_prompt(gguf_dirs, reference):
    _, tokenizer = reference
    text = (gguf_dirs["f32"] / "Modelfile").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "FROM ./model.gguf"
    assert f"PARAMETER stop {json.dumps(tokenizer.eos_token)}" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    # Render Ollama's Go template for one message without a system prompt (its only actions here).
    preamble = json.dumps(ALPACA_TEMPLATE["preamble"])
    rendered = (
        template.replace(
            f"{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{{{{ {preamble} }}}}{{{{ end }}}}",
            ALPACA_TEMPLATE["preamble"],
        )
        .replace("{{ .Prompt }}", "Name a color.")
        .replace("{{ .Response }}", "")
    )
    assert rendered == format_prompt("Name a color.")


def test_gguf_from_a_gpt2_folder_holds_the_same_tensors(export_script, gpt2_dir, gguf_dirs, tmp_path):
    import gguf

    out = export(export_script, tmp_path, gpt2_dir, "--format", "gguf")
    ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(gguf_dirs["f32"] / "model.gguf").tensors}
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=0, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            "llama.cpp is absent: llama-cpp-python builds from source (PyPI's prebuilt wheels need a newer "
            "glibc/libstdc++ than Debian 12's); MINIGPT_LLAMA_CPP=1 bash scripts/test.sh builds it (minutes, "
            "once: pip caches the wheel). The GGUF is still checked by the gguf reader above"
        )
    import llama_cpp

    return llama_cpp


def llama(llama_cpp, folder, n_ctx: int):
    """Unmodified llama.cpp on `folder`/model.gguf, keeping every position's logits, on one thread."""
    return llama_cpp.Llama(
        str(folder / "model.gguf"), n_ctx=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1, verbose=False
    )


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits of llama.cpp for `ids`, from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_llama_cpp_tokenizes_as_ours(llama_cpp, gguf_dirs, reference, text):
    # llama.cpp's BPE, from the GGUF's vocabulary, merges and pre-tokenizer name alone.
    model, tokenizer = reference
    llm = llama(llama_cpp, gguf_dirs["f32"], model.config.context_length)
    for sample in [*PROMPTS, text, STRESS_TEXT]:
        ids = tokenizer.encode(sample)
        # special=True: special tokens written in the text are the special ids, as in `encode`.
        assert llm.tokenize(sample.encode("utf-8"), add_bos=False, special=True) == ids, sample
        assert llm.detokenize(ids, special=True).decode("utf-8") == tokenizer.decode(ids), sample


def test_llama_cpp_runs_the_f32_gguf(llama_cpp, gguf_dirs, reference):
    model, tokenizer = reference
    llm = llama(llama_cpp, gguf_dirs["f32"], model.config.context_length)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(llama_cpp_logits(llm, ids), expected, rtol=0, atol=LLAMA_CPP_TOLERANCE)
        # Greedy decoding the way llama.cpp runs: the prompt once, then one token a step on its KV cache.
        new = []
        for _ in range(NEW_TOKENS):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(new[-1:])
        assert new == torch_greedy(model, ids), prompt


def test_llama_cpp_q8_0_perplexity(llama_cpp, gguf_dirs, reference, pydoc_text):
    model, tokenizer = reference
    n_ctx = model.config.context_length
    # Held out: the end of the pydoc corpus, past the 200k characters the tiny tokenizer learned from.
    ids = tokenizer.encode(pydoc_text[-5000:])[-n_ctx:]
    targets = torch.tensor(ids[1:])

    def llama_cpp_perplexity(gguf_type: str) -> float:
        logits = torch.from_numpy(llama_cpp_logits(llama(llama_cpp, gguf_dirs[gguf_type], n_ctx), ids))
        return perplexity(float(torch.nn.functional.cross_entropy(logits[:-1].double(), targets)))

    with torch.no_grad():
        expected = perplexity(float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    f32, q8_0 = llama_cpp_perplexity("f32"), llama_cpp_perplexity("q8_0")
    assert f32 == pytest.approx(expected, rel=F32_PERPLEXITY_RTOL)
    assert q8_0 == pytest.approx(f32, rel=Q8_0_PERPLEXITY_RTOL)


# ----------------------------------------------------------------------------- ONNX


def test_onnx_runtime_matches_pytorch(export_script, lm_dir, reference, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    # Every projection on oneDNN's kernel, as in a real-sized model: the exporter must still get F.linear.
    monkeypatch.setattr(linear, "ONEDNN_MIN_WEIGHT", 0)
    model, tokenizer = reference
    out = export(export_script, tmp_path, lm_dir, "--format", "onnx")
    assert {"model.onnx", "model_with_past.onnx", "tokenizer.json", "config.json"} <= set(listing(out))
    assert not any(name.endswith(".py") for name in listing(out))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])

    # A left-padded batch of rows of different lengths: dynamic batch and sequence, masks applied.
    rows = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=F32_TOLERANCE)

    def logits_of(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": batch, "attention_mask": np.ones_like(batch)})[0]

    for row in rows:
        assert runtime_greedy(logits_of, row) == torch_greedy(model, row)


def test_onnx_with_past_decodes_one_token_per_step(export_script, lm_dir, reference, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, tokenizer = reference
    out = export(export_script, tmp_path, lm_dir, "--format", "onnx")
    session = ort.InferenceSession(str(out / "model_with_past.onnx"), providers=["CPUExecutionProvider"])
    config = model.config
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        # The prompt with an empty past, then one token per step on the returned keys and values.
        past = np.zeros((config.n_layers, 1, config.n_heads, 0, config.emb_dim // config.n_heads), np.float32)
        keys, values, step, new = past, past, np.array([ids], np.int64), []
        for _ in range(NEW_TOKENS):
            total = keys.shape[3] + step.shape[1]
            feed = {"input_ids": step, "attention_mask": np.ones((1, total), np.int64)}
            logits, keys, values = session.run(None, {**feed, "past_keys": keys, "past_values": values})
            assert keys.shape[3] == total
            if not new:
                with torch.no_grad():
                    expected = model(torch.tensor([ids])).logits.numpy()
                np.testing.assert_allclose(logits, expected, rtol=0, atol=F32_TOLERANCE)
            new.append(int(logits[0, -1].argmax()))
            step = np.array([new[-1:]], np.int64)
        assert new == torch_greedy(model, ids)


# ----------------------------------------------------------------------------- ExecuTorch


# scripts/setup.sh installs torchao, which XNNPACK's lowering imports, here rather than among
# .venv's packages (see there); the XNNPACK export then runs in a process that has it on its path.
SIDE_TORCHAO = Path(sys.prefix) / "xnnpack-torchao"


def export_in_subprocess(tmp_path, lm_dir, *flags: str, pythonpath: Path) -> Path:
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "export.py"),
        "--model",
        str(lm_dir),
        "--output_dir",
        str(out),
        *flags,
    ]
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    run_checked(command, env=env)
    return out


def executorch_check(export_script, lm_dir, reference, tmp_path, backend: str, tolerance: float) -> None:
    from training.saved.runtimes.executorch import missing_packages

    missing = missing_packages(backend)
    side_torchao = missing == ["torchao"] and (SIDE_TORCHAO / "torchao").is_dir()
    if missing and not side_torchao:
        pytest.skip(
            f"the ExecuTorch {backend} export needs {', '.join(missing)}, not installed here "
            '(pip install -e ".[executorch]", or bash scripts/test.sh, which installs them for the suite)'
        )
    from executorch.runtime import Runtime

    model, tokenizer = reference
    flags = ("--format", "executorch", "--executorch_backend", backend)
    if side_torchao:
        out = export_in_subprocess(tmp_path, lm_dir, *flags, pythonpath=SIDE_TORCHAO)
    else:
        out = export(export_script, tmp_path, lm_dir, *flags)
    forward = Runtime.get().load_program(str(out / "model.pte")).load_method("forward")

    def logits_of(batch: np.ndarray) -> np.ndarray:
        return forward.execute([torch.from_numpy(batch)])[0].numpy()

    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits.numpy()
        np.testing.assert_allclose(logits_of(np.array([ids])), expected, rtol=0, atol=tolerance)
        assert runtime_greedy(logits_of, ids) == torch_greedy(model, ids)


def test_executorch_portable_matches_pytorch(export_script, lm_dir, reference, tmp_path):
    executorch_check(export_script, lm_dir, reference, tmp_path, "portable", F32_TOLERANCE)


@pytest.mark.slow
def test_executorch_xnnpack_matches_pytorch(export_script, lm_dir, reference, tmp_path):
    executorch_check(export_script, lm_dir, reference, tmp_path, "xnnpack", XNNPACK_TOLERANCE)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("missing model", ["--model", "{root}/nope"], "does not exist"),
        ("classifier", ["--model", "{classifier}"], "classifier"),
        ("output not empty", ["--output_dir", "{busy}"], "not empty"),
        ("output is a file", ["--output_dir", "{busy}/x.txt"], "is a file"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    export_script, lm_dir, classifier_dir, tmp_path, capsys, case, flags, message
):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep me")
    values = {"root": tmp_path, "classifier": classifier_dir, "busy": busy}
    argv = {"--model": str(lm_dir), "--output_dir": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        argv[flag] = value.format(**values)
    before = listing(tmp_path)
    assert export_script.main([item for pair in argv.items() for item in pair]) == 1, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert listing(tmp_path) == before
    assert (busy / "x.txt").read_text() == "keep me"
