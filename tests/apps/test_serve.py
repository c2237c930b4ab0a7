"""The OpenAI-compatible server (apps/serve.py: transformers' `serve` with MiniGPT), run for real on
127.0.0.1 in a subprocess and driven by the official `openai` client. Every answer is compared
with greedy `generate` on the same folder in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai", reason='the server needs the optional extra: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='the server needs the optional extra: pip install -e ".[serve]"')

from helpers.processes import SUBPROCESS_ENV, free_port  # noqa: E402
from helpers.runs import REPO_ROOT  # noqa: E402

from apps.serve import main  # noqa: E402
from tokenization.load import load_tokenizer  # noqa: E402
from training.saved.load import load_model  # noqa: E402

SYSTEM = "You answer in one word."


@pytest.fixture(scope="module")
def server(lm_dir, tmp_path_factory):
    """`minigpt-serve lm_dir` on a free port; yields its base URL."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    with open(log, "w") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "apps.serve", str(lm_dir), "--host", "127.0.0.1", "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=SUBPROCESS_ENV,
            cwd=REPO_ROOT,
            start_new_session=True,  # its model process too is stopped with the group at the end
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a guard against a hung start, not a speed requirement
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(lm_dir):
    """greedy(prompt_ids, max_new_tokens, **generate_kwargs) -> (text, token count), as the server should answer."""
    model, tokenizer = load_model(lm_dir, "causal-lm").eval(), load_tokenizer(lm_dir)

    def greedy(prompt_ids: list[int], max_new_tokens: int | None = None, **kwargs) -> tuple[str, int]:
        room = model.config.context_length - len(prompt_ids)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=room if max_new_tokens is None else min(max_new_tokens, room),
                do_sample=False,
                tokenizer=tokenizer,
                **kwargs,
            )
        new = out[0, len(prompt_ids) :]
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    greedy.tokenizer = tokenizer
    greedy.context_length = model.config.context_length
    return greedy


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


pytestmark = pytest.mark.slow  # a server started in a subprocess, and its model process


def test_chat_with_a_system_message_is_greedy_generate_on_the_chat_template(client, lm_dir, reference):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    prompt = chat_ids(reference.tokenizer, messages)
    # The Alpaca template puts the system message where the preamble goes (tokenization/alpaca.py).
    assert reference.tokenizer.decode(prompt).startswith(SYSTEM + "\n\n### Instruction:\nName a colour.")
    expected, _ = reference(prompt, 12)

    answer = client.chat.completions.create(model=str(lm_dir), messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 12)
    assert answer.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(
        model=str(lm_dir), messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected


def test_completions_streamed_and_not(client, lm_dir, reference):
    prompt = "The for statement"
    expected, _ = reference(reference.tokenizer(prompt)["input_ids"], 10)
    answer = client.completions.create(model=str(lm_dir), prompt=prompt, max_tokens=10, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == 10
    stream = client.completions.create(model=str(lm_dir), prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def test_stop_ends_the_answer_where_generate_stop_strings_does(client, lm_dir, reference):
    prompt = "Assignment statements"
    ids = reference.tokenizer(prompt)["input_ids"]
    full, _ = reference(ids, 20)
    stop = full.strip()[3:5]  # two characters from inside the greedy answer (or spanning the prompt's end)
    expected, length = reference(ids, 20, stop_strings=[stop])
    assert stop in prompt + expected and length < 20

    answer = client.completions.create(model=str(lm_dir), prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == length


def test_without_max_tokens_the_answer_ends_at_the_context(client, lm_dir, reference):
    """transformers asks for >= 1024 new tokens by default; the model's 192 positions bound the answer instead."""
    prompt = "Comparisons"
    ids = reference.tokenizer(prompt)["input_ids"]
    expected, length = reference(ids)
    answer = client.completions.create(model=str(lm_dir), prompt=prompt, temperature=0)
    assert answer.choices[0].text == expected
    assert len(ids) + answer.usage.completion_tokens == len(ids) + length <= reference.context_length


def test_eight_concurrent_chats_each_get_their_own_answer(client, lm_dir, reference):
    questions = [
        f"Explain {topic}." for topic in ("loops", "classes", "imports", "lambda", "tuples", "sets", "with", "yield")
    ]
    chats = [[{"role": "user", "content": question}] for question in questions]
    expected = [reference(chat_ids(reference.tokenizer, chat), 8)[0] for chat in chats]
    assert len(set(expected)) > 1  # otherwise a mix-up could not show

    def ask(chat):
        answer = client.chat.completions.create(model=str(lm_dir), messages=chat, max_tokens=8, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(ask, chats)) == expected


def test_bad_requests_are_400s_and_the_server_keeps_serving(client, lm_dir):
    def refusal(create, **request) -> str:
        with pytest.raises(openai.BadRequestError) as error:
            create(model=request.pop("model", str(lm_dir)), **request)
        return error.value.response.json()["detail"]  # transformers' 400s say why in `detail`

    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert "two user messages in a row" in refusal(client.chat.completions.create, messages=two_users, max_tokens=4)
    assert "max_new_tokens" in refusal(client.completions.create, prompt="x", max_tokens=-1)
    assert "pinned" in refusal(client.completions.create, model="some/other-model", prompt="x", max_tokens=2)
    answer = client.completions.create(model=str(lm_dir), prompt="x", max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens == 2


@pytest.mark.parametrize("make", ["missing", "classifier"])
def test_the_command_refuses_what_it_cannot_serve(make, classifier_dir, tmp_path, capsys):
    folder = tmp_path / "nothing" if make == "missing" else classifier_dir
    assert main([str(folder), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(folder) in err[0]
