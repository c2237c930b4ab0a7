"""training/saved/save.py: a saved folder and the way to the Hub, with the real `huggingface_hub` client and a
Hub-compatible server.

No Hub is reachable from CI, so `tests/helpers/hub_server.py` serves the Hub API on 127.0.0.1 for the
lifetime of this module. Pushes and loads run in fresh processes with `HF_ENDPOINT` pointing at
it (the client reads it at import) and an empty `HF_HOME`, exactly as a user's would.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.hub_server import HubServer
from helpers.models import tiny_config
from helpers.runs import REPO_ROOT
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.files import WriteError
from training.run.lora import LoraArguments, apply_lora
from training.saved.card import LOCAL_MODEL_ID, write_model_card
from training.saved.hub import RUN_ONLY_PATTERNS, files_to_push, push_folder
from training.saved.save import save_finetuned, save_model_folder

PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"


FAKE_TOKEN = "hf_FAKEtoken1234567890"


WRONG_TOKEN = "hf_FAKEwrongToken0987654321"


PROMPT = "The return statement"


# Files a user needs from a run folder; the checkpoint written into the fixture must stay behind.
EXPECTED_FILES = {
    ".gitattributes",
    "README.md",
    "attention.py",
    "chat_template.jinja",
    "config.json",
    "configuration_minigpt.py",
    "generation_config.json",
    "linear.py",
    "loss_curve.png",
    "model.safetensors",
    "modeling_minigpt.py",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=FAKE_TOKEN) as server:
        yield server


@pytest.fixture
def api(hub, monkeypatch) -> HfApi:
    """An in-process client for checking what the server holds (offline mode would block even localhost)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return HfApi(endpoint=hub.url, token=FAKE_TOKEN)


@pytest.fixture(scope="module")
def model_folder(tiny_tokenizer, tmp_path_factory) -> Path:
    """A run folder as a training script leaves it: model, tokenizer, card, loss curve, a checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = tmp_path_factory.mktemp("run") / "minigpt-tiny"
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        n_layers=2,
        emb_dim=32,
        n_heads=2,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    MiniGPTForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([3.0, 2.5, 2.2])
    fig.savefig(folder / "loss_curve.png")
    plt.close(fig)
    write_model_card(
        folder,
        config=config,
        training_info=dict(
            preset="tiny",
            data="untrained: random weights",
            tokens_seen=0,
            steps=0,
            schedule="none",
            wall_time_seconds=0.0,
            hardware="CPU",
        ),
        eval_results=dict(dataset_name="pydoc topics", perplexity=512.3, perplexity_ci=(500.1, 530.2)),
    )  # no repo_id, as the training jobs write it: the usage example names a placeholder until pushed
    (folder / "checkpoints" / "step_1").mkdir(parents=True)
    (folder / "checkpoints" / "step_1" / "optimizer.bin").write_bytes(b"optimizer state")
    return folder


def hub_env(hub: HubServer, hf_home: Path, token: str | None = FAKE_TOKEN) -> dict[str, str]:
    """Environment of a fresh process that talks to `hub` with an empty cache and `token` in HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_push(folder: Path, repo_id: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PUSH_SCRIPT), "--folder", str(folder), "--repo-id", repo_id, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pushed_repo(hub, model_folder, tmp_path_factory) -> str:
    """The fixture folder pushed once with the script; later pushes compare against this state."""
    repo_id = "test-user/minigpt-tiny"
    result = run_push(model_folder, repo_id, env=hub_env(hub, tmp_path_factory.mktemp("hf_home")))
    assert result.returncode == 0, result.stderr
    assert f"Pushed {repo_id}@main, now matching the folder's {len(EXPECTED_FILES) - 1} files" in result.stdout
    return repo_id


def model_outputs(model_id: str, prompt: str) -> dict:
    """Logits, greedy ids and pipeline text of `model_id` on `prompt`, loaded the way the model card says.

    Runs both in this process (on the local folder) and, via its source, in a fresh process (on the
    Hub repo), so the two sides cannot drift apart.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    generator = pipeline("text-generation", model=model_id, trust_remote_code=True)
    text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    return {"logits": logits, "generated": generated, "text": text, "module": type(model).__module__}


@pytest.mark.slow
def test_fresh_process_loads_the_pushed_model_with_identical_outputs(hub, pushed_repo, model_folder, api, tmp_path):
    assert set(api.list_repo_files(pushed_repo)) == EXPECTED_FILES

    hf_home = tmp_path / "empty_hf_home"
    out = tmp_path / "hub_outputs.pt"
    call = f"torch.save(model_outputs({pushed_repo!r}, {PROMPT!r}), {str(out)!r})"
    code = f"{inspect.getsource(model_outputs)}\nimport torch\n{call}\n"
    env = hub_env(hub, hf_home, token=None)
    env.pop("PYTHONPATH")  # MiniGPT's code must come from the repo, not from this checkout
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

    from_hub = torch.load(out)
    local = model_outputs(str(model_folder), PROMPT)
    assert from_hub["module"].startswith("transformers_modules")  # the repo's own modeling code ran
    assert torch.equal(from_hub["logits"], local["logits"])
    assert torch.equal(from_hub["generated"], local["generated"])
    assert from_hub["generated"].shape[1] > local["logits"].shape[1]
    assert from_hub["text"] == local["text"]
    assert from_hub["text"].startswith(PROMPT)


def test_the_pushed_card_loads_the_repo_and_the_local_one_is_untouched(hub, pushed_repo, model_folder, tmp_path):
    local = (model_folder / "README.md").read_text()
    pushed = Path(hf_hub_download(pushed_repo, "README.md", endpoint=hub.url, cache_dir=tmp_path)).read_text()
    assert f'model_id = "{pushed_repo}"' in pushed and LOCAL_MODEL_ID not in pushed
    assert f'model_id = "{LOCAL_MODEL_ID}"' in local
    assert len([a for a, b in zip(local.splitlines(), pushed.splitlines(), strict=True) if a != b]) == 1


def test_second_push_of_unchanged_folder_uploads_nothing(hub, pushed_repo, model_folder, api, tmp_path):
    commits_before = api.list_repo_commits(pushed_repo)
    commit_posts_before = len(hub.commit_requests())

    result = run_push(model_folder, pushed_repo, env=hub_env(hub, tmp_path / "hf_home"))

    assert result.returncode == 0, result.stderr
    assert f"No changes: {pushed_repo}@main" in result.stdout
    assert len(hub.commit_requests()) == commit_posts_before
    assert api.list_repo_commits(pushed_repo) == commits_before

    # Changing one file commits that file alone: the weights are not sent again.
    changed = tmp_path / "changed"
    shutil.copytree(model_folder, changed)
    with open(changed / "README.md", "a") as f:
        f.write("\nOne more line.\n")
    pushed = push_folder(changed, pushed_repo, commit_message="Edit card", endpoint=hub.url, token=FAKE_TOKEN)

    assert pushed.changed
    assert len(hub.commit_requests()) == commit_posts_before + 1
    assert hub.commit_requests()[-1].body_bytes < (model_folder / "model.safetensors").stat().st_size
    commits = api.list_repo_commits(pushed_repo)
    assert [c.title for c in commits[:2]] == ["Edit card", commits_before[0].title]
    card = hf_hub_download(pushed_repo, "README.md", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(card).read_text().endswith("One more line.\n")


@pytest.mark.parametrize(
    "case, token_env, saved_login, args, expect_ok, expect_in_output",
    [
        ("HF_TOKEN, verbose", FAKE_TOKEN, None, ["--verbose"], True, "token: HF_TOKEN"),
        ("saved login", None, FAKE_TOKEN, [], True, "token: saved login"),
        ("--token", None, None, ["--token", FAKE_TOKEN, "--verbose"], True, "token: --token"),
        ("rejected token, verbose", WRONG_TOKEN, None, ["--verbose"], False, "401"),
    ],
)
def test_token_never_appears_in_output_or_files(
    hub, model_folder, api, tmp_path, case, token_env, saved_login, args, expect_ok, expect_in_output
):
    hf_home = tmp_path / "hf_home"
    if saved_login:
        hf_home.mkdir()
        (hf_home / "token").write_text(saved_login)  # where `hf auth login` saves it
    repo_id = f"test-user/token-{case.split(',')[0].replace(' ', '-').strip('-')}"
    result = run_push(model_folder, repo_id, *args, env=hub_env(hub, hf_home, token=token_env))

    assert (result.returncode == 0) == expect_ok, result.stderr
    output = result.stdout + result.stderr
    assert expect_in_output in output
    secret = token_env or saved_login or FAKE_TOKEN
    assert secret not in output
    for path in hf_home.rglob("*"):
        if path.is_file() and path != hf_home / "token":
            assert secret.encode() not in path.read_bytes(), path
    if expect_ok:
        assert set(api.list_repo_files(repo_id)) == EXPECTED_FILES
        for blob in hub.store.blob_dir.iterdir():
            assert FAKE_TOKEN.encode() not in blob.read_bytes()
    else:
        assert "Invalid credentials" in result.stderr
        assert "Traceback" not in result.stderr


def test_private_push_to_a_new_branch(hub, model_folder, api):
    repo_id = "test-user/private-branch"
    pushed = push_folder(model_folder, repo_id, private=True, revision="dev", endpoint=hub.url, token=FAKE_TOKEN)

    assert pushed.changed and pushed.revision == "dev"
    assert api.repo_info(repo_id).private is True
    assert set(api.list_repo_files(repo_id, revision="dev")) == EXPECTED_FILES
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # main is untouched
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).repo_info(repo_id)  # strangers do not see it

    # Asking for privacy on an existing public repo is refused rather than publishing.
    push_folder(model_folder, "test-user/minigpt-public", endpoint=hub.url, token=FAKE_TOKEN)
    with pytest.raises(ValueError, match="already exists and is public"):
        push_folder(model_folder, "test-user/minigpt-public", private=True, endpoint=hub.url, token=FAKE_TOKEN)


def test_missing_repo_revision_or_file_raise_the_clients_errors(hub, pushed_repo, model_folder, api, tmp_path):
    result = run_push(model_folder, "test-user/does-not-exist", "--no-create", env=hub_env(hub, tmp_path / "hf_home"))
    assert result.returncode == 1
    assert "error: RepositoryNotFoundError: 404 Client Error." in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(RevisionNotFoundError):
        push_folder(
            model_folder, pushed_repo, create=False, revision="no-such-branch", endpoint=hub.url, token=FAKE_TOKEN
        )

    download = dict(endpoint=hub.url, cache_dir=tmp_path / "cache", token=FAKE_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/does-not-exist", "config.json", **download)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(pushed_repo, "config.json", revision="no-such-branch", **download)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(pushed_repo, "no-such-file.json", **download)


def test_bad_inputs_fail_before_any_request(hub, model_folder, api, tmp_path):
    requests_before = len(hub.requests)
    result = run_push(tmp_path / "nowhere", "test-user/x", env=hub_env(hub, tmp_path / "hf_home"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: folder to push {tmp_path / 'nowhere'} does not exist")
    with pytest.raises(ValueError, match="'namespace/name'"):
        push_folder(model_folder, "no-namespace", endpoint=hub.url, token=FAKE_TOKEN)
    with pytest.raises(ValueError, match="no config.json"):
        push_folder(tmp_path, "test-user/x", endpoint=hub.url, token=FAKE_TOKEN)
    assert len(hub.requests) == requests_before


@pytest.mark.parametrize("kind", ["link-to-a-file-outside", "link-to-a-folder-outside", "fifo"])
def test_nothing_outside_the_folder_is_published(kind, hub, model_folder, api, tmp_path):
    """A link leaving the folder (the client would upload its target: a secret, the Hub token) or a
    special file is refused by name before any request; a link that stays inside is pushed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    (folder / "card_copy.md").symlink_to("README.md")  # inside the folder: fine
    offending = folder / ("plots" if kind == "link-to-a-folder-outside" else "notes.txt")
    if kind == "fifo":
        os.mkfifo(offending)
    else:
        offending.symlink_to(secret if kind == "link-to-a-file-outside" else tmp_path)
    requests_before = len(hub.requests)
    with pytest.raises(ValueError, match=f"{offending} is (a link to|not a regular file).*nothing was sent"):
        push_folder(folder, "test-user/leak", endpoint=hub.url, token=FAKE_TOKEN)
    assert len(hub.requests) == requests_before
    offending.unlink()
    push_folder(folder, "test-user/leak", endpoint=hub.url, token=FAKE_TOKEN)
    assert "card_copy.md" in {e.path for e in api.list_repo_tree("test-user/leak")}


def test_tree_and_paths_info_list_folders_like_the_hub(hub, api):
    repo_id = "test-user/tree"
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"abc", path_in_repo="plots/run1/loss.png", repo_id=repo_id)

    top = {(e.path, type(e).__name__) for e in api.list_repo_tree(repo_id)}
    assert top == {(".gitattributes", "RepoFile"), ("plots", "RepoFolder")}
    everything = {e.path for e in api.list_repo_tree(repo_id, recursive=True)}
    assert everything == {".gitattributes", "plots", "plots/run1", "plots/run1/loss.png"}
    [info] = api.get_paths_info(repo_id, ["plots/run1/loss.png", "missing.txt"])
    assert (info.path, info.size) == ("plots/run1/loss.png", 3)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="nowhere"))


def test_run_only_files_are_not_pushed(model_folder):
    files = files_to_push(model_folder)
    assert "checkpoints/step_1/optimizer.bin" not in files
    assert set(files) == EXPECTED_FILES - {".gitattributes"}
    assert "checkpoints/step_1/optimizer.bin" in files_to_push(model_folder, ignore_patterns=[])
    assert RUN_ONLY_PATTERNS[0] == "checkpoints/*"


@pytest.mark.slow
def test_model_and_tokenizer_push_to_hub(hub, tiny_tokenizer, api, tmp_path):
    """`model.push_to_hub` (inherited from PreTrainedModel) reaches the same Hub, code files included."""
    code = textwrap.dedent(
        f"""
        from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
        from transformers import AutoTokenizer
        config = MiniGPTConfig.from_preset("tiny", vocab_size=512, n_layers=2, emb_dim=32, n_heads=2)
        MiniGPTForCausalLM(config).push_to_hub("test-user/from-python")
        AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r}).push_to_hub("test-user/from-python")
        """
    )
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    env = hub_env(hub, tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    files = set(api.list_repo_files("test-user/from-python"))
    assert {
        "config.json",
        "model.safetensors",
        "modeling_minigpt.py",
        "attention.py",
        "linear.py",
        "tokenizer.json",
    } <= files
    assert FAKE_TOKEN not in result.stdout + result.stderr


FRESH_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
torch.save({"logits": model(input_ids=ids).logits.detach(), "module": type(model).__module__,
            "has_template": tok.chat_template is not None}, sys.argv[3])
"""


def test_save_finetuned_writes_adapter_and_a_merged_folder_that_loads_fresh(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tiny_tokenizer))
    base_dir = tmp_path / "base"
    MiniGPTForCausalLM(config).save_pretrained(base_dir)
    base = MiniGPTForCausalLM.from_pretrained(base_dir).eval()
    model = apply_lora(base, LoraArguments(lora_r=4, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    merged = save_finetuned(model, tiny_tokenizer, tmp_path / "model", tmp_path / "adapter")
    assert type(merged) is MiniGPTForCausalLM
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(
        os.listdir(tmp_path / "adapter")
    )
    assert {
        "config.json",
        "modeling_minigpt.py",
        "attention.py",
        "linear.py",
        "configuration_minigpt.py",
        "chat_template.jinja",
    } <= set(os.listdir(tmp_path / "model"))

    # The adapter alone, on a freshly loaded base.
    reloaded = PeftModel.from_pretrained(MiniGPTForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    # The merged folder in a fresh process, from its own code (the repo is not importable there).
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.") and out["has_template"]
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)


def test_a_full_disk_in_the_weights_writer_is_one_line_and_leaves_the_old_folder(tmp_path, tiny_tokenizer, monkeypatch):
    """safetensors reports a full disk as a SafetensorError (not an OSError): the save names the
    folder and what to do, and leaves neither a half-built folder nor a changed old one."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from training.cli import describe_error

    model = MiniGPTForCausalLM(tiny_config(vocab_size=len(tiny_tokenizer)))
    folder = save_model_folder(model, tmp_path / "model", tiny_tokenizer)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(WriteError) as failure:
        save_model_folder(model, folder, tiny_tokenizer)
    assert describe_error(failure.value).startswith("no space left on device writing ")
    assert "free some space" in describe_error(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
