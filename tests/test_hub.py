"""The Hub round trip against the real ``huggingface_hub`` client and a Hub look-alike on 127.0.0.1.

A plain tiny Transformers repo is loaded with ``from_pretrained("org/tiny")`` (exported once,
then loaded offline from the cache), pushed with ``push_to_hub`` and loaded back in fresh processes
without export; revisions, subfolders, pull requests, failing uploads and token hygiene are checked
on the way. Every Hub call runs in a subprocess whose ``HF_ENDPOINT`` points at
:class:`fake_hub.FakeHub` (huggingface_hub reads it at import), with its own ``HF_HOME`` and
et_transformers cache. ``save_pretrained`` -> ``from_pretrained(folder)`` runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from et_transformers import ETModelForCausalLM, InvalidConfigError, ProgramError
from et_transformers.cache import ArtifactCache
from et_transformers.model_card import QUALITY_MARKERS, CardData
from fake_hub import FakeHub

TOKEN = "hf_fakeSECRETtoken0123456789abcdef"  # must never show up in logs, errors or cards
PROMPT = [[5, 9, 100, 7]]
LOAD_OPTIONS = {"recipe": "xnnpack-fp32", "max_seq_len": 64}

PRELUDE = """
import json, logging, sys, traceback
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import torch
from et_transformers import ETModelForCausalLM, HubError, ModelNotFoundError
args = json.loads(ARGS)
TOKEN = args["token"]
out = {}

def greedy(model):
    return model.generate(torch.tensor(args["prompt"]), max_new_tokens=8, do_sample=False)[0].tolist()

def export_stack():
    return sorted(k for k in sys.modules if k.startswith(("executorch.exir", "torchao", "et_transformers.export")))

def error_of(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": str(e), "traceback": "".join(traceback.format_exception(e))}
    return None
"""


def run_script(body: str, env: dict, **args) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``PRELUDE + body`` in a fresh interpreter; return the JSON it prints last, and the process."""
    args = {"token": TOKEN, "prompt": PROMPT, "load": LOAD_OPTIONS, **args}
    code = f"ARGS = {json.dumps(args)!r}\n{PRELUDE}\n{body}\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert TOKEN not in proc.stdout + proc.stderr, "the token leaked into the output or logs"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def hub_env(hub: FakeHub, root: Path, **extra: str) -> dict:
    """The environment of a process using ``hub``: its own HF_HOME and cache under ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(root / "hf-home"),
        ET_TRANSFORMERS_CACHE=str(root / "et-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DEBUG="1",  # huggingface_hub logs every request as a curl command: the token must not be in it
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub(tmp_path_factory.mktemp("fake-hub"), token=TOKEN) as server:
        yield server
    assert server.unhandled == [], f"the client called endpoints the fake hub lacks: {server.unhandled}"


@pytest.fixture(scope="module")
def tiny_repo(hub, tiny_llama_dir) -> str:
    """``org/tiny``: a plain Transformers repo (plus a README and a pickle we must never fetch)."""
    files = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: mit\n---\n# tiny\n"
    files["pytorch_model.bin"] = b"a pickle et_transformers must never download"
    return hub.commit("org/tiny", files)


@pytest.fixture(scope="module")
def first_run(hub, tiny_repo, tmp_path_factory) -> dict:
    """Process 1: from_pretrained("org/tiny") exports; then push_to_hub("user/tiny-et", private)."""
    root = tmp_path_factory.mktemp("first-run")
    body = """
model = ETModelForCausalLM.from_pretrained("org/tiny", **args["load"])
out["exported"] = model.stats.export_time is not None
out["tokens"] = greedy(model)
out["source"] = model.manifest.source
info = model.push_to_hub("user/tiny-et", token=TOKEN, private=True, card={"license": "mit"})
out["commit"] = info.oid
out["commit_url"] = str(info)
"""
    result, proc = run_script(body, hub_env(hub, root))
    return {**result, "root": root, "downloads": hub.downloads("org/tiny"),
            "commits": len(hub.repos["user/tiny-et"].commits)}


# -- (a) a plain repo: download only what is needed, export once, then offline from the cache ---------


def test_plain_repo_downloads_only_what_it_needs_and_exports(first_run, tiny_repo):
    assert first_run["exported"]
    assert first_run["source"] == {"repo_id": "org/tiny", "revision": tiny_repo, "subfolder": None}
    downloaded = set(first_run["downloads"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= downloaded
    assert "pytorch_model.bin" not in downloaded and "README.md" not in downloaded


def test_offline_second_process_loads_from_the_cache(hub, first_run):
    before = len(hub.requests)
    body = """
model = ETModelForCausalLM.from_pretrained("org/tiny", **args["load"])
out["exported"] = model.stats.export_time is not None
out["tokens"] = greedy(model)
"""
    result, _ = run_script(body, hub_env(hub, first_run["root"], HF_HUB_OFFLINE="1"))
    assert not result["exported"]
    assert result["tokens"] == first_run["tokens"]
    assert len(hub.requests) == before, "an offline load talked to the Hub"


# -- (b) push, then load the pushed program in a fresh process -----------------------------------------


def test_push_makes_one_commit_with_a_complete_folder(hub, first_run, tiny_repo):
    repo = hub.repos["user/tiny-et"]
    assert repo.private
    assert repo.branches["main"] == first_run["commit"]
    assert first_run["commits"] == 2  # the repository's initial commit, then ours
    files = hub.files("user/tiny-et")
    assert {"model.pte", "manifest.json", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", ".gitattributes"} <= set(files)
    manifest = json.loads(files["manifest.json"])
    assert manifest["pte_sha256"] == hashlib.sha256(files["model.pte"]).hexdigest()
    assert manifest["source"] == {"repo_id": "org/tiny", "revision": tiny_repo, "subfolder": None}
    assert manifest["versions"]["executorch"]
    card = files["README.md"].decode()
    front = _front_matter(card)
    assert front["library_name"] == "et_transformers" and "executorch" in front["tags"]
    assert front["base_model"] == "org/tiny" and front["license"] == "mit"
    assert front["quantization"]["recipe"] == "xnnpack-fp32"
    assert 'from_pretrained("user/tiny-et")' in card and "llama_main" in card
    assert all(TOKEN.encode() not in data for data in files.values())


def test_pushed_program_loads_in_a_fresh_process_without_export(hub, first_run, tmp_path):
    body = """
model = ETModelForCausalLM.from_pretrained("user/tiny-et", token=TOKEN)
out["exported"] = model.stats.export_time is not None
out["tokens"] = greedy(model)
out["export_stack"] = export_stack()
out["private_without_token"] = error_of(lambda: ETModelForCausalLM.from_pretrained("user/tiny-et", token=False))
"""
    result, _ = run_script(body, hub_env(hub, tmp_path))
    assert not result["exported"] and result["export_stack"] == []
    assert result["tokens"] == first_run["tokens"]
    assert result["private_without_token"]["type"] == "ModelNotFoundError"
    # ... and offline, from the download cache: no request at all.
    before = len(hub.requests)
    offline_body = """
model = ETModelForCausalLM.from_pretrained("user/tiny-et")
out["exported"] = model.stats.export_time is not None
out["tokens"] = greedy(model)
"""
    offline, _ = run_script(offline_body, hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    assert not offline["exported"] and offline["tokens"] == first_run["tokens"]
    assert len(hub.requests) == before


def test_revisions_subfolders_pull_requests_and_errors(hub, first_run, tmp_path):
    pushed = hub.files("user/tiny-et")
    program = {k: v for k, v in pushed.items() if k != ".gitattributes"}
    first = hub.commit("user/variants", {f"fp32/{k}": v for k, v in program.items()})
    hub.commit("user/variants", {"README.md": b"# moved away\n"}, deletions=tuple(f"fp32/{k}" for k in program))
    hub.commit("org/pickles", {"config.json": pushed["config.json"], "pytorch_model.bin": b"pickle"})
    body = """
def load(*a, **k):
    model = ETModelForCausalLM.from_pretrained(*a, **k)
    assert model.stats.export_time is None
    return greedy(model)

out["subfolder_at_commit"] = load("user/variants", subfolder="fp32", revision=args["first"])
out["subfolder_at_main"] = error_of(lambda: ETModelForCausalLM.from_pretrained("user/variants", subfolder="fp32"))
model = ETModelForCausalLM.from_pretrained("user/tiny-et", token=TOKEN)
branch = model.push_to_hub("user/tiny-et", token=TOKEN, revision="v2", commit_message="on a branch")
out["branch"] = load("user/tiny-et", revision="v2", token=TOKEN)
pr = model.push_to_hub("user/tiny-et", token=TOKEN, create_pr=True)
out["pr_url"] = pr.pr_url
out["pr"] = load("user/tiny-et", revision="refs/pr/1", token=TOKEN)
out["pickles"] = error_of(lambda: ETModelForCausalLM.from_pretrained("org/pickles"))
out["missing"] = error_of(lambda: ETModelForCausalLM.from_pretrained("org/nothing-here"))
out["bad_revision"] = error_of(lambda: ETModelForCausalLM.from_pretrained("org/tiny", revision="nope"))
"""
    result, _ = run_script(body, hub_env(hub, tmp_path), first=first)
    tokens = first_run["tokens"]
    assert result["subfolder_at_commit"] == tokens and result["branch"] == tokens and result["pr"] == tokens
    assert result["subfolder_at_main"]["type"] == "ModelNotFoundError"
    assert "fp32" in result["subfolder_at_main"]["message"]
    assert hub.repos["user/tiny-et"].messages[hub.repos["user/tiny-et"].branches["v2"]] == "on a branch"
    assert hub.repos["user/tiny-et"].branches["main"] == first_run["commit"]  # branch and PR left main alone
    assert result["pr_url"].endswith("/user/tiny-et/discussions/1")
    assert result["pickles"]["type"] == "ModelNotFoundError" and "use_safetensors=False" in result["pickles"]["message"]
    assert "pytorch_model.bin" not in hub.downloads("org/pickles")
    assert result["missing"]["type"] == "ModelNotFoundError"
    assert result["bad_revision"]["type"] == "ModelNotFoundError" and "nope" in result["bad_revision"]["message"]


def test_failed_upload_raises_a_clear_error_and_changes_nothing_local(hub, first_run, tmp_path):
    cache = ArtifactCache(first_run["root"] / "et-cache")
    (entry,) = cache.entries()
    cache_before = folder_digest(entry.path)
    saved = tmp_path / "saved"
    hub.fail_commit = hub.echo_auth_in_errors = True  # the server fails the commit and echoes the token
    try:
        body = """
model = ETModelForCausalLM.from_pretrained("org/tiny", **args["load"])
assert model.stats.export_time is None
model.save_pretrained(args["saved"])
out["before"] = sorted(p.name for p in __import__("pathlib").Path(args["saved"]).iterdir())
out["failed"] = error_of(lambda: model.push_to_hub("user/broken", token=TOKEN))
out["no_token"] = error_of(lambda: model.push_to_hub("user/other", token=False))
"""
        result, _ = run_script(body, hub_env(hub, first_run["root"]), saved=str(saved))
    finally:
        hub.fail_commit = hub.echo_auth_in_errors = False
    failed = result["failed"]
    assert failed["type"] == "HubError"
    assert "user/broken" in failed["message"] and "commit" in failed["message"] and "500" in failed["message"]
    assert "unchanged" in failed["message"]
    assert "Bearer ***" in failed["message"]  # the server echoed the token; it was scrubbed
    assert result["no_token"]["type"] == "HubError" and "write access" in result["no_token"]["message"]
    assert len(hub.repos["user/broken"].commits) == 1  # only the repository's initial commit
    assert cache.get(entry.key) is not None and folder_digest(entry.path) == cache_before
    assert sorted(p.name for p in saved.iterdir()) == result["before"]
    assert ETModelForCausalLM.from_pretrained(saved).stats.export_time is None


# -- save_pretrained -> from_pretrained(folder), in this process ------------------------------------


@pytest.fixture(scope="module")
def tiny_et(first_run) -> ETModelForCausalLM:
    """The tiny program exported by process 1, loaded from its cache entry."""
    (entry,) = ArtifactCache(first_run["root"] / "et-cache").entries()
    return ETModelForCausalLM.from_pretrained(entry.path)


def greedy(model) -> list[int]:
    return model.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False)[0].tolist()


def test_save_pretrained_then_from_pretrained_loads_without_export(tiny_et, first_run, tmp_path):
    card = {"base_model": "org/tiny", "metrics": {"decode_tokens_per_s": 123.4, "measured_on": "a test"},
            "quality_table": "| recipe | ppl |\n|---|---|\n| fp32 | 1.0 |"}
    folder = tiny_et.save_pretrained(tmp_path / "out" / "tiny", card=card)
    model = ETModelForCausalLM.from_pretrained(folder)
    assert model.stats.export_time is None and greedy(model) == first_run["tokens"]
    assert model.manifest.metrics["decode_tokens_per_s"] == 123.4  # figures travel in the manifest too
    assert greedy(ETModelForCausalLM.from_pretrained(tmp_path / "out", subfolder="tiny")) == first_run["tokens"]
    text = (folder / "README.md").read_text()
    front = _front_matter(text)
    assert front["metrics"]["decode_tokens_per_s"] == 123.4 and front["metrics"]["pte_mb"] > 0
    assert QUALITY_MARKERS[0] in text and QUALITY_MARKERS[1] in text and "| fp32 | 1.0 |" in text
    assert 'from_pretrained("./tiny")' in text


def test_a_corrupted_saved_program_is_refused(tiny_et, tmp_path):
    folder = tiny_et.save_pretrained(tmp_path / "saved")
    data = bytearray((folder / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.pte").write_bytes(bytes(data))
    with pytest.raises(ProgramError, match="sha256"):
        ETModelForCausalLM.from_pretrained(folder)


def test_a_program_from_a_newer_executorch_gets_a_clear_error(tiny_et, tmp_path):
    folder = tiny_et.save_pretrained(tmp_path / "saved")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["versions"]["executorch"] = "1.99.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProgramError, match=r"executorch 1\.99\.0.*pip install"):
        ETModelForCausalLM.from_pretrained(folder)


def test_export_options_and_bad_card_data_are_refused(tiny_et, tmp_path):
    folder = tiny_et.save_pretrained(tmp_path / "saved")
    with pytest.raises(InvalidConfigError, match="already exported"):
        ETModelForCausalLM.from_pretrained(folder, max_seq_len=128)
    with pytest.raises(ValueError, match="decode_tok_s"):
        tiny_et.save_pretrained(tmp_path / "other", card={"metrics": {"decode_tok_s": 1.0}})
    with pytest.raises(ValueError, match="licence"):
        CardData.coerce({"licence": "mit"})


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])
