"""The web app (apps/web.py), served for real on 127.0.0.1: driven by gradio_client without a
browser, and by headless Chromium through selenium. The server runs in a subprocess under an audit
hook that records every socket it opens to a host that is not this machine."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("gradio", reason='the app needs the optional extra: pip install -e ".[app]"')
gradio_client = pytest.importorskip("gradio_client")

from helpers.models import LABELS, scripted_model  # noqa: E402
from helpers.runs import REPO_ROOT  # noqa: E402

from apps.inspect_model import SamplingSettings, chat_prompt, classify, load_for_app  # noqa: E402

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the client's own telemetry reads it too
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Starts the app like scripts/app.py does, after installing an audit hook that appends every
# non-local host the server resolves or connects to (one JSON line each) to the file in argv[1].
SERVER_CODE = """
import json, socket, sys
log = sys.argv.pop(1)
LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "", None}
def hook(event, args):
    host = None
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    if host not in LOCAL and host is not None:
        with open(log, "a") as f:
            f.write(json.dumps({"event": event, "host": str(host)}) + "\\n")
sys.addaudithook(hook)
from apps.web import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the scripted model answers (to a prompt as long as SCRIPTED_MESSAGE's): markup, to see it shown as text.
SCRIPTED_MESSAGE = "Show me some HTML"
SCRIPTED_REPLY = "<b>x</b> <img src=x>"


@pytest.fixture(scope="module")
def scripted_dir(tiny_tokenizer, tmp_path_factory):
    """A MiniGPT folder whose greedy reply to SCRIPTED_MESSAGE is SCRIPTED_REPLY (see `scripted_model`)."""
    folder = tmp_path_factory.mktemp("app_scripted")
    prompt = chat_prompt(tiny_tokenizer, [], SCRIPTED_MESSAGE)
    reply = tiny_tokenizer(SCRIPTED_REPLY, add_special_tokens=False)["input_ids"]
    scripted_model(len(prompt.ids), reply, tiny_tokenizer.eos_token_id, len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(lm_dir, classifier_dir, gpt2_dir, scripted_dir, tmp_path_factory):  # noqa: F811
    """The app on a free port of 127.0.0.1, on `lm_dir` first, and allowed to load the classifier, the
    GPT-2 export and the scripted model; yields (url, outbound log)."""
    folders = [str(lm_dir), str(classifier_dir), str(gpt2_dir), str(scripted_dir)]
    folder = tmp_path_factory.mktemp("app_server")
    outbound, log = folder / "outbound.jsonl", folder / "server.log"
    outbound.touch()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE, str(outbound), "--model", *folders, "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180  # a guard against a hung start, not a speed requirement
    while True:
        assert process.poll() is None, f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the app did not answer on {url}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    yield url, outbound
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def client(server):
    url, _ = server
    c = gradio_client.Client(url, verbose=False, analytics_enabled=False, download_files=False)
    yield c
    c.close()


def load(client, folder) -> str:
    """Load `folder` in this client's page of the running app; returns the load status line."""
    return client.predict(str(folder), api_name="/load")[1]


DEFAULT_SETTINGS = SamplingSettings(max_new_tokens=20)


def chat(client, message, history=(), settings=DEFAULT_SETTINGS) -> list[tuple]:
    """Every streamed update of one chat turn, in order."""
    job = client.submit(
        message,
        list(history),
        settings.temperature,
        settings.top_k,
        settings.top_p,
        settings.max_new_tokens,
        settings.seed,
        api_name="/chat",
    )
    return list(job)


def reply_text(update) -> str:
    content = update[0][-1]["content"]
    return "".join(part["text"] for part in content) if isinstance(content, list) else content


def reference_ids(folder, message, settings) -> list[int]:
    loaded = load_for_app(folder)
    prompt = chat_prompt(loaded.tokenizer, [], message)
    torch.manual_seed(settings.seed)
    out = loaded.model.generate(
        torch.tensor([prompt.ids]),
        **settings.generate_kwargs(),
        eos_token_id=loaded.tokenizer.eos_token_id,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return out[0, len(prompt.ids) :].tolist()


# ----------------------------------------------------------------------------- the command line


def test_cli_refuses_a_bad_model_before_serving(tmp_path, capsys):
    from apps.web import main

    for flags, expected in [
        ([], "--model is required"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(tmp_path)], "has no config.json"),
    ]:
        assert main(flags) == 1  # returns before any server starts
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minigpt-app: error:") and expected in lines[0], err
        assert "Running on" not in out
    # The script itself: exit code 1 and the same single line.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "app.py"), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"minigpt-app: error: --model: model folder {tmp_path} has no config.json: "
        "it is not a saved model folder (save_pretrained writes one)"
    ]


def test_cli_help_gives_defaults(capsys):
    from apps.web import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "127.0.0.1" in out and "7860" in out


# ----------------------------------------------------------------------------- without a browser


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(max_new_tokens=20),
        SamplingSettings(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=11),
    ],
    ids=["greedy", "seeded sampling"],
)
def test_streamed_chat_returns_the_tokens_of_generate(client, lm_dir, settings):  # noqa: F811
    assert "Loaded" in load(client, lm_dir)
    message = "Repeat the words: sun moon"
    updates = chat(client, message, settings=settings)
    final = updates[-1][4]
    assert final["ids"] == reference_ids(lm_dir, message, settings)
    assert final["stop"] in {"eos", "length"} and "Stopped" in updates[-1][2]
    # One update per token, each extending the last: the reply really streams.
    assert len(updates) == len(final["ids"]) > 1
    for i, update in enumerate(updates):
        assert update[4]["ids"] == final["ids"][: i + 1]
        assert reply_text(updates[-1]).startswith(reply_text(update))
    assert updates[-1][0][0]["content"][0]["text"] == message
    table = updates[-1][3]["data"]
    assert len(table) == len(final["ids"])
    for row, token in zip(table, final["tokens"], strict=False):
        assert row[1] == token["piece"] and row[2] == pytest.approx(token["probability"], abs=1e-4)
        assert sum(p for _, _, p in token["top"]) <= 1 + 1e-6


def test_chat_with_the_stock_gpt2_export(client, lm_dir, gpt2_dir):  # noqa: F811
    assert "Loaded" in load(client, gpt2_dir)
    settings = SamplingSettings(max_new_tokens=12, temperature=1.1, seed=5)
    assert chat(client, "Add: 1 + 2", settings=settings)[-1][4]["ids"] == reference_ids(
        gpt2_dir, "Add: 1 + 2", settings
    )


def test_inspect_returns_probabilities_and_a_heatmap_of_the_right_shape(client, lm_dir):  # noqa: F811
    load(client, lm_dir)
    text = "The for statement is used to iterate over the elements"
    loaded = load_for_app(lm_dir)
    ids = loaded.tokenizer(text)["input_ids"]
    html, status, plot, table, labels, details = client.predict(text, 1, 1, api_name="/inspect")
    assert status.startswith(f"{len(ids)} tokens") and details["ids"] == ids
    attention = torch.tensor(details["attention"])
    assert attention.shape == (len(ids), len(ids))
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(len(ids)), check_dtype=False)
    assert base64.b64decode(plot["plot"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    with torch.no_grad():
        probs = torch.softmax(loaded.model(torch.tensor([ids])).logits[0], dim=-1)  # (T, V)
    assert details["probabilities"][0] is None  # the first token has no text before it
    for t, record in enumerate(details["probabilities"][1:], start=1):
        assert record["id"] == ids[t] and record["probability"] == pytest.approx(float(probs[t - 1, ids[t]]), abs=1e-5)
        assert sum(p for _, _, p in record["top"]) <= 1 + 1e-6
    assert [row[1] for row in table["data"]] == ids
    assert html.count('class="tok"') == len(ids) and not labels  # no label probabilities for an LM


def test_inspect_a_classifier(client, classifier_dir, lm_dir):  # noqa: F811
    assert "Loaded" in load(client, classifier_dir)
    text = "the cat sat on the mat"
    _, _, _, _, labels, details = client.predict(text, 0, 1, api_name="/inspect")
    expected = classify(*(lambda m: (m.model, m.tokenizer))(load_for_app(classifier_dir)), text)
    confidences = {c["label"]: c["confidence"] for c in labels["confidences"]}
    assert confidences == pytest.approx(expected.probabilities, abs=1e-6) and set(confidences) == set(LABELS)
    assert details["classification"]["pooled_position"] == len(details["ids"]) - 1
    assert "classifier" in chat(client, "hello")[-1][2]
    load(client, lm_dir)


def test_a_page_loads_only_the_command_lines_folders_and_only_for_itself(
    server, client, lm_dir, classifier_dir, tmp_path
):
    assert "Loaded" in load(client, lm_dir)
    for folder in (classifier_dir.parent / "other", lm_dir.parent, tmp_path / "missing"):
        status = load(client, folder)
        assert f"{folder} is not one of the folders this app was started with" in status
        assert "restart the app with it among the --model folders" in status and f"Still showing {lm_dir}" in status
    # Another page (another client, its own session) switches to the classifier; this page keeps its model.
    other = gradio_client.Client(server[0], verbose=False, analytics_enabled=False, download_files=False)
    try:
        assert "Loaded" in load(other, classifier_dir)
        assert "classifier" in chat(other, "hello")[-1][2]
        assert chat(client, "Repeat: a b")[-1][4]["ids"]  # still the language model here
    finally:
        other.close()
    # Another spelling of an allowed folder is that folder.
    assert f"Loaded {classifier_dir}" in load(client, f"{classifier_dir}/../{classifier_dir.name}/")
    load(client, lm_dir)


def test_bad_input_is_a_message_and_the_server_keeps_serving(client, lm_dir, tmp_path):  # noqa: F811
    load(client, lm_dir)
    assert "empty" in chat(client, "   ")[-1][2]
    too_long = chat(client, "word " * 400)[-1]
    assert "context is 192" in too_long[2] and too_long[0] == []
    assert "at most 192 tokens" in client.predict("word " * 400, 0, 0, api_name="/inspect")[1]
    # A reply that runs into the end of the context says so.
    near_full = "word " * 30  # 167 of the 192 positions
    n_prompt = len(chat_prompt(load_for_app(lm_dir).tokenizer, [], near_full).ids)
    last = chat(client, near_full, settings=SamplingSettings(max_new_tokens=192))[-1]
    assert last[4]["stop"] == "context" and len(last[4]["ids"]) == 192 - n_prompt
    assert "The context is full" in last[2]
    assert chat(client, "Repeat: a b")[-1][4]["ids"]  # still serving


def test_a_multi_turn_chat_goes_on_without_the_turns_that_do_not_fit(client, lm_dir):  # noqa: F811
    """Each turn's reply fills 40 of the 192 positions: by the fourth, the first turns are left out of the prompt."""
    load(client, lm_dir)
    settings = SamplingSettings(max_new_tokens=40)
    tokenizer = load_for_app(lm_dir).tokenizer
    history: list = []
    notes = []
    for message in ("Repeat: sun moon", "Reverse: red green blue", "Sort: 3, 1, 2", "What is 2 plus 2?"):
        last = chat(client, message, history, settings)[-1]
        conversation, status, details = last[0], last[2], last[4]
        assert details["ids"], status  # a reply every turn, never "no room to generate"
        sent = tokenizer.decode(details["prompt_ids"])
        assert sent.endswith(f"### Instruction:\n{message}\n\n### Response:\n")
        assert len(details["prompt_ids"]) + min(40, 192 // 4) <= 192 or "left out" in status
        notes.append("oldest" in status and "left out of the prompt" in status)
        history = conversation
    assert notes[0] is False and notes[-1] is True
    assert len(history) == 8  # the page still shows every turn


def test_model_text_is_sent_escaped_so_the_page_shows_it_as_text(client, lm_dir, scripted_dir):  # noqa: F811
    from apps.web import shown, written

    load(client, scripted_dir)
    reply = chat(client, SCRIPTED_MESSAGE)[-1]
    assert reply[4]["stop"] == "eos" and reply_text(reply) == shown(SCRIPTED_REPLY)
    assert shown(SCRIPTED_REPLY) == "&lt;b&gt;x&lt;/b&gt; &lt;img src=x&gt;"

    load(client, lm_dir)
    message = "Show <b>x</b> & <img src=x>"
    first = chat(client, message)[-1]
    assert first[0][0]["content"][0]["text"] == "Show &lt;b&gt;x&lt;/b&gt; &amp; &lt;img src=x&gt;"
    assert written(shown(message)) == message
    # What the page hands back is read as the text it shows: the next prompt holds the message as written.
    second = chat(client, "again", first[0])[-1]
    assert message in load_for_app(lm_dir).tokenizer.decode(second[4]["prompt_ids"])


# ----------------------------------------------------------------------------- in a real browser


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not CHROMEDRIVER.is_file():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1500",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


# Records the assistant message's text at every change, to see the reply arrive piece by piece.
WATCH_REPLY = """
window.__replies = [];
const chat = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = chat.querySelectorAll('[data-testid="bot"]');
  if (bots.length) window.__replies.push(bots[bots.length - 1].innerText);
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""


def test_in_a_real_browser(server, browser, client, lm_dir, scripted_dir, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, outbound = server
    load(client, lm_dir)
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    assert str(lm_dir) in browser.find_element(By.ID, "model-header").text

    browser.execute_script(WATCH_REPLY)
    max_new = browser.find_element(By.CSS_SELECTOR, "input[aria-label='number input for Max new tokens']")
    max_new.clear()
    # Few enough that the turn, decoded and encoded again for Inspect, stays inside the 192 positions.
    max_new.send_keys("24", Keys.TAB)
    prompt.send_keys("Repeat the words: sun moon")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "Stopped" in d.find_element(By.ID, "chat-status").text)
    final = browser.execute_script(
        "const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]'); return b[b.length - 1].innerText;"
    ).strip()
    seen = [r.strip() for r in browser.execute_script("return window.__replies;")]
    partial = {r for r in seen if r and r != final}
    assert final and len(partial) >= 2, f"the reply did not stream: {seen}"
    assert all(final.startswith(r) for r in partial)
    assert "24 tokens" in browser.find_element(By.ID, "chat-status").text
    first_p = browser.find_element(By.CSS_SELECTOR, "#generated [data-testid='cell-0-2']").text
    assert 0 < float(first_p) <= 1  # the table of generated tokens filled in (its rows are virtualised)

    tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == "Inspect")
    tab.click()
    wait.until(lambda d: d.find_element(By.ID, "use-chat").is_displayed())
    browser.find_element(By.ID, "use-chat").click()
    wait.until(
        lambda d: "Repeat the words" in d.find_element(By.CSS_SELECTOR, "#inspect-text textarea").get_attribute("value")
    )
    browser.find_element(By.ID, "inspect").click()
    wait.until(lambda d: "tokens; attention" in d.find_element(By.ID, "inspect-status").text)
    heatmap = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#heatmap img"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", heatmap))
    assert heatmap.size["width"] > 100 and heatmap.size["height"] > 100
    assert len(browser.find_elements(By.CSS_SELECTOR, "#boundaries .tok")) > 10

    # A reply made of markup shows as the characters the model wrote: no bold, no image.
    chat_tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == "Chat")
    chat_tab.click()
    folder = browser.find_element(By.CSS_SELECTOR, "#model-folder input")
    folder.send_keys(Keys.CONTROL, "a")
    folder.send_keys(str(scripted_dir), Keys.ENTER)
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: f"Loaded {scripted_dir}" in d.find_element(By.ID, "load-status").text)
    browser.find_element(By.ID, "clear").click()
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys(SCRIPTED_MESSAGE)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "end-of-text" in d.find_element(By.ID, "chat-status").text)
    bots = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
    assert bots[-1].text.strip() == SCRIPTED_REPLY
    assert not bots[-1].find_elements(By.CSS_SELECTOR, "b, img")

    screenshot = tmp_path / "app.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")

    requested = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.add(message["params"]["request"]["url"])
    assert any(u.startswith(url) for u in requested)
    remote = {
        u for u in requested if urlparse(u).scheme not in {"data", "blob"} and urlparse(u).hostname not in LOCAL_HOSTS
    }
    assert not remote, f"the page asked for resources off this machine: {sorted(remote)}"
    assert outbound.read_text() == "", f"the server opened connections off this machine:\n{outbound.read_text()}"
