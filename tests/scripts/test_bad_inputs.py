"""Bad input to the eleven scripts: one row per case, each a non-zero exit with one clear line
naming the file/flag/value, no traceback, and the output folder as it was (nothing written,
nothing deleted). Every row stops before training, so each takes a fraction of a second
in-process (the scripts' `main(argv)`, which is what `python scripts/x.py` runs).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers.runs import listing, load_script, save_tiny_base, script_flags

SCRIPTS = (
    "pretrain",
    "sft",
    "dpo",
    "grpo",
    "classify",
    "evaluate",
    "train_tokenizer",
    "convert_gpt2",
    "export",
    "push_to_hub",
    "app",
)


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in SCRIPTS}


@dataclass
class World:
    """The files a row may point at, built once per module (`world`); rows never change them."""

    root: Path
    corpus: Path
    tokenizer: Path
    base: Path  # a MiniGPT LM folder with its tokenizer
    finished: Path  # a complete 10-step pretraining run with checkpoints at 5 and 10
    classes: Path  # a two-class classification JSONL
    small_tokenizer: Path  # 300 ids, fewer than the base model's 512


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus_file, tokenizer_dir, tiny_tokenizer, scripts) -> World:
    from tokenization import train_bpe

    root = tmp_path_factory.mktemp("bad_inputs")
    base = save_tiny_base(root / "base", tiny_tokenizer)
    small = root / "small_tokenizer"
    train_bpe([corpus_file.read_text()], 300, output_dir=small, show_progress=False)
    classes = root / "classes.jsonl"
    rows = [{"text": f"{word} number {i}", "label": word} for i in range(40) for word in ("cat", "dog")]
    classes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    finished = root / "finished"
    flags = script_flags(finished, corpus_file, tokenizer_dir, root / "cache", max_steps=10, eval_every=10)
    assert scripts["pretrain"].main([*flags, "--report_to", "none"]) == 0
    return World(root, corpus_file, tokenizer_dir, base, finished, classes, small)


def pretrain(world: World, out: Path, *extra: str, **overrides) -> list[str]:
    return [*script_flags(out, world.corpus, world.tokenizer, world.root / "cache", **overrides), *extra]


def fine_tune(world: World, out: Path, *extra: str) -> list[str]:
    return [
        "--model_path",
        str(world.base),
        "--output_dir",
        str(out / "run"),
        "--max_steps",
        "2",
        "--report_to",
        "none",
        *extra,
    ]


def sft(world: World, out: Path, *extra: str) -> list[str]:
    return [*fine_tune(world, out), "--num_train_tasks", "16", "--num_heldout_tasks", "4", *extra]


def dpo(world: World, out: Path, *extra: str) -> list[str]:
    return [*fine_tune(world, out), "--num_train_pairs", "16", "--num_heldout_pairs", "4", *extra]


def grpo(world: World, out: Path, *extra: str) -> list[str]:
    short = ["--task_kinds", "repeat", "longest", "--max_completion_length", "6", "--max_new_tokens", "6"]
    return [*fine_tune(world, out), "--num_train_tasks", "16", "--num_heldout_tasks", "4", *short, *extra]


def classify(world: World, out: Path, *extra: str) -> list[str]:
    return [*fine_tune(world, out), "--train_file", str(world.classes), *extra]


def evaluate(world: World, out: Path, *extra: str) -> list[str]:
    return ["--model", str(world.base), "--text-file", str(world.corpus), "--output_json", str(out / "r.json"), *extra]


def tokenizer(world: World, out: Path, *extra: str) -> list[str]:
    return ["--files", str(world.corpus), "--vocab_size", "300", "--output_dir", str(out), "--no_progress", *extra]


# ----------------------------------------------------------------------------- what a row may set up


def copy_of(source: Callable[[World], Path]) -> Callable[[World, Path], None]:
    """Setup: `out` becomes a copy of a folder of the world (e.g. the finished run)."""

    def setup(world: World, out: Path) -> None:
        shutil.rmtree(out)
        shutil.copytree(source(world), out)

    return setup


def finished_run_with(change: Callable[[Path], None]) -> Callable[[World, Path], None]:
    """Setup: `out` is a copy of the finished run, then `change(out)`."""

    def setup(world: World, out: Path) -> None:
        copy_of(lambda w: w.finished)(world, out)
        change(out)

    return setup


def model_folder_with(change: Callable[[Path], None]) -> Callable[[World, Path], None]:
    """Setup: `out/model` is a copy of the base model folder, then `change(out/model)`."""

    def setup(world: World, out: Path) -> None:
        shutil.copytree(world.base, out / "model")
        change(out / "model")

    return setup


def write(name: str, content: str | bytes) -> Callable[[World, Path], None]:
    def setup(world: World, out: Path) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return setup


def both(*setups: Callable[[World, Path], None]) -> Callable[[World, Path], None]:
    def setup(world: World, out: Path) -> None:
        for step in setups:
            step(world, out)

    return setup


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[:keep])

    return change


def edit_json(name: str, **values) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return change


def lock_by(pid: int, host: str | None = None) -> Callable[[World, Path], None]:
    def setup(world: World, out: Path) -> None:
        record = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}
        (out / "run.lock").write_text(json.dumps(record))

    return setup


def same_size_other_text(folder: Path) -> None:
    """The run's training file, edited in place at the same size (a copy the fingerprint points at)."""
    config = json.loads((folder / "run_config.json").read_text())
    corpus = Path(config["fingerprint"]["data"]["train_file"]["path"])
    edited = folder.parent / "edited.txt"
    text = corpus.read_text()
    edited.write_text(text[::-1])
    assert edited.stat().st_size == corpus.stat().st_size
    config["fingerprint"]["data"]["train_file"]["path"] = str(edited)
    (folder / "run_config.json").write_text(json.dumps(config))


def damage_checkpoints(*names: str) -> Callable[[Path], None]:
    """Truncate `names` in every checkpoint of the run."""

    def change(folder: Path) -> None:
        for checkpoint in (folder / "checkpoints").iterdir():
            for name in names:
                truncate(name, 10)(checkpoint)

    return change


def remote_code_folder(folder: Path) -> None:
    """A folder whose model exists only as code saved in it (auto_map), code that leaves a mark if run."""
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('x')\n")
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    edit_json("config.json", model_type="evil", auto_map=auto_map, architectures=None)(folder)


def pickled_weights_only(folder: Path) -> None:
    """The folder's weights as a pickled pytorch_model.bin (whose unpickling could run code), no safetensors."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def unchanged(folder: Path) -> None:
    """For `model_folder_with`: the copy as it is."""


def without_keys(name: str, *keys: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in keys}))

    return change


def then(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        for step in changes:
            step(folder)

    return change


def bert_config(folder: Path) -> None:
    """The MiniGPT folder's config claims to be a BERT (a type transformers knows, so no code is needed)."""
    then(edit_json("config.json", model_type="bert", architectures=None), without_keys("config.json", "auto_map"))(
        folder
    )


def classifier_folder(world: World, out: Path) -> None:
    """`out/model`: the base model saved as a two-class sequence classifier, with its tokenizer."""
    from transformers import AutoTokenizer

    from modeling_minigpt import MiniGPTForSequenceClassification

    model = MiniGPTForSequenceClassification.from_pretrained(world.base, num_labels=2)
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(world.base).save_pretrained(out / "model")


def link(name: str, target: Callable[[World, Path], Path]) -> Callable[[Path], None]:
    """For a setup: `out/<name>` becomes a symbolic link to `target(world, out)`."""

    def setup(world: World, out: Path) -> None:
        (out / name).symlink_to(target(world, out))

    return setup


def fifo(name: str) -> Callable[[World, Path], None]:
    def setup(world: World, out: Path) -> None:
        os.mkfifo(out / name)

    return setup


_HELD_SOCKETS: list[socket.socket] = []  # open until the module ends, so their ports stay busy


def busy_port(world: World, out: Path) -> None:
    """`out/port` names a port on 127.0.0.1 that another server is listening on."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    _HELD_SOCKETS.append(server)
    (out / "port").write_text(str(server.getsockname()[1]))


LATIN_1 = "caf\u00e9 cr\u00e8me".encode("latin-1")


def latin_1_jsonl(name: str, first: dict, second: dict) -> Callable[[World, Path], None]:
    """A JSONL file whose second line holds Latin-1 bytes (not UTF-8) inside the `second` record."""
    line = json.dumps(second).encode().replace(b"LATIN", LATIN_1)
    return write(name, json.dumps(first).encode() + b"\n" + line + b"\n")


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    script: str
    argv: Callable[[World, Path], list[str]]
    message: str  # must appear in the error output
    setup: Callable[[World, Path], None] | None = None
    code: int = 1
    env: dict[str, str] | None = None


def P(id, message, *extra, setup=None, env=None, **overrides):
    return Case(id, "pretrain", lambda w, o: pretrain(w, o, *extra, **overrides), message, setup, env=env)


def S(id, message, *extra, setup=None, model=None):
    def argv(w, o):
        flags = sft(w, o, *extra)
        return [*flags, "--model_path", str(o / "model")] if model else flags

    return Case(id, "sft", argv, message, setup)


def D(id, message, *extra, setup=None, model=None):
    def argv(w, o):
        flags = dpo(w, o, *extra)
        return [*flags, "--model_path", str(o / "model")] if model else flags

    return Case(id, "dpo", argv, message, setup)


def G(id, message, *extra, setup=None):
    return Case(id, "grpo", lambda w, o: grpo(w, o, *extra), message, setup)


def A(id, message, argv, setup=None):
    return Case(id, "app", argv, message, setup)


def C(id, message, *extra, setup=None, model=None):
    def argv(w, o):
        flags = classify(w, o, *extra)
        return [*flags, "--model_path", str(o / "model")] if model else flags

    return Case(id, "classify", argv, message, setup)


def E(id, message, *extra, setup=None, model=None):
    def argv(w, o):
        flags = evaluate(w, o, *extra)
        return [*flags, "--model", str(o / "model")] if model else flags

    return Case(id, "evaluate", argv, message, setup)


def T(id, message, *extra, setup=None):
    return Case(id, "train_tokenizer", lambda w, o: tokenizer(w, o / "tok", *extra), message, setup)


def V(id, message, argv, setup=None):
    return Case(id, "convert_gpt2", argv, message, setup)


def X(id, message, argv, setup=None):
    return Case(id, "export", argv, message, setup)


def H(id, message, argv, setup=None):
    return Case(id, "push_to_hub", argv, message, setup)


def yaml_file(text: str) -> Callable[[World, Path], list[str]]:
    """argv: a config file holding `text`, then the tiny run's flags, less those the file sets (flags win)."""

    def argv(w, o):
        (o.parent / f"{o.name}.yaml").write_text(text)
        flags, keys = pretrain(w, o), _yaml_keys(text)
        kept = [f for i, f in enumerate(flags) if f[2:] not in keys and flags[i - 1][2:] not in keys]
        return [str(o.parent / f"{o.name}.yaml"), *kept]

    return argv


def _yaml_keys(text: str) -> set[str]:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        return set()
    return set(values) if isinstance(values, dict) else set()


def two_folders(world: World, out: Path) -> None:
    """`out/texts`: a .txt file and a .gz file side by side."""
    (out / "texts").mkdir()
    (out / "texts" / "a.txt").write_text(world.corpus.read_text())
    (out / "texts" / "b.txt.gz").write_bytes(gzip.compress(b"more text " * 100))


LIVE = os.getppid()  # a process that surely runs while the test does

CASES = [
    # --- pretrain: flags out of range
    P("batch-0", "--per_device_batch_size must be >= 1, got 0", "--per_device_batch_size", "0"),
    P("warmup-negative", "--warmup_steps must be >= 0, got -1", "--warmup_steps", "-1"),
    P("weight-decay-negative", "--weight_decay must be >= 0, got -1", "--weight_decay", "-1.0"),
    P("max-grad-norm-negative", "--max_grad_norm must be >= 0, got -1", "--max_grad_norm", "-1.0"),
    P("beta1-1.5", "--adam_beta1 must be in [0, 1), got 1.5", "--adam_beta1", "1.5"),
    P("beta2-negative", "--adam_beta2 must be in [0, 1), got -0.1", "--adam_beta2", "-0.1"),
    P("lr-0", "--learning_rate must be > 0, got 0", "--learning_rate", "0.0"),
    P("min-lr-above-lr", "need 0 <= --min_learning_rate <= --learning_rate", "--min_learning_rate", "1.0"),
    P("seed-negative", "--seed must be in [0, 2**32), got -1", "--seed", "-1"),
    P("keep-last-0", "--keep_last must be >= 1, got 0", "--keep_last", "0"),
    P("max-time-0", "--max_time_seconds must be > 0", "--max_time_seconds", "0.0"),
    P("divergence-0", "--divergence_loss must be > 0", "--divergence_loss", "0.0"),
    P("validation-fraction-1.5", "--validation_fraction must be in [0, 1), got 1.5", "--validation_fraction", "1.5"),
    # --- pretrain: data and tokenizer
    P("train-file-missing", "nope.txt does not exist", train_file="/nonexistent/nope.txt"),
    P("tokenizer-missing", "no tokenizer at /nonexistent/tok", tokenizer_path="/nonexistent/tok"),
    P("vocab-size-mismatch", "300", "--vocab_size", "300"),
    P("batch-larger-than-data", "gives no batch", "--per_device_batch_size", "100000"),
    P(
        "characters-split-too-small",
        "its validation part (--split_by characters",
        validation_fraction=0.0005,
    ),
    Case(
        "mixed-txt-gz-folder",
        "pretrain",
        lambda w, o: pretrain(w, o / "run", train_file=str(o / "texts")),
        "mixes .txt files with 1 other file(s) (b.txt.gz)",
        two_folders,
    ),
    # --- pretrain: YAML values of the wrong type
    Case("yaml-float-batch", "pretrain", yaml_file("per_device_batch_size: 8.5\n"), "must be an integer, got 8.5"),
    Case("yaml-string-lr", "pretrain", yaml_file("learning_rate: fast\n"), "learning_rate must be a number"),
    Case("yaml-bool-as-string", "pretrain", yaml_file("resume: 3\n"), "resume must be true or false"),
    Case("yaml-unknown-key", "pretrain", yaml_file("learning_rat: 0.1\n"), "unknown keys ['learning_rat']"),
    Case("yaml-invalid", "pretrain", yaml_file("a: [1, 2\n"), "is not valid YAML"),
    Case("yaml-not-a-mapping", "pretrain", yaml_file("- 1\n- 2\n"), "must hold a mapping"),
    Case("yaml-bad-literal", "pretrain", yaml_file("split_by: words\n"), "split_by must be one of"),
    # --- pretrain: the output folder
    P("output-is-a-file", "exists and is not a folder", setup=write("x", "")),
    P("output-parent-is-a-file", "is a file, not a folder", setup=write("x", "")),
    P("folder-of-other-files", "it is not a run folder", setup=write("notes.txt", "mine")),
    P("run-without-resume", "already holds a run. Pass --resume", setup=copy_of(lambda w: w.finished)),
    Case(
        "resume-data-edited-same-size",
        "pretrain",
        lambda w, o: pretrain(w, o, "--resume", max_steps=10, eval_every=10, train_file=str(o.parent / "edited.txt")),
        "data.train_file.sha256: saved run has",
        finished_run_with(same_size_other_text),
    ),
    P(
        "resume-changed-lr",
        "learning_rate: saved run has 0.003, this run has 0.001",
        "--resume",
        max_steps=10,
        eval_every=10,
        learning_rate=1e-3,
        setup=copy_of(lambda w: w.finished),
    ),
    P(
        "resume-damaged-run-config",
        "run_config.json is damaged",
        "--resume",
        max_steps=10,
        eval_every=10,
        setup=finished_run_with(truncate("run_config.json", 20)),
    ),
    P(
        "resume-every-checkpoint-damaged",
        "no intact checkpoint",
        "--resume",
        max_steps=10,
        eval_every=10,
        setup=finished_run_with(damage_checkpoints("optimizer.pt")),
    ),
    P(
        "resume-damaged-marker",
        "checkpoint_complete.json is damaged",
        "--resume",
        max_steps=10,
        eval_every=10,
        setup=finished_run_with(damage_checkpoints("checkpoint_complete.json")),
    ),
    P(
        "overwrite-with-a-bad-batch-keeps-the-old-run",
        "gives no batch",
        "--overwrite",
        max_steps=10,
        eval_every=10,
        per_device_batch_size=100000,
        setup=copy_of(lambda w: w.finished),
    ),
    P(
        "overwrite-with-negative-warmup-keeps-the-old-run",
        "--warmup_steps must be >= 0",
        "--overwrite",
        "--warmup_steps",
        "-5",
        max_steps=10,
        eval_every=10,
        setup=copy_of(lambda w: w.finished),
    ),
    P("locked-by-a-live-run", f"in use by another run (pid {LIVE} on this host", setup=lock_by(LIVE)),
    P("locked-from-another-host", "locked by a run on host 'elsewhere'", setup=lock_by(1, "elsewhere")),
    P(
        "two-rank-0-writers",
        "the launcher started 2 processes (WORLD_SIZE=2)",
        env={"WORLD_SIZE": "2"},
    ),
    # --- sft
    S("model-path-missing", "--model_path /nonexistent does not exist", "--model_path", "/nonexistent"),
    S("model-without-config", "has no config.json", setup=write("model/x", ""), model=True),
    S(
        "model-config-not-json",
        "config.json is not valid JSON",
        setup=model_folder_with(lambda f: (f / "config.json").write_text("{")),
        model=True,
    ),
    S(
        "weights-zero-bytes",
        "model.safetensors is damaged: 0 bytes",
        setup=model_folder_with(truncate("model.safetensors", 0)),
        model=True,
    ),
    S(
        "weights-cut-short",
        "model.safetensors is damaged: cut short",
        setup=model_folder_with(
            lambda f: truncate("model.safetensors", f.joinpath("model.safetensors").stat().st_size - 100)(f)
        ),
        model=True,
    ),
    S(
        "only-a-pickled-bin",
        "has no *.safetensors weights (only pytorch_model.bin): only safetensors are loaded",
        setup=model_folder_with(pickled_weights_only),
        model=True,
    ),
    S(
        "remote-code-not-run",
        "pass --trust_remote_code to run that code",
        setup=model_folder_with(remote_code_folder),
        model=True,
    ),
    S(
        "smaller-tokenizer",
        "300",
        "--tokenizer_path",
        "SMALL",
    ),
    S("train-file-missing", "does not exist", "--train_file", "/nonexistent/sft.json"),
    S(
        "sft-bad-json-line",
        "line 2",
        "--train_file",
        "OUT/bad.jsonl",
        setup=write("bad.jsonl", '{"instruction": "a", "output": "b"}\n{not json\n'),
    ),
    S("sft-lr-negative", "--learning_rate must be > 0", "--learning_rate", "-1"),
    S("sft-max-grad-norm-negative", "--max_grad_norm must be >= 0", "--max_grad_norm", "-1"),
    # --- classify
    C(
        "one-class",
        "classification needs at least two classes",
        "--train_file",
        "OUT/one.jsonl",
        setup=write("one.jsonl", "".join(json.dumps({"text": f"t {i}", "label": "a"}) + "\n" for i in range(20))),
    ),
    C("train-file-missing", "does not exist", "--train_file", "/nonexistent/c.jsonl"),
    C("label-column-missing", "label", "--label_column", "nope"),
    C("weight-decay-negative", "--weight_decay must be >= 0", "--weight_decay", "-1"),
    C(
        "remote-code-not-run",
        "pass --trust_remote_code",
        setup=model_folder_with(remote_code_folder),
        model=True,
    ),
    C("model-path-missing", "does not exist", "--model_path", "/nonexistent"),
    # --- evaluate
    E("stride-0", "--stride must be >= 1", "--stride", "0"),
    E("context-0", "--context_length must be >= 1", "--context_length", "0"),
    E("batch-0", "--batch_size must be >= 1", "--batch_size", "0"),
    E("confidence-1.5", "--confidence must be between 0 and 1", "--confidence", "1.5"),
    E("bootstrap-negative", "--bootstrap must be >= 0", "--bootstrap", "-1"),
    E("model-missing", "--model /nonexistent does not exist", "--model", "/nonexistent"),
    E("smaller-tokenizer", "300", "--tokenizer", "SMALL"),
    E("text-file-missing", "does not exist", "--text-file", "/nonexistent/t.txt"),
    E("output-json-is-a-folder", "is a folder: give a file name", "--output_json", "OUT"),
    E(
        "remote-code-not-run",
        "pass --trust_remote_code",
        setup=model_folder_with(remote_code_folder),
        model=True,
    ),
    E(
        "weights-zero-bytes",
        "model.safetensors is damaged: 0 bytes",
        setup=model_folder_with(truncate("model.safetensors", 0)),
        model=True,
    ),
    # --- train_tokenizer
    T("vocab-too-small", "vocab_size=10 is too small", "--vocab_size", "10"),
    T("min-frequency-0", "min_frequency=0 must be at least 1", "--min_frequency", "0"),
    T("files-missing", "does not exist", "--files", "/nonexistent/a.txt"),
    T("files-and-dataset", "give --files or --dataset, not both", "--dataset", "x.jsonl"),
    T(
        "empty-corpus",
        "empty or whitespace-only",
        "--files",
        "OUT/empty.txt",
        setup=write("empty.txt", "   \n"),
    ),
    Case(
        "dataset-bad-jsonl-line",
        "train_tokenizer",
        lambda w, o: ["--dataset", str(o / "bad.jsonl"), "--vocab_size", "300", "--output_dir", str(o / "tok")],
        "bad.jsonl record 1 (line 2): invalid JSON",
        write("bad.jsonl", '{"text": "a"}\n{"text": \n'),
    ),
    # --- convert_gpt2
    V(
        "neither-direction",
        "give exactly one of --from_gpt2 FOLDER or --to_gpt2 FOLDER",
        lambda w, o: ["--out", str(o / "x")],
    ),
    V(
        "both-directions",
        "give exactly one of",
        lambda w, o: ["--out", str(o / "x"), "--from_gpt2", str(w.base), "--to_gpt2", str(w.base)],
    ),
    V(
        "source-missing",
        "--to_gpt2 /nonexistent does not exist",
        lambda w, o: ["--out", str(o / "x"), "--to_gpt2", "/nonexistent"],
    ),
    V(
        "out-not-empty",
        "is not empty: pass --overwrite",
        lambda w, o: ["--out", str(o), "--to_gpt2", str(w.base)],
        setup=write("keep.txt", "mine"),
    ),
    V(
        "from-gpt2-given-minigpt",
        "model_type",
        lambda w, o: ["--out", str(o / "x"), "--from_gpt2", str(w.base)],
    ),
    V(
        "damaged-weights",
        "model.safetensors is damaged",
        lambda w, o: ["--out", str(o / "x"), "--to_gpt2", str(o / "model")],
        setup=model_folder_with(truncate("model.safetensors", 0)),
    ),
    # --- push_to_hub
    H("folder-missing", "/nonexistent", lambda w, o: ["--folder", "/nonexistent", "--repo_id", "me/x"]),
    H(
        "repo-id-malformed",
        "repo id 'not a repo' must look like 'namespace/name'",
        lambda w, o: ["--folder", str(w.base), "--repo_id", "not a repo"],
    ),
    # ===== issue 26. Class 1: a push publishes only what is inside the folder (refused before any request:
    # no Hub runs here, so an attempt to send would end in "cannot reach")
    H(
        "link-to-a-file-outside",
        "notes.txt is a link to ../secret.txt, outside the folder to push: nothing was sent",
        lambda w, o: ["--folder", str(o / "model"), "--repo_id", "me/x"],
        setup=both(
            model_folder_with(unchanged),
            write("secret.txt", "s3cret"),
            link("model/notes.txt", lambda w, o: Path("../secret.txt")),
        ),
    ),
    H(
        "link-to-the-hub-token",
        "token is a link to",
        lambda w, o: ["--folder", str(o / "model"), "--repo_id", "me/x"],
        setup=both(
            model_folder_with(unchanged),
            write("hf/token", "hf_xxx"),
            link("model/token", lambda w, o: o / "hf" / "token"),
        ),
    ),
    H(
        "link-to-a-folder-outside",
        "plots is a link to",
        lambda w, o: ["--folder", str(o / "model"), "--repo_id", "me/x"],
        setup=both(model_folder_with(unchanged), link("model/plots", lambda w, o: w.root)),
    ),
    H(
        "fifo-in-the-folder",
        "is not a regular file or folder",
        lambda w, o: ["--folder", str(o / "model"), "--repo_id", "me/x"],
        setup=both(model_folder_with(unchanged), fifo("model/pipe")),
    ),
    # ----- Class 2: one rule for outputs (training.saved.outputs)
    E(
        "output-json-is-the-models-config",
        "lies inside --model",
        "--output_json",
        "OUT/model/config.json",
        model=True,
        setup=model_folder_with(unchanged),
    ),
    E(
        "output-json-is-the-models-config-with-overwrite",
        "lies inside --model",
        "--output_json",
        "OUT/model/config.json",
        "--overwrite",
        model=True,
        setup=model_folder_with(unchanged),
    ),
    E(
        "output-json-is-the-text-file-with-overwrite",
        "is --text_file",
        "--text-file",
        "OUT/t.txt",
        "--output_json",
        "OUT/t.txt",
        "--overwrite",
        setup=write("t.txt", "some text " * 50),
    ),
    E(
        "output-json-exists",
        "old.json exists: pass --overwrite",
        "--output_json",
        "OUT/old.json",
        setup=write("old.json", "{}"),
    ),
    Case(
        "output-dir-is-a-model-folder",
        "train_tokenizer",
        lambda w, o: tokenizer(w, o / "model"),
        "model is not empty: pass --overwrite",
        model_folder_with(unchanged),
    ),
    Case(
        "output-dir-contains-the-corpus-with-overwrite",
        "train_tokenizer",
        lambda w, o: [*tokenizer(w, o, "--overwrite"), "--files", str(o / "a.txt")],
        "contains --files",
        write("a.txt", "some text to train on " * 100),
    ),
    Case(
        "output-dir-contains-its-base-model-with-overwrite",
        "sft",
        lambda w, o: [*sft(w, o), "--model_path", str(o / "model"), "--output_dir", str(o), "--overwrite"],
        "contains --model_path",
        copy_of(lambda w: w.finished),
    ),
    S(
        "output-dir-inside-the-base-model",
        "lies inside --model_path",
        "--output_dir",
        "OUT/model/sft",
        model=True,
        setup=model_folder_with(unchanged),
    ),
    D(
        "output-dir-is-the-base-model-with-overwrite",
        "is --model_path",
        "--output_dir",
        "OUT/model",
        "--overwrite",
        model=True,
        setup=model_folder_with(unchanged),
    ),
    C(
        "output-dir-contains-the-train-file",
        "contains --train_file",
        "--train_file",
        "OUT/c.jsonl",
        "--output_dir",
        "OUT",
        setup=write("c.jsonl", "".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40))),
    ),
    Case(
        "output-dir-contains-the-tokenizer-with-overwrite",
        "pretrain",
        lambda w, o: pretrain(w, o, "--overwrite", tokenizer_path=str(o / "tok")),
        "contains --tokenizer_path",
        both(copy_of(lambda w: w.finished), lambda w, o: shutil.copytree(w.tokenizer, o / "tok")),
    ),
    V(
        "out-is-the-source-with-overwrite",
        "is --to_gpt2",
        lambda w, o: ["--out", str(o / "model"), "--to_gpt2", str(o / "model"), "--overwrite"],
        setup=model_folder_with(unchanged),
    ),
    V(
        "out-inside-the-source",
        "lies inside --to_gpt2",
        lambda w, o: ["--out", str(o / "model" / "gpt2"), "--to_gpt2", str(o / "model")],
        setup=model_folder_with(unchanged),
    ),
    X(
        "output-dir-is-the-model-with-overwrite",
        "/model is --model",
        lambda w, o: ["--model", str(o / "model"), "--output_dir", str(o / "model"), "--overwrite"],
        setup=model_folder_with(unchanged),
    ),
    X(
        "output-dir-not-empty",
        "is not empty: pass --overwrite",
        lambda w, o: ["--model", str(w.base), "--output_dir", str(o)],
        setup=write("keep.txt", "mine"),
    ),
    # ----- Class 3: a loaded folder is the model its config says, whole (training.saved.load.check_whole)
    E(
        "config-says-bert",
        "its weights are not the model its config.json describes",
        model=True,
        setup=model_folder_with(bert_config),
    ),
    D(
        "config-says-bert",
        "the training jobs train only gpt2 and minigpt folders",
        model=True,
        setup=model_folder_with(bert_config),
    ),
    E(
        "config-says-3-blocks-over-2",
        "tensors missing 16 (model.trf_blocks.2.",
        model=True,
        setup=model_folder_with(edit_json("config.json", n_layers=3)),
    ),
    D(
        "config-says-3-blocks-over-2",
        "tensors missing 16",
        model=True,
        setup=model_folder_with(edit_json("config.json", n_layers=3)),
    ),
    C(
        "config-says-1-block-over-2",
        "tensors unused 16 (model.trf_blocks.1.",
        model=True,
        setup=model_folder_with(edit_json("config.json", n_layers=1)),
    ),
    S(
        "weights-without-a-block",
        "tensors missing",
        model=True,
        setup=model_folder_with(lambda f: _drop_tensors(f, "model.trf_blocks.1.norm1.")),
    ),
    A(
        "config-says-3-blocks-over-2",
        "tensors missing 16",
        lambda w, o: ["--model", str(o / "model")],
        setup=model_folder_with(edit_json("config.json", n_layers=3)),
    ),
    D(
        "a-classifier-folder",
        "is a sequence classifier (MiniGPTForSequenceClassification), not a language model",
        model=True,
        setup=classifier_folder,
    ),
    S("a-classifier-folder", "is a sequence classifier", model=True, setup=classifier_folder),
    E("a-classifier-folder", "is a sequence classifier", model=True, setup=classifier_folder),
    V(
        "to-gpt2-pickle-only",
        "only safetensors are loaded",
        lambda w, o: ["--out", str(o / "x"), "--to_gpt2", str(o / "model")],
        setup=model_folder_with(pickled_weights_only),
    ),
    # ----- Class 4: every value checked where it is read, before the first byte is written
    P("context-length-1", "--context_length must be >= 2", "--context_length", "1"),
    P(
        "context-length-1-with-overwrite-keeps-the-old-run",
        "--context_length must be >= 2",
        "--overwrite",
        "--context_length",
        "1",
        max_steps=10,
        eval_every=10,
        setup=copy_of(lambda w: w.finished),
    ),
    Case(
        "yaml-lr-inf",
        "pretrain",
        yaml_file("learning_rate: .inf\n"),
        "--learning_rate must be a finite number, got inf",
    ),
    Case("yaml-lr-nan", "pretrain", yaml_file("learning_rate: .nan\n"), "got nan"),
    Case("yaml-divergence-inf", "pretrain", yaml_file("divergence_loss: .inf\n"), "--divergence_loss must be a finite"),
    P("max-time-nan", "--max_time_seconds must be a finite number, got nan", "--max_time_seconds", "nan"),
    P("max-grad-norm-inf", "--max_grad_norm must be a finite number", "--max_grad_norm", "inf"),
    P(
        "accumulation-beyond-the-data",
        "--gradient_accumulation_steps 1,000,000 needs 1,000,000 batches",
        "--gradient_accumulation_steps",
        "1000000",
    ),
    S("accumulation-beyond-the-data", "use at most 2", "--gradient_accumulation_steps", "3"),
    S(
        "max-new-tokens-beyond-the-context",
        "--max_new_tokens must be in [1, 191] for the model's 192-token context",
        "--max_new_tokens",
        "300",
    ),
    D("max-new-tokens-beyond-the-context", "--max_new_tokens must be in [1, 191]", "--max_new_tokens", "192"),
    C("max-length-negative", "--max_length must be >= 1", "--max_length", "-5"),
    S("max-length-0", "--max_length must be >= 1", "--max_length", "0"),
    S("beta1-nan", "got nan", "--adam_beta1", "nan"),
    D("beta-inf", "--beta must be a finite number", "--beta", "inf"),
    G("reward-module-missing", "no module named 'no_such_module'", "--reward_functions", "no_such_module:f"),
    G("reward-unknown", "unknown reward function 'nonsense'", "--reward_functions", "nonsense"),
    G("group-of-one", "--num_generations must be >= 2", "--num_generations", "1"),
    G(
        "completion-fills-the-context",
        "--max_completion_length must be in [1, 191] for the model's 192-token context",
        "--max_completion_length",
        "192",
    ),
    G(
        "prompts-longer-than-the-context",
        "longer than the",
        "--task_kinds",
        "extract",
        "--max_completion_length",
        "150",
    ),
    G("temperature-0", "--temperature must be > 0", "--temperature", "0"),
    E("confidence-nan", "--confidence must be between 0 and 1", "--confidence", "nan"),
    T("vocab-size-10**12", "vocab_size=1,000,000,000,000 cannot be built here", "--vocab_size", str(10**12)),
    P("tokenizer-vocab-size-10**12", "cannot be built here", tokenizer_path=None, tokenizer_vocab_size=10**12),
    A("port-out-of-range", "--port must be in [1, 65535]", lambda w, o: ["--model", str(w.base), "--port", "70000"]),
    # ----- Class 5: no raw error; file and line named for every bad record
    D(
        "every-pair-identical",
        "no preference pair of the",
        "--train_file",
        "OUT/same.jsonl",
        setup=write(
            "same.jsonl",
            "".join(json.dumps({"instruction": f"q{i}", "chosen": "a", "rejected": "a"}) + "\n" for i in range(20)),
        ),
    ),
    S("every-prompt-too-long", "no instruction example is left", "--max_length", "4"),
    A(
        "busy-port",
        "Address already in use",
        lambda w, o: ["--model", str(w.base), "--port", (o / "port").read_text()],
        setup=busy_port,
    ),
    C(
        "latin-1-jsonl",
        "latin.jsonl: not valid UTF-8 at byte offset",
        "--train_file",
        "OUT/latin.jsonl",
        setup=latin_1_jsonl("latin.jsonl", {"text": "a", "label": "x"}, {"text": "LATIN", "label": "y"}),
    ),
    C(
        "latin-1-jsonl-names-the-line",
        "(line 2)",
        "--train_file",
        "OUT/latin.jsonl",
        setup=latin_1_jsonl("latin.jsonl", {"text": "a", "label": "x"}, {"text": "LATIN", "label": "y"}),
    ),
    S(
        "latin-1-jsonl",
        "(line 2)",
        "--train_file",
        "OUT/latin.jsonl",
        setup=latin_1_jsonl(
            "latin.jsonl", {"instruction": "a", "output": "b"}, {"instruction": "LATIN", "output": "b"}
        ),
    ),
    D(
        "latin-1-json",
        "(line 2)",
        "--train_file",
        "OUT/latin.json",
        setup=write(
            "latin.json",
            b'[{"instruction": "a", "chosen": "b", "rejected": "c"},\n{"instruction": "'
            + LATIN_1
            + b'", "chosen": "b", "rejected": "c"}]',
        ),
    ),
    Case(
        "dataset-latin-1-jsonl",
        "train_tokenizer",
        lambda w, o: ["--dataset", str(o / "latin.jsonl"), "--vocab_size", "300", "--output_dir", str(o / "tok")],
        "(line 2)",
        latin_1_jsonl("latin.jsonl", {"text": "a"}, {"text": "LATIN"}),
    ),
    Case(
        "cache-dir-is-a-file",
        "pretrain",
        lambda w, o: pretrain(w, o / "run", cache_dir=str(o / "cache")),
        "a file is in the way where a folder is needed",
        write("cache", ""),
    ),
]


def _drop_tensors(folder: Path, prefix: str) -> None:
    """The folder's weights without the tensors whose names start with `prefix` (saved again as safetensors)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(prefix)}
    save_file(tensors, path, metadata={"format": "pt"})


def _resolve(argv: list[str], world: World, out: Path) -> list[str]:
    return [
        str(out) if a == "OUT" else str(world.small_tokenizer) if a == "SMALL" else a.replace("OUT/", f"{out}/")
        for a in argv
    ]


def run_main(module, argv: list[str]) -> int:
    """What `python scripts/<name>.py argv` exits with."""
    try:
        return module.main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


@pytest.mark.parametrize("case", CASES, ids=[f"{c.script}-{c.id}" for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, world, scripts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if case.setup is not None:
        case.setup(world, out)
    argv = _resolve(case.argv(world, out), world, out)
    if case.id == "output-is-a-file":
        argv[argv.index("--output_dir") + 1] = str(out / "x")
    if case.id == "output-parent-is-a-file":
        argv[argv.index("--output_dir") + 1] = str(out / "x" / "run")
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    if case.script == "app":  # a check that fails to refuse would start the server and wait forever
        import gradio

        def started(*args, **kwargs):
            raise AssertionError("the app started its server instead of refusing")

        monkeypatch.setattr(gradio.Blocks, "launch", started)
    before = listing(tmp_path)
    code = run_main(scripts[case.script], argv)
    captured = capsys.readouterr()
    assert code == case.code, captured.out[-2000:] + captured.err[-2000:]
    assert case.message in captured.err, captured.err[-2000:]
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith(("error:", "minigpt-app: error:"))]
    assert len(errors) == 1 or case.code == 2, captured.err
    assert listing(tmp_path) == before, "a refused run must leave the folder as it was"
    assert not (out / "model" / "RAN").exists(), "code saved in a folder ran"


@pytest.mark.parametrize("name", [*SCRIPTS, "quickstart_report"])
@pytest.mark.parametrize("flags", [["--no_such_flag", "1"], ["--max_steps", "ten"]], ids=["unknown", "malformed"])
def test_every_script_refuses_a_bad_flag_in_one_error_line(name, flags, capsys):
    """An unknown flag or a value of the wrong type: argparse's refusal, as one line and exit code 1."""
    assert run_main(load_script(name), flags) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(("error: ", "minigpt-app: error: ")), err
    assert "usage:" not in err and "Traceback" not in err, err
