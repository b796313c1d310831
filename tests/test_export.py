"""The export pipeline: program contents, exact parity with eager transformers, the C++ runner,
the manifest, and bad input failing fast and leaving nothing behind."""

from __future__ import annotations

import json
import time

import pytest
import torch

import tiny
from et_transformers import ExportConfig, InvalidConfigError, ModelNotFoundError, UnsupportedModelError
from et_transformers.export import Exporter, export_to_pte
from et_transformers.manifest import Manifest, sha256_file
from et_transformers.runtime import Program


def greedy_through_program(program: Program, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """A bare greedy loop over the runtime: prefill once, then one token per call."""
    logits = program.forward(prompt, 0)
    out = [int(logits.argmax())]
    pos = prompt.shape[-1]
    for _ in range(new_tokens - 1):
        logits = program.forward(torch.tensor([[out[-1]]]), pos)
        pos += 1
        out.append(int(logits.argmax()))
    return out


def test_program_has_custom_sdpa_in_place_cache_and_delegated_linears(tiny_llama_export):
    program = tiny_llama_export.executorch_program
    plan = program.executorch_program.execution_plan[0]
    operators = {f"{op.name}.{op.overload}" for op in plan.operators}
    assert {"llama::custom_sdpa.out", "llama::update_cache.out"} <= operators, operators
    # The cache is written in place: nothing copies it (no copy_/clone/index_put/slice_scatter).
    assert not {o for o in operators if o.split(".")[0] in
                ("aten::copy_", "aten::clone", "aten::index_put", "aten::slice_scatter")}, operators
    # ...and the KV cache buffers are the program's mutable state.
    mutated = set(program.exported_program().graph_signature.buffers_to_mutate.values())
    assert {f"k_cache_{i}" for i in range(2)} | {f"v_cache_{i}" for i in range(2)} <= mutated

    info = tiny_llama_export.delegation_summary()
    table = info.get_operator_delegation_dataframe().set_index("op_type")
    assert table.loc["aten_linear_default", "occurrences_in_delegated_graphs"] >= 14  # 7 per layer + lm head
    assert table.loc["aten_linear_default", "occurrences_in_non_delegated_graphs"] == 0
    assert info.num_delegated_subgraphs >= 1


def test_float32_rope_runs_no_gemm_and_rotates_exactly(tiny_llama_export, tiny_llama_model):
    """RoPE's ``rotate_half`` in a float32 program is elementwise ops and a pooling: no float GEMM
    (XNNPACK's assembly GEMMs leave the AVX upper state dirty and made attention 3x slower at two
    threads), and exactly transformers' values for full, partial and transposed inputs."""
    from transformers.models.llama.modeling_llama import rotate_half

    from et_transformers.export import rope

    linears = sum(isinstance(m, torch.nn.Linear) for m in tiny_llama_model.modules())
    table = tiny_llama_export.delegation_summary().get_operator_delegation_dataframe().set_index("op_type")
    assert table.loc["aten_linear_default", "occurrences_in_delegated_graphs"] == linears
    assert "aten_mean_dim" in table.index

    owner = torch.nn.Module()
    owner.register_buffer(rope.BUFFER_NAME, rope.pair_signs())
    rotate = rope.pairwise_rotate_half(owner)
    base = torch.randn(1, 7, 9, 64, generator=torch.Generator().manual_seed(0)) * 100
    for x in (base, base.transpose(1, 2), base[..., :32], base[..., 32:], base[:, :1]):
        assert torch.equal(rotate(x), rotate_half(x))


def test_metadata_methods(tiny_llama_export):
    program = Program(tiny_llama_export.output_dir / "model.pte")
    meta = program.metadata
    assert (meta.max_seq_len, meta.max_context_len, meta.vocab_size) == (128, 128, tiny.VOCAB_SIZE)
    assert meta.eos_ids == (2,) and meta.bos_id == 1 and meta.n_layers == 2
    assert meta.use_kv_cache and meta.enable_dynamic_shape
    for name in ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids",
                 "use_kv_cache", "enable_dynamic_shape", "get_n_layers"):
        assert name in program.method_names


@pytest.mark.parametrize("prompt_len", [1, 7, 50])
def test_fp32_greedy_matches_eager_transformers(tiny_llama_export, tiny_llama_model, prompt_len):
    torch.manual_seed(prompt_len)
    prompt = torch.randint(3, tiny.VOCAB_SIZE, (1, prompt_len))
    program = Program(tiny_llama_export.output_dir / "model.pte")
    with torch.no_grad():
        eager_logits = tiny_llama_model(prompt).logits[:, -1]
        expected = tiny_llama_model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None)
    logits = program.forward(prompt, 0)
    assert logits.shape == (1, tiny.VOCAB_SIZE)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=0)
    assert greedy_through_program(program, prompt, 32) == expected[0, prompt_len:].tolist()


def test_cpp_text_llm_runner_generates_the_same_tokens(tiny_llama_export, tiny_llama_model):
    tok = tiny.make_tokenizer()
    prompt = "Paris is the capital of"
    text = tiny.cpp_runner_text(tiny_llama_export.output_dir, prompt, 24)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = tiny_llama_model.generate(ids, max_new_tokens=24, do_sample=False)
    # The runner stops at EOS after emitting it; compare the text of the same tokens.
    assert text == tok.decode(expected[0, ids.shape[1]:])


def test_manifest_records_config_source_hash_and_versions(tiny_llama_export, tiny_llama_dir):
    out = tiny_llama_export.output_dir
    manifest = Manifest.read(out)
    assert manifest.pte_sha256 == sha256_file(out / "model.pte")
    assert manifest.pte_size == (out / "model.pte").stat().st_size
    assert ExportConfig.from_dict(manifest.export_config) == ExportConfig(max_seq_len=128)
    assert manifest.source["path"] == str(tiny_llama_dir.resolve())
    for package in ("torch", "executorch", "torchao", "transformers", "et-transformers"):
        assert manifest.versions[package], package
    assert manifest.model_type == "llama"
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["program"]["metadata"]["get_max_seq_len"] == 128
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_stages_are_timed_and_callable_one_by_one(tiny_llama_export):
    assert list(tiny_llama_export.timings) == [
        "load", "source_transform", "to_dtype", "quantize", "export", "lower", "to_executorch", "save"
    ]
    assert all(t >= 0 for t in tiny_llama_export.timings.values())


def test_portable_backend_delegates_nothing_and_matches_eager(tiny_llama_dir, tiny_llama_model, tmp_path):
    exporter = Exporter.from_pretrained(tiny_llama_dir, ExportConfig(max_seq_len=64, backend="portable"))
    exporter.load().source_transform().to_dtype().quantize().export().lower()
    assert exporter.delegation_summary().num_delegated_subgraphs == 0
    pte = exporter.to_executorch().save(tmp_path / "portable")
    prompt = torch.tensor([[5, 9, 100, 33]])
    with torch.no_grad():
        expected = tiny_llama_model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert greedy_through_program(Program(pte), prompt, 8) == expected[0, 4:].tolist()


def test_user_source_transform_runs_before_the_builtin_one(tiny_llama_dir):
    seen = []

    def transform(model):
        seen.append(type(model).__name__)
        return model

    exporter = Exporter.from_pretrained(tiny_llama_dir, ExportConfig(max_seq_len=32))
    exporter.load().source_transform([transform])
    assert seen == ["LlamaForCausalLM"]
    assert type(exporter.module).__name__ == "ExportableCausalLM"


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"max_seq_len": -5}, "max_seq_len=-5"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"qlinear": "3bit"}, "qlinear='3bit'"),
        ({"qlinear_group_size": 48}, "qlinear_group_size=48"),
        ({"qembedding": "2w"}, "qembedding='2w'"),
    ],
)
def test_invalid_export_config_names_value_and_accepted_ones(overrides, fragment):
    with pytest.raises(InvalidConfigError) as err:
        ExportConfig(**overrides)
    assert fragment in str(err.value)


def test_unknown_config_field_raises():
    with pytest.raises(InvalidConfigError, match="unknown ExportConfig field"):
        ExportConfig().replace(qlinear_groupsize=64)


def test_unsupported_model_type_fails_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as err:
        export_to_pte(tmp_path, ExportConfig(), tmp_path / "out")
    assert "model_type='bert'" in str(err.value) and "llama" in str(err.value)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


def test_missing_path_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        export_to_pte(tmp_path / "nope", ExportConfig(), tmp_path / "out")


def test_interrupted_save_leaves_output_dir_untouched(tiny_llama_export, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")

    def interrupted(self, folder):
        raise KeyboardInterrupt  # Ctrl-C after model.pte and the tokenizer were written

    monkeypatch.setattr(Manifest, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_llama_export.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left either


def test_a_stage_failing_without_a_message_names_the_exception(tmp_path, monkeypatch):
    # An AssertionError inside a partitioner has no text: the ExportError says what it was.
    from et_transformers import ExportError
    from et_transformers.export import pipeline

    from executorch.exir.backend.partitioner import Partitioner

    class Broken(Partitioner):
        def partition(self, exported_program):
            raise AssertionError()  # as Vulkan's pattern matcher does on a graph it does not expect

    def broken(cfg):
        return [Broken()]

    tiny.make_model_dir(tmp_path / "src", tiny.llama_config())
    monkeypatch.setattr(pipeline, "partitioners_for", broken)
    with pytest.raises(ExportError, match=r"export stage 'lower' failed for src: AssertionError \(no message"):
        Exporter.from_pretrained(tmp_path / "src", ExportConfig(max_seq_len=16), progress=False).run(tmp_path / "out")
