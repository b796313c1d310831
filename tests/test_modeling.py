"""ETModelForCausalLM loading: the persistent artifact cache, its atomicity, locking and integrity."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_python
from et_transformers import ETModelForCausalLM, ExportConfig, InvalidConfigError, ProgramError
from et_transformers.cache import ArtifactCache
from et_transformers.config import DEFAULT_RECIPE, recipe

LOAD = """
import json, sys, time
t = time.perf_counter()
from et_transformers import ETModelForCausalLM
m = ETModelForCausalLM.from_pretrained({path!r}, cache_dir={cache!r}, max_seq_len=32)
out = m.generate(__import__("torch").tensor([[5, 9, 100]]), max_new_tokens=4, do_sample=False)
print(json.dumps({{"exported": m.stats.export_time is not None, "seconds": time.perf_counter() - t,
                  "tokens": out[0].tolist(),
                  "export_stack": sorted(k for k in sys.modules if k.startswith(("executorch.exir", "torchao",
                                         "et_transformers.export")))}}))
"""


def load_in_subprocess(path, cache, env=None) -> dict:
    import json

    proc = run_python(LOAD.format(path=str(path), cache=str(cache)), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache(tiny_llama_dir, tmp_path_factory) -> Path:
    """A cache root holding the tiny Llama exported with max_seq_len=32 (built in a subprocess)."""
    cache = tmp_path_factory.mktemp("warm-cache")
    first = load_in_subprocess(tiny_llama_dir, cache)
    assert first["exported"]
    return cache


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_second_load_in_a_fresh_process_does_not_export_or_import_the_export_stack(tiny_llama_dir, warm_cache):
    second = load_in_subprocess(tiny_llama_dir, warm_cache)
    assert not second["exported"]
    assert second["export_stack"] == []


def test_offline_load_works_from_the_cache(tiny_llama_dir, warm_cache):
    result = load_in_subprocess(tiny_llama_dir, warm_cache, env={"HF_HUB_OFFLINE": "1"})
    assert not result["exported"]


def test_flipped_byte_is_detected_and_rebuilt(tiny_llama_dir, warm_cache, tmp_path, caplog):
    cache = copy_cache(warm_cache, tmp_path / "cache")
    (entry,) = ArtifactCache(cache / "et_transformers").entries()
    data = bytearray(entry.pte_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    entry.pte_path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="et_transformers.cache"):
        model = ETModelForCausalLM.from_pretrained(tiny_llama_dir, cache_dir=cache, max_seq_len=32)
    assert "corrupted" in caplog.text
    assert model.stats.export_time is not None  # rebuilt
    expected = load_in_subprocess(tiny_llama_dir, warm_cache)["tokens"]
    assert model.generate(torch.tensor([[5, 9, 100]]), max_new_tokens=4, do_sample=False)[0].tolist() == expected


def test_truncated_pte_is_never_loaded(tiny_llama_dir, warm_cache, tmp_path):
    cache = copy_cache(warm_cache, tmp_path / "cache")
    (entry,) = ArtifactCache(cache / "et_transformers").entries()
    with open(entry.pte_path, "r+b") as f:
        f.truncate(1000)
    assert ArtifactCache(cache / "et_transformers").get(entry.key) is None  # detected, discarded
    assert not entry.path.exists()


def test_two_processes_export_once_and_both_succeed(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    code = LOAD.format(path=str(tiny_llama_dir), cache=str(cache))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        import json

        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, True]
    assert results[0]["tokens"] == results[1]["tokens"]
    assert len(ArtifactCache(cache / "et_transformers").entries()) == 1


def test_kill_9_during_export_leaves_no_entry(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    code = LOAD.format(path=str(tiny_llama_dir), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = cache / "et_transformers" / "tmp"
    deadline = time.time() + 300
    while time.time() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be killed"
    time.sleep(1.0)  # well inside the export
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ArtifactCache(cache / "et_transformers")
    assert store.entries() == []
    # The lock died with the process: the next load exports and succeeds.
    assert load_in_subprocess(tiny_llama_dir, cache)["exported"]


def test_force_export_rebuilds(tiny_llama_dir, warm_cache, tmp_path):
    cache = copy_cache(warm_cache, tmp_path / "cache")
    model = ETModelForCausalLM.from_pretrained(tiny_llama_dir, cache_dir=cache, max_seq_len=32, force_export=True)
    assert model.stats.export_time is not None


def test_attributes_users_expect(tiny_llama_dir, warm_cache):
    model = ETModelForCausalLM.from_pretrained(tiny_llama_dir, cache_dir=warm_cache, max_seq_len=32)
    assert model.config.model_type == "llama"
    assert model.generation_config.eos_token_id == 2
    assert model.tokenizer("Paris").input_ids
    assert model.export_config == recipe(DEFAULT_RECIPE, max_seq_len=32)  # the default recipe
    assert model.pte_path.name == "model.pte" and model.pte_path.is_file()
    assert model.stats.load_time > 0 and model.stats.export_time is None


def test_unknown_keyword_raises(tiny_llama_dir):
    with pytest.raises(InvalidConfigError, match="max_seqlen"):
        ETModelForCausalLM.from_pretrained(tiny_llama_dir, max_seqlen=64)


def test_from_pte_with_tokenizer(tiny_llama_export, tmp_path):
    pte = tmp_path / "alone.pte"
    shutil.copy(tiny_llama_export.output_dir / "model.pte", pte)
    model = ETModelForCausalLM.from_pte(pte, tokenizer=str(tiny_llama_export.output_dir))
    assert model.generation_config.eos_token_id == [2]  # read from the program's metadata
    ids = model.tokenizer("Paris is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_from_pte_rejects_a_file_that_is_not_a_program(tmp_path):
    bogus = tmp_path / "bogus.pte"
    bogus.write_bytes(b"not a program at all")
    with pytest.raises(ProgramError):
        ETModelForCausalLM.from_pte(bogus)


def test_force_export_on_an_exported_folder_raises(tmp_path):
    (tmp_path / "model.pte").write_bytes(b"not read: the options are refused first")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InvalidConfigError, match=r"force_export=True cannot apply.*nothing to export.*original"):
        ETModelForCausalLM.from_pretrained(tmp_path, force_export=True)


# -- a checkpoint saved without its tokenizer (Trainer, model.save_pretrained() alone) ---------------


@pytest.fixture(scope="module")
def no_tokenizer(tiny_llama_model, tmp_path_factory):
    """``(checkpoint folder, cache root, model)``: the tiny Llama saved without a tokenizer, exported
    (fp32, max_seq_len 32: the only export of its own) and loaded."""
    folder = tmp_path_factory.mktemp("no-tokenizer") / "checkpoint"
    tiny_llama_model.save_pretrained(folder)
    cache = tmp_path_factory.mktemp("no-tokenizer-cache")
    model = ETModelForCausalLM.from_pretrained(folder, cache_dir=cache, recipe="xnnpack-fp32", max_seq_len=32)
    return folder, cache, model


def test_a_checkpoint_without_tokenizer_exports_and_generates_from_ids(no_tokenizer, tiny_llama_model):
    folder, _, model = no_tokenizer
    assert not any(p.name.startswith(("tokenizer", "vocab", "special_tokens")) for p in folder.iterdir())
    assert model.tokenizer is None and model.stats.export_time is not None
    exported = model.pte_path.parent
    assert not any(p.name.startswith(("tokenizer", "vocab", "special_tokens")) for p in exported.iterdir())
    assert model.manifest.program["tokenizer"] is False
    ids = torch.tensor([[5, 9, 100, 7]])
    with torch.no_grad():
        expected = tiny_llama_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_text_features_without_tokenizer_raise_tokenizer_error(no_tokenizer):
    from et_transformers import ChatSession, TokenizerError

    folder, _, model = no_tokenizer
    with pytest.raises(TokenizerError, match=rf"{folder}.*a chat needs.*tokenizer="):
        ChatSession(model)
    with pytest.raises(TokenizerError, match=rf"{folder}.*stop_strings needs.*tokenizer="):
        model.generate(torch.tensor([[5, 9]]), max_new_tokens=2, stop_strings=["."])
    with pytest.raises(TokenizerError, match="holds no tokenizer files"):
        ETModelForCausalLM.from_pte(model.pte_path, tokenizer=folder)


def test_tokenizer_can_be_passed_as_an_object_or_a_path(no_tokenizer, tiny_llama_dir):
    import tiny

    folder, cache, _ = no_tokenizer
    model = ETModelForCausalLM.from_pretrained(folder, cache_dir=cache, recipe="xnnpack-fp32", max_seq_len=32,
                                               tokenizer=tiny_llama_dir)
    assert model.stats.export_time is None and model.tokenizer("Paris").input_ids  # the cached program
    out = model.generate(torch.tensor([[5, 9]]), max_new_tokens=4, stop_strings=["the"])
    assert out.shape[1] <= 6
    from_pte = ETModelForCausalLM.from_pte(model.pte_path, tokenizer=tiny.make_tokenizer())
    assert from_pte.tokenizer.chat_template == tiny.CHAT_TEMPLATE


def test_a_tokenizer_set_later_is_the_one_generation_uses(no_tokenizer):
    import tiny

    folder, cache, _ = no_tokenizer
    model = ETModelForCausalLM.from_pretrained(folder, cache_dir=cache, recipe="xnnpack-fp32", max_seq_len=32)
    assert model.tokenizer is None
    model.tokenizer = tiny.make_tokenizer()  # what the TokenizerError's advice says to do
    out = model.generate(torch.tensor([[5, 9]]), max_new_tokens=4, stop_strings=["the"])
    assert out.shape[1] <= 6
    assert all(r.text is not None for r in model.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=3))


def test_cli_generate_on_text_without_tokenizer_is_a_one_line_tokenizer_error(no_tokenizer):
    from conftest import run_cli

    _, _, model = no_tokenizer
    proc = run_cli("generate", model.pte_path.parent, "Paris is", "--max-new-tokens", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "has no tokenizer, which a text prompt needs" in lines[0] and "--tokenizer" in lines[0]


def test_save_pretrained_with_a_tokenizer_given_later_records_it(no_tokenizer, tiny_llama_dir, tmp_path):
    from et_transformers.manifest import Manifest

    folder, cache, _ = no_tokenizer
    model = ETModelForCausalLM.from_pretrained(folder, cache_dir=cache, recipe="xnnpack-fp32", max_seq_len=32,
                                               tokenizer=str(tiny_llama_dir))
    saved = model.save_pretrained(tmp_path / "with-tokenizer")
    assert (saved / "tokenizer.json").is_file() and Manifest.read(saved).program["tokenizer"] is True
    assert ETModelForCausalLM.from_pretrained(saved).tokenizer("Paris").input_ids
