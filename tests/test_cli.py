"""The ``et-transformers`` command line, driven through its real entry point (subprocesses) on a tiny model.

One export (``cli_export``, made by ``et-transformers export``) is shared by every test.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli
from et_transformers import ChatSession

GREEDY = ["--max-new-tokens", "8"]


def assert_clean(proc):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # torch's own log format (e.g. "W1203 15:08:59.853000 4684 torch/utils/_pytree.py:630] ..."): not ours
    assert not re.search(r"^[DIWE]\d{4} \d\d:\d\d:\d\d", proc.stderr, re.M), proc.stderr[-3000:]


def test_export_prints_path_size_and_a_delegation_summary(cli_export):
    out, proc = cli_export
    assert_clean(proc)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{out / 'model.pte'}  ") and "MiB" in lines[0] and "exported in" in lines[0]
    assert re.search(r"delegation: \d+ XnnpackBackend \(\d+ subgraphs\); \d+ of \d+ graph nodes delegated", lines[-1])
    assert (out / "etrecord.bin").is_file()
    assert "WARNING" not in proc.stderr  # quiet when piped: no third-party chatter


def test_generate_streams_the_same_text_as_the_api_and_prints_stats(cli_export, cli_model):
    out, _ = cli_export
    proc = run_cli("generate", out, "What is the capital of France?", "--chat", "--stats", *GREEDY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = cli_model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = cli_model.generate(ids, max_new_tokens=8)[0, ids.shape[1]:]
    assert proc.stdout.strip() == tok.decode(expected, skip_special_tokens=True).strip()
    assert_clean(proc)
    assert re.search(r"TTFT \d+ ms, prefill [\d.]+ tok/s, decode [\d.]+ tok/s", proc.stderr)


def test_generate_with_prompt_lookup_and_a_draft_prints_the_plain_text(cli_export, cli_model):
    out, _ = cli_export
    prompt = "one two three one two three one two"
    plain = run_cli("generate", out, prompt, *GREEDY)
    assisted = run_cli("generate", out, prompt, "--prompt-lookup", "3", "--draft", out, "--stats", *GREEDY)
    assert assisted.returncode == 2 and "not both" in assisted.stderr  # one kind at a time, said plainly
    drafted = run_cli("generate", out, prompt, "--draft", out, *GREEDY)
    assert drafted.returncode == 0, drafted.stderr[-3000:]
    assert drafted.stdout == plain.stdout
    lookup = run_cli("generate", out, prompt, "--prompt-lookup", "3", "--stats", *GREEDY)
    assert lookup.returncode == 0, lookup.stderr[-3000:]
    assert lookup.stdout == plain.stdout
    assert re.search(r"drafted \d+, accepted \d+", lookup.stderr)


def test_chat_keeps_the_kv_cache_across_turns(cli_export, cli_model):
    out, _ = cli_export
    long_message = "one two three four five six seven eight nine ten " * 20
    script = "\n".join(["What is the capital of France?", "And of Italy?", "/stats", "/nonsense", "/reset",
                        long_message, "Hello again"]) + "\n"
    proc = run_cli("chat", out, "--stats", *GREEDY, input=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean(proc)
    turns = [tuple(map(int, m)) for m in re.findall(r"prefilled (\d+) tok, reused (\d+) cached", proc.stderr)]
    first, second, shown, after_reset = turns  # /stats repeats the second turn's line
    assert first[1] == 0 and second == shown
    # The second turn reads only its own tokens: the whole first exchange comes from the cache.
    same = ChatSession(cli_model, max_new_tokens=8)
    same.send("What is the capital of France?")
    cached_after_first = same.context_used
    same.send("And of Italy?")
    assert second == (same.stats.extra["prefilled_tokens"], cached_after_first)
    assert second[0] < first[0] + 8
    assert "unknown command /nonsense" in proc.stderr
    assert "conversation reset" in proc.stderr
    assert "context full:" in proc.stderr and "context holds 128" in proc.stderr
    assert after_reset[1] == 0  # a reset conversation starts from position 0
    replies = [line.strip() for line in proc.stdout.strip().splitlines()]
    assert replies[:2] == [m["content"].strip() for m in same.messages if m["role"] == "assistant"]


@pytest.mark.parametrize("how", ["devnull", "closed"])
def test_chat_with_no_stdin_ends_cleanly(cli_export, how):
    out, _ = cli_export
    if how == "devnull":
        proc = run_cli("chat", out, *GREEDY, stdin=subprocess.DEVNULL)
    else:
        proc = run_cli("chat", out, *GREEDY, close_stdin=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]


def test_executorch_log_lines_are_hidden_unless_verbose(cli_export):
    out, _ = cli_export
    proc = run_cli("generate", out, "Paris is", *GREEDY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cpuinfo" not in proc.stderr and ".cpp:" not in proc.stderr, proc.stderr
    verbose = run_cli("generate", out, "Paris is", *GREEDY, "--verbose")
    assert verbose.returncode == 0 and verbose.stdout == proc.stdout  # the lines may show here


def test_inspect_shows_methods_metadata_and_the_delegation_table(cli_export):
    out, _ = cli_export
    proc = run_cli("inspect", out / "model.pte")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for expected in ("forward", "get_max_seq_len", "= 128", "XnnpackBackend", "delegation table",
                     "aten_linear_default", "operators left outside any delegate", "llama::custom_sdpa.out",
                     "export config: xnnpack-fp32, ctx 128", "etrecord.bin"):
        assert expected in text, expected
    linear = re.search(r"aten_linear_default\s+(\d+)\s+(\d+)", text)
    assert int(linear.group(1)) > 0 and int(linear.group(2)) == 0  # every linear is delegated
    data = json.loads(run_cli("inspect", out, "--json").stdout)
    assert data["metadata"]["get_vocab_size"] == 256 and data["delegates"]["XnnpackBackend"] >= 1


def test_profile_prints_operator_rows_with_xnnpack_delegate_events(cli_export, tmp_path):
    out, _ = cli_export
    dump = tmp_path / "run.etdp"
    proc = run_cli("profile", out, "Paris is", "--max-new-tokens", "4", "--etdump", dump)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    rows = re.findall(r"^  (.+?)\s{2,}(XNNPACK|kernel)\s+(\d+)\s+([\d.]+)", text, flags=re.M)
    assert any(where == "XNNPACK" and "Fully Connected" in name for name, where, _, _ in rows), text
    assert any(where == "kernel" and "custom_sdpa" in name for name, where, _, _ in rows), text
    assert f"linked to {out / 'etrecord.bin'}" in text
    assert "1 prefill + 3 decode program runs" in text
    for phase in ("tokenize", "prefill", "decode: model", "decode: sampling", "detokenize"):
        assert phase in text
    assert "linear" in text.split("delegate calls:")[1]  # graph operators named through the ETRecord
    assert dump.stat().st_size > 0


FAKE_LLAMA_BENCH = """#!/bin/sh
echo '[{"n_prompt": 16, "n_gen": 0, "avg_ts": 1234.5}, {"n_prompt": 0, "n_gen": 4, "avg_ts": 67.8}]'
"""


def test_bench_peak_rss_is_the_contenders_own_not_the_callers(tmp_path):
    # Linux starts a forked child's RSS high-water mark at its parent's RSS: a contender forked
    # straight from a process holding 400 MB would report 400 MB.
    from et_transformers import bench

    held = bytearray(400 * 2**20)
    held[:: 4096] = b"x" * len(held[:: 4096])  # touch every page
    code, _, _, rss = bench._run([sys.executable, "-c", "pass"], tmp_path)
    assert code == 0 and 1 < rss < 200, rss
    del held


def test_bench_compares_contenders_side_by_side(cli_export, tmp_path):
    out, _ = cli_export
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "same-model.gguf"
    _write_tiny_gguf(gguf)
    proc = run_cli("bench", out, "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "1", "--json",
                   "--gguf", gguf, "--llama-bench", fake)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(proc.stdout)["results"]}
    assert list(results) == ["et_transformers", "transformers", "executorch-runner", "llama.cpp"]
    for name in ("et_transformers", "transformers", "executorch-runner"):
        r = results[name]
        assert r["prefill_tok_s"] > 0 and r["peak_rss_mib"] > 50 and r["load_s"] > 0, r
        assert r["generated"] == 4 or "EOS" in r["note"], r  # this runner build cannot ignore EOS
        assert r["decode_tok_s"] > 0 or r["generated"] == 1, r
    assert results["et_transformers"]["ttft_ms"] > 0
    assert (results["llama.cpp"]["prefill_tok_s"], results["llama.cpp"]["decode_tok_s"]) == (1234.5, 67.8)
    # Achieved bandwidth for every contender: the GGUF's tensors (embedding one row: 16 + 160 + 16)...
    assert results["llama.cpp"]["weight_bytes_per_token"] == 192
    assert results["llama.cpp"]["decode_gb_s"] == pytest.approx(192 * 67.8 / 1e9)
    # ...the program's manifest for ours and the C++ runner, the float parameters for eager.
    recorded = json.loads((out / "manifest.json").read_text())["weight_bytes_per_token"]
    for name in ("et_transformers", "executorch-runner"):
        assert results[name]["weight_bytes_per_token"] == recorded
    assert results["transformers"]["weight_bytes_per_token"] > recorded / 2
    for name in ("et_transformers", "transformers", "executorch-runner"):
        r = results[name]
        assert r["decode_gb_s"] is None or r["decode_gb_s"] == pytest.approx(
            r["weight_bytes_per_token"] * r["decode_tok_s"] / 1e9)


def _write_tiny_gguf(path):
    """A GGUF with three float32 tensors: embedding [10, 4], head [10, 4], one norm [4]."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((10, 4), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((10, 4), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_cache_ls_rm_prune(cli_export, tmp_path):
    out, _ = cli_export
    root = tmp_path / "cache"
    entry = root / "et_transformers" / "models" / ("ab12" + "0" * 60)
    shutil.copytree(out, entry)
    ls = run_cli("cache", "ls", "--cache-dir", root)
    assert ls.returncode == 0, ls.stderr
    assert "ab1200000000" in ls.stdout and "xnnpack-fp32, ctx 128" in ls.stdout
    assert re.search(r"MiB\s+(just now|\d+ (min|h|d) ago)", ls.stdout)
    assert str(run_cli("cache", "prune", "--older-than", "1d", "--cache-dir", root).stdout).startswith("removed 0")
    rm = run_cli("cache", "rm", "ab12", "--cache-dir", root)
    assert rm.returncode == 0 and "removed 1" in rm.stdout and not entry.exists()
    assert "is empty" in run_cli("cache", "ls", "--cache-dir", root).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "m", "p", "--max-new-token", "3"], "unrecognized arguments: --max-new-token"),
        (["inspect", "/no/such/model.pte"], "does not exist"),
        (["inspect", str(ROOT / "README.md")], "is not an ExecuTorch program"),
        (["cache", "prune", "--max-size", "lots"], "is not a size"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(args, message):
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("et-transformers: error:") and message in lines[0], proc.stderr


@pytest.mark.parametrize("target", ["x.pte", "folder"])
@pytest.mark.parametrize("options", [["--recipe", "xnnpack-8da4w"], ["--qlinear", "8da8w", "--force-export"]])
def test_inspect_refuses_export_options_for_an_exported_program(tmp_path, target, options):
    path = tmp_path / target
    if target == "folder":
        path.mkdir()
        (path / "model.pte").write_bytes(b"never read")
    else:
        path.write_bytes(b"never read")
    proc = run_cli("inspect", path, *options)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert f"{options[0]} " in lines[0] and "already exported program" in lines[0], lines[0]


def test_verbose_shows_the_traceback(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    proc = run_cli("inspect", bogus, "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ProgramError" in proc.stderr


def test_python_dash_m_package_runs_the_cli():
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "et_transformers", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "profile" in proc.stdout and "bench" in proc.stdout


def test_generate_kv_reuse_does_not_leak_into_plain_generate(cli_model):
    """A chat turn then a plain generate(): the plain call re-prefills from position 0."""
    ids = torch.tensor([[5, 9, 100, 7]])
    expected = cli_model.generate(ids, max_new_tokens=4)
    ChatSession(cli_model, max_new_tokens=4).send("Hi")
    assert torch.equal(cli_model.generate(ids, max_new_tokens=4), expected)
