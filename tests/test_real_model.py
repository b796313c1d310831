"""The real demo model, SmolLM2-135M-Instruct (GGUF from PyPI): one export shared by every test here."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import run_python
from et_transformers import ETModelForCausalLM, ExportConfig

DEMO_CONFIG = ExportConfig(max_seq_len=1024, qlinear="8da4w", qlinear_group_size=32, qembedding="8w")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def demo_model(demo_gguf, demo_cache) -> ETModelForCausalLM:
    """The demo model exported once (8da4w group 32, 8-bit embeddings, 1024 context)."""
    return ETModelForCausalLM.from_pretrained(demo_gguf, export_config=DEMO_CONFIG, cache_dir=demo_cache)


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_export_happened_and_answers_a_chat_question(demo_model):
    assert demo_model.stats.export_time is not None
    tok = demo_model.tokenizer
    ids = chat_ids(tok, "What is the capital of France?")
    out = demo_model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_load_in_a_fresh_process_is_fast_and_does_not_export(demo_model, demo_gguf, demo_cache):
    # Timed from after `import torch` (a fixed cost of any PyTorch program, 1.5-2.5 s on this machine)
    # to the model being ready: our imports, cache lookup and check, program load, tokenizer, warm-up.
    code = f"""
import time, json
import torch
t0 = time.perf_counter()
from et_transformers import ETModelForCausalLM, ExportConfig
m = ETModelForCausalLM.from_pretrained({str(demo_gguf)!r}, cache_dir={str(demo_cache)!r},
    export_config=ExportConfig(**{DEMO_CONFIG.to_dict()!r}))
ready = time.perf_counter() - t0
print(json.dumps({{"ready": ready, "exported": m.stats.export_time is not None, "load": m.stats.load_time}}))
"""
    start = time.perf_counter()
    proc = run_python(code)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["exported"]
    assert result["ready"] < 3.0, result
    print(f"fresh-process load: ready in {result['ready']:.2f} s (wall {wall:.2f} s incl. interpreter start)")


def test_cpp_runner_generates_the_same_greedy_tokens(demo_model):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from et_transformers.runtime import load_kernel_libraries

    load_kernel_libraries()
    folder = demo_model.pte_path.parent
    tok = demo_model.tokenizer
    prompt = "The capital of France is"
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate(prompt, GenerationConfig(max_new_tokens=20, temperature=0.0, echo=False), pieces.append)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = demo_model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:])
