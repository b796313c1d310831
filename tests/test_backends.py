"""Backends beyond XNNPACK (et_transformers.export.backends, .export.openvino, .export.coreml, .delegates).

OpenVINO fp32 programs of several tiny families give transformers' eager greedy tokens; an ordered
backend list gives its first backend first pick of the operators (read back from the program's
delegates); the 4-bit OpenVINO program computes what the NNCF-compressed graph computes in PyTorch;
a program whose delegate backend the runtime lacks is refused by name before ExecuTorch's 0x20;
the 4-bit Vulkan program's linears and embedding are Vulkan's own 4-bit operators (read from the
graph in its delegate; nothing here runs Vulkan); bad backend names and combinations are refused when the config is built. Each program is
exported once per module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections import Counter

import pytest
import torch

import tiny
from conftest import run_cli
from et_transformers import ETModelForCausalLM, ExportConfig, InvalidConfigError, ProgramError
from et_transformers import delegates
from et_transformers.config import BACKENDS, RECIPES, recipe
from et_transformers.inspection import inspect_program
from test_families import MAX_SEQ_LEN, NEW_TOKENS, PROMPT_LENGTHS, eager_greedy, prompt_of


def _openvino_missing() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return 'the openvino package is not installed (pip install "et-transformers[openvino]")'
    if "OpenvinoBackend" not in delegates.registered_backends():
        return "this ExecuTorch runtime does not register OpenvinoBackend"
    return None


needs_openvino = pytest.mark.skipif(_openvino_missing() is not None, reason=str(_openvino_missing()))

#: Families exported to OpenVINO fp32. Plain Phi-3: its longrope variant is refused (see below).
CONFIGS = {**tiny.FAMILY_CASES, "phi3": tiny.phi3_config}
OPENVINO_CASES = ["llama-llama3rope", "qwen2-yarn", "qwen3", "gemma", "phi3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(case, backend, **overrides)``: the folder of the tiny ``case`` model exported with
    ``backend`` (once per module), and the eager model."""
    done: dict[tuple, tuple] = {}

    def export(case: str, backend, **overrides):
        key = (case, backend, tuple(sorted(overrides.items())))
        if key not in done:
            from et_transformers.export import Exporter

            root = tmp_path_factory.mktemp(case)
            source = root / "source"
            tiny.make_model_dir(source, CONFIGS[case]())
            cfg = ExportConfig(max_seq_len=MAX_SEQ_LEN, backend=backend).replace(**overrides)
            exporter = Exporter.from_pretrained(source, cfg, progress=False)
            exporter.run(root / "program")
            done[key] = root / "program", tiny.make_model(CONFIGS[case]()), exporter
        return done[key]

    return export


# -- OpenVINO fp32: eager transformers' tokens -----------------------------------------------------


@needs_openvino
@pytest.mark.parametrize("case", OPENVINO_CASES)
def test_openvino_fp32_greedy_matches_transformers(case, exported):
    folder, model, _ = exported(case, "openvino")
    et_model = ETModelForCausalLM.from_pretrained(folder)
    assert et_model.program.metadata.max_seq_len == 1  # one token per call: prompts prefill token by token
    assert inspect_program(folder).delegates.keys() == {"OpenvinoBackend"}
    for length in PROMPT_LENGTHS:
        prompt = prompt_of(length)
        expected = eager_greedy(model, prompt)
        assert len(set(expected)) >= 8, f"{case}: degenerate tiny model, the comparison would prove little"
        got = et_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert got[0, length:].tolist() == expected, f"{case}, prompt of {length} tokens"


@needs_openvino
def test_a_cache_rebuilding_model_is_refused_as_a_one_token_program(tmp_path):
    from et_transformers import ExportError
    from et_transformers.export import Exporter

    source = tiny.make_model_dir(tmp_path / "phi4", tiny.phi3_longrope_config())
    exporter = Exporter.from_pretrained(source, ExportConfig(max_seq_len=MAX_SEQ_LEN, backend="openvino"), progress=False)
    with pytest.raises(ExportError, match=r"passes 32 tokens.*one token per call.*max_seq_len=32"):
        exporter.load()
    exporter.export_config = ExportConfig(max_seq_len=tiny.ORIGINAL_CONTEXT, backend="openvino")
    exporter.load()  # within the original context nothing is ever rebuilt


# -- ordered lists: the first backend picks first --------------------------------------------------


@needs_openvino
def test_openvino_first_leaves_xnnpack_nothing(exported):
    folder, model, exporter = exported("llama-llama3rope", ("openvino", "xnnpack"))
    by_backend = exporter.delegation_by_backend()
    assert set(by_backend) == {"OpenvinoBackend"}  # XNNPACK supports nothing OpenVINO left
    report = inspect_program(folder)
    assert set(report.delegates) == {"OpenvinoBackend"} and report.nodes_by_backend == {
        "OpenvinoBackend": by_backend["OpenvinoBackend"]["nodes"]}
    assert report.export_config["backend"] == ["openvino", "xnnpack"]
    prompt = prompt_of(PROMPT_LENGTHS[0])
    got = ETModelForCausalLM.from_pretrained(folder).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                              eos_token_id=None)
    assert got[0, prompt.shape[-1]:].tolist() == eager_greedy(model, prompt)


@needs_openvino
def test_xnnpack_first_leaves_openvino_the_leftovers(exported):
    folder, model, exporter = exported("llama-llama3rope", ("xnnpack", "openvino"))
    alone = exported("llama-llama3rope", "openvino")[2].delegation_by_backend()["OpenvinoBackend"]["nodes"]
    by_backend = exporter.delegation_by_backend()
    xnnpack, openvino = by_backend["XnnpackBackend"]["nodes"], by_backend["OpenvinoBackend"]["nodes"]
    assert xnnpack > 5 * openvino > 0  # XNNPACK took the layers; OpenVINO what it cannot run (the embedding...)
    assert openvino < alone
    report = inspect_program(folder)
    assert report.nodes_by_backend == {"XnnpackBackend": xnnpack, "OpenvinoBackend": openvino}
    assert re.search(rf"graph nodes delegated \(\d+%, OpenvinoBackend {openvino}, XnnpackBackend {xnnpack}\)",
                     report.summary())
    assert delegates.program_delegate_ids(folder / "model.pte") == ("OpenvinoBackend", "XnnpackBackend")
    prompt = prompt_of(PROMPT_LENGTHS[1])
    got = ETModelForCausalLM.from_pretrained(folder).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                              eos_token_id=None)
    assert got[0, prompt.shape[-1]:].tolist() == eager_greedy(model, prompt)


# -- OpenVINO 4-bit: what the compressed graph computes -------------------------------------------


def _compressed_greedy(gm, prompt: torch.Tensor) -> list[int]:
    """Greedy continuation by the compressed (one-token, static-shape) module run in PyTorch."""
    tokens = prompt[0].tolist()
    with torch.no_grad():
        for pos in range(prompt.shape[-1] + NEW_TOKENS - 1):
            logits = gm(torch.tensor([[tokens[pos]]]), torch.tensor([pos]))
            if pos + 1 >= len(tokens):
                tokens.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
    return tokens[prompt.shape[-1]:]


@needs_openvino
def test_openvino_4bit_program_runs_the_nncf_compressed_graph(exported, tmp_path):
    from et_transformers.export import Exporter
    from et_transformers.export.openvino import compress_weights

    cfg = recipe("openvino-4w", max_seq_len=MAX_SEQ_LEN, qlinear_group_size=32)  # tiny layers: 64 inputs
    fp32_folder, _, _ = exported("llama-llama3rope", "openvino")
    source = fp32_folder.parent / "source"
    exporter = Exporter.from_pretrained(source, cfg, progress=False).load().source_transform().to_dtype().quantize()
    with torch.no_grad(), exporter.module.for_export():
        ep = torch.export.export(exporter.module, exporter.example_inputs(), dynamic_shapes=None, strict=False)
    compressed, report = compress_weights(ep.module(), cfg)
    assert report["mode"] == "int4wo_sym" and report["group_size"] == 32
    assert report["compressed_weights"] == 2 * 7 + 2  # every linear, the embedding and the head
    exporter.export().lower().to_executorch().save(tmp_path / "program")
    assert exporter.quantization_report == report
    size, fp32_size = (os.path.getsize(f / "model.pte") for f in (tmp_path / "program", fp32_folder))
    assert size < 0.7 * fp32_size, (size, fp32_size)  # the weights really are stored in 4 and 8 bits
    et_model = ETModelForCausalLM.from_pretrained(tmp_path / "program")
    prompt = prompt_of(PROMPT_LENGTHS[0])
    expected = _compressed_greedy(compressed, prompt)
    got = et_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert got[0, prompt.shape[-1]:].tolist() == expected


@needs_openvino
def test_openvino_int4_groups_shrink_for_layers_they_do_not_divide(tmp_path):
    from et_transformers.export import Exporter
    from et_transformers.export.openvino import compress_weights

    source = tiny.make_model_dir(tmp_path / "wide", tiny.llama_config(hidden_size=96))  # q_proj: 96 inputs
    cfg = recipe("openvino-4w", max_seq_len=16, qlinear_group_size=64)
    exporter = Exporter.from_pretrained(source, cfg, progress=False).load().source_transform().to_dtype().quantize()
    with torch.no_grad(), exporter.module.for_export():
        ep = torch.export.export(exporter.module, exporter.example_inputs(), dynamic_shapes=None, strict=False)
    compressed, _ = compress_weights(ep.module(), cfg)
    scales = {name.split("layers_0_")[-1]: tuple(module._scale.shape) for name, module in compressed.named_children()
              if "layers_0_" in name}
    assert scales["self_attn_q_proj_weight"] == (96, 3, 1)  # 96 = 3 groups of 32 (64 does not divide it)
    assert scales["mlp_down_proj_weight"] == (96, 2, 1)  # 128 inputs: 2 groups of the asked 64


# -- a runtime without the program's backend ---------------------------------------------------------


@needs_openvino
def test_the_4bit_openvino_demo_model_answers_the_demo_question(demo_gguf, tmp_path):
    """The issue's real-model check: SmolLM2-135M-Instruct through NNCF's int4 compression and
    OpenVINO (one token per call) still answers the README's question."""
    model = ETModelForCausalLM.from_pretrained(demo_gguf, recipe="openvino-4w", max_seq_len=128, cache_dir=tmp_path)
    assert set(inspect_program(model.pte_path.parent).delegates) == {"OpenvinoBackend"}
    assert model.program.metadata.max_seq_len == 1  # static shapes: the prompt goes in a token at a time
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_openvino
def test_a_backend_missing_from_the_runtime_is_named_before_executorch_fails(exported, monkeypatch):
    folder, _, _ = exported("llama-llama3rope", "openvino")
    monkeypatch.setattr(delegates, "registered_backends", lambda: frozenset({"XnnpackBackend"}))
    with pytest.raises(ProgramError, match=r"OpenvinoBackend \(backend 'openvino'\).*does not include.*"
                                           r"\['XnnpackBackend'\].*pip install \"et-transformers\[openvino\]\""):
        ETModelForCausalLM.from_pretrained(folder)
    report = inspect_program(folder)  # inspect reads the file, not the runtime
    assert report.delegates["OpenvinoBackend"] == 5 and report.metadata["get_max_seq_len"] == 1


@needs_openvino
def test_a_missing_openvino_library_is_named(exported, monkeypatch):
    folder, _, _ = exported("llama-llama3rope", "openvino")
    missing = dataclasses.replace(delegates.DELEGATES["OpenvinoBackend"], locate=lambda: None)
    monkeypatch.setitem(delegates.DELEGATES, "OpenvinoBackend", missing)
    with pytest.raises(ProgramError, match=r"needs its native library.*et-transformers\[openvino\]"):
        ETModelForCausalLM.from_pretrained(folder)


def test_openvino_is_kept_in_float32_on_bfloat16_cpus(monkeypatch, caplog):
    # Its CPU plugin would run float32 subgraphs in bfloat16 there (the fp32 tests above fail on an
    # AMX machine without this); the pin is oneDNN's ISA cap, and a user's own cap wins.
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.setenv(var, "x")  # so monkeypatch restores the variable's absence too
        monkeypatch.delenv(var)
    monkeypatch.setattr(delegates, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert delegates.pin_openvino_float32() is None and "ONEDNN_MAX_CPU_ISA" not in os.environ
    monkeypatch.setattr(delegates, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    assert delegates.pin_openvino_float32() == "AVX512_CORE_VNNI" == os.environ["ONEDNN_MAX_CPU_ISA"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    with caplog.at_level("WARNING", logger="et_transformers.delegates"):
        assert delegates.pin_openvino_float32() is None
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_AMX" and "may run float32 programs in bfloat16" in caplog.text


def test_openvino_lib_path_must_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(delegates.OPENVINO_LIB_VAR, str(tmp_path))
    with pytest.raises(ProgramError, match=r"OPENVINO_LIB_PATH=.* is not a file.*not a folder"):
        delegates.locate_openvino()


@needs_openvino
def test_the_openvino_library_is_found_in_the_package_without_env(monkeypatch):
    monkeypatch.delenv(delegates.OPENVINO_LIB_VAR, raising=False)
    found = delegates.locate_openvino()
    assert found.name.startswith("libopenvino_c.so") and found.is_file()
    assert os.environ[delegates.OPENVINO_LIB_VAR] == str(found)  # what the delegate's dlopen reads


# -- Vulkan: exported here, run elsewhere -------------------------------------------------------------


def _needs_import(module: str, what: str):
    """Skip unless ``module`` (a backend's AOT package) imports here; the reason names ``what``."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return pytest.mark.skipif(True, reason=f"{what} does not import here ({e})")
    return pytest.mark.skipif(False, reason="")


needs_vulkan = _needs_import("executorch.backends.vulkan.partitioner.vulkan_partitioner",
                             "the executorch wheel's Vulkan partitioner")


@needs_vulkan
def test_vulkan_takes_the_whole_program_and_this_runtime_refuses_it_by_name(exported, tmp_path):
    folder, _, exporter = exported("llama-llama3rope", "vulkan")
    assert set(exporter.delegation_by_backend()) == {"VulkanBackend"}
    table = exporter.delegation_table()
    assert table["by_operator"]["llama_custom_sdpa_default"] == [2, 0]  # attention too, unlike OpenVINO
    assert table["non_delegated_nodes"] <= 2
    assert inspect_program(folder).delegates == {"VulkanBackend": 1}
    if "VulkanBackend" in delegates.registered_backends():  # a runtime built with Vulkan runs it
        ETModelForCausalLM.from_pretrained(folder)
        return
    with pytest.raises(ProgramError, match=r"VulkanBackend \(backend 'vulkan'\).*does not include.*built with Vulkan"):
        ETModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ProgramError, match=r"a program for backend='vulkan' \(export_to_pte and `et-transformers "
                                           r"export` build one for another device\)"):
        ETModelForCausalLM.from_pretrained(folder.parent / "source", recipe="vulkan-fp32", cache_dir=tmp_path)
    assert not any(tmp_path.rglob("model.pte"))  # refused before exporting


def _vulkan_graph_ops(exporter) -> tuple[Counter, list]:
    """The operator calls inside the program's Vulkan delegates, decoded from their payloads (the
    VkGraph the Vulkan runtime builds its compute graph from), and the graphs themselves."""
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import (
        extract_vk_flatbuffer, flatbuffer_to_vk_graph)

    gm = exporter.edge_program.exported_program().graph_module
    graphs = [flatbuffer_to_vk_graph(extract_vk_flatbuffer(m.processed_bytes)) for _, m in gm.named_children()
              if getattr(m, "backend_id", None) == "VulkanBackend"]
    return Counter(call.name for g in graphs for call in g.chain), graphs


def _vk_arg(graph, ref):
    value = graph.values[ref].value
    return (value.datatype.name, list(value.dims)) if hasattr(value, "dims") else value


@needs_vulkan
def test_vulkan_4w_fuses_every_linear_into_vulkans_4_bit_op(exported):
    folder, _, exporter = exported("llama-llama3rope", "vulkan", qlinear="4w", qembedding="4w")
    assert inspect_program(folder).export_config == recipe("vulkan-4w", max_seq_len=MAX_SEQ_LEN).to_dict()
    assert set(exporter.delegation_by_backend()) == {"VulkanBackend"}
    assert inspect_program(folder).delegates == {"VulkanBackend": 1}  # the whole program, as in float
    ops, graphs = _vulkan_graph_ops(exporter)
    # every linear of the 2 layers (7 each) and the head: Vulkan's 4-bit groupwise linear, no float mm
    assert ops["et_vk.linear_q4gsw.default"] == 2 * 7 + 1
    assert ops["et_vk.embedding_q4gsw.default"] == 1
    assert not [op for op in ops if re.search(r"\.(mm|addmm|linear|embedding)\.|dequantize", op)], ops
    graph = graphs[0]
    q_proj = next(c for c in graph.chain if c.name == "et_vk.linear_q4gsw.default")
    x, weight, scales, group, bias = (_vk_arg(graph, a) for a in q_proj.args[:5])
    assert weight == ("UINT8", [64, 32])  # [out, in / 2]: two 4-bit values per byte
    assert scales == ("FLOAT32", [2, 64]) and group.int_val == 32  # groups of 32 of the 64 inputs
    size, fp32_size = (os.path.getsize(f / "model.pte") for f in (folder, exported("llama-llama3rope", "vulkan")[0]))
    assert size < 0.3 * fp32_size, (size, fp32_size)  # weights stored in 4 bits (plus scales)


@needs_vulkan
def test_vulkan_fuses_4_bit_layers_the_group_does_not_divide_as_channelwise_4_bit(exported):
    # groups of 128: the 64-input layers fall back to one scale per output channel (so does the
    # 128-input down_proj: one group is its whole row), which Vulkan runs as its linear_qcs4w
    _, _, exporter = exported("llama-llama3rope", "vulkan", qlinear="4w", qembedding="4w", qlinear_group_size=128)
    assert exporter.quantization_report["linear"] == {"grouped": 2, "per_channel_fallback": 13}
    ops, _ = _vulkan_graph_ops(exporter)
    assert ops["et_vk.linear_qcs4w.default"] == 2 * 7 + 1 and "et_vk.linear_q4gsw.default" not in ops
    assert not [op for op in ops if re.search(r"\.(mm|addmm|linear)\.|dequantize", op)], ops


@pytest.mark.parametrize("fields, message", [
    ({"qlinear": "8da4w"}, r"qlinear='8da4w' is not supported with backend='vulkan' first: Vulkan takes weight-only "
                           r"\['4w'\] \(float activations\), fused into its own 4-bit operators.*'vulkan-4w'"),
    ({"qlinear": "8w"}, r"qlinear='8w' is not supported with backend='vulkan' first"),
    ({"qlinear": "4w", "qhead": "8w"}, r"qhead='8w' is not supported with backend='vulkan' first"),
    ({"qlinear": "q4_0"}, r"qlinear='q4_0' is not supported with backend='vulkan' first"),
    ({"qembedding": "8w"}, r"qembedding='8w' is not supported with backend='vulkan' first"),
    ({"qlinear": "4w", "qlinear_8bit": ("*.down_proj",)}, r"qlinear_8bit=.*no weight-only 8-bit linear"),
    ({"kv_cache_dtype": "int8"}, r"kv_cache_dtype='int8' is not supported with backend='vulkan' first"),
    ({"dtype": "float16"}, r"dtype='float16' is not supported with backend='vulkan' first.*'vulkan-4w'"),
])
def test_what_vulkan_cannot_fuse_is_refused(fields, message):
    with pytest.raises(InvalidConfigError, match=message):
        ExportConfig(backend="vulkan", **fields)


def test_vulkan_takes_4_bit_weight_only_layers_in_groups_of_32_and_a_float_head():
    assert recipe("vulkan-4w").qlinear_group_size == 32 and recipe("vulkan-4w").head_scheme == "4w"
    assert ExportConfig(backend="vulkan", qlinear="4w", qhead=None).head_scheme is None
    assert ExportConfig(backend="vulkan", qlinear="4w", qlinear_group_size=128).qlinear_group_size == 128
    assert ExportConfig(backend=("xnnpack", "vulkan"), qlinear="8da4w").qlinear_group_size == 32


# -- Core ML: exported here, run on Apple devices ---------------------------------------------------------


needs_coreml = _needs_import("executorch.backends.apple.coreml.partition",  # imports coremltools
                             "Core ML's AOT package (coremltools, ExecuTorch's CoreMLPartitioner)")


@needs_coreml
def test_coreml_takes_all_but_attention_and_the_cache_and_this_runtime_refuses_it_by_name(exported, tmp_path):
    folder, _, exporter = exported("llama-llama3rope", "coreml", dtype="float16")
    assert set(exporter.delegation_by_backend()) == {"CoreMLBackend"}
    table = exporter.delegation_table()
    # llama.custom_sdpa and update_cache (under auto_functionalized) are not Core ML ops; the start
    # position (.item(), a SymInt, and its 0-d tensor) stays out of the delegates
    assert table["by_operator"]["llama_custom_sdpa_default"] == [0, 2]
    assert table["by_operator"]["auto_functionalized_v2"] == [0, 4]
    assert table["by_operator"]["_local_scalar_dense"] == [0, 1]
    assert table["by_operator"]["aten_linear_default"][1] == 0  # every linear is Core ML's
    report = inspect_program(folder)
    assert report.delegates == {"CoreMLBackend": 5}  # two subgraphs per layer (around attention), and the head's
    assert report.metadata["get_max_seq_len"] == 1 and report.metadata["enable_dynamic_shape"] is False
    if "CoreMLBackend" in delegates.registered_backends():  # an Apple runtime with Core ML runs it
        ETModelForCausalLM.from_pretrained(folder)
        return
    with pytest.raises(ProgramError, match=r"CoreMLBackend \(backend 'coreml'\).*does not include.*Apple device.*"
                                           r"built with the Core ML backend"):
        ETModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ProgramError, match=r"a program for backend='coreml' \(export_to_pte and `et-transformers "
                                           r"export` build one for another device\)"):
        ETModelForCausalLM.from_pretrained(folder.parent / "source", recipe="coreml-fp16", cache_dir=tmp_path)
    assert not any(tmp_path.rglob("model.pte"))  # refused before exporting


@needs_coreml
def test_cli_exports_coreml_4w_with_int4_weights_inside_the_delegates(exported, tmp_path):
    fp16_folder = exported("llama-llama3rope", "coreml", dtype="float16")[0]
    proc = run_cli("export", fp16_folder.parent / "source", "-o", tmp_path / "out", "--recipe", "coreml-4w",
                   "--max-seq-len", str(MAX_SEQ_LEN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    inspected = run_cli("inspect", tmp_path / "out")
    assert inspected.returncode == 0 and f"export config: coreml-4w, ctx {MAX_SEQ_LEN}" in inspected.stdout
    assert re.search(r"delegation: 5 CoreMLBackend \(5 subgraphs\)", inspected.stdout)
    table = {row.op_type: (row.delegated, row.non_delegated) for row in inspect_program(tmp_path / "out").operators}
    assert table["torchao_dequantize_affine_default"] == (2 * 7 + 1, 0)  # every linear and the head: Core ML's
    assert table["quantized_decomposed_embedding_4bit_dtype"] == (1, 0)
    pte = (tmp_path / "out" / "model.pte").read_bytes()
    assert b"constexpr_blockwise_shift_scale" in pte  # Core ML stores the int4 weights, dequantized in the model
    assert len(pte) < 0.75 * os.path.getsize(fp16_folder / "model.pte")


@pytest.mark.parametrize("fields, message", [
    ({"qlinear": "8da4w"}, r"qlinear='8da4w' is not supported with backend='coreml' first: Core ML takes weight-only"),
    ({"qlinear": "4w", "qhead": "8da8w"}, r"qhead='8da8w' is not supported with backend='coreml' first"),
    ({"qembedding": "8w"}, r"qembedding='8w' is not supported.*\['4w'\]"),
    ({"dtype": "bfloat16"}, r"dtype='bfloat16' is not supported with backend='coreml' first: Core ML computes in"),
    ({"verify_tokens": 4}, r"verify_tokens=4 cannot run.*Core ML delegates take one token per forward call"),
    ({"kv_cache_dtype": "int8"}, r"kv_cache_dtype='int8' is not supported with backend='coreml' first"),
])
def test_what_coreml_cannot_do_is_refused(fields, message):
    with pytest.raises(InvalidConfigError, match=message):
        ExportConfig(backend="coreml", **fields)


def test_coreml_programs_take_one_token_per_call_and_its_4_bit_weights_groups_of_32():
    assert ExportConfig(backend="coreml").tokens_per_call == 1
    assert ExportConfig(backend="coreml", qlinear="4w").qlinear_group_size == 32
    assert ExportConfig(backend=("xnnpack", "coreml"), qlinear="8da4w").tokens_per_call == 1


# -- configs ------------------------------------------------------------------------------------------


def test_backend_lists_are_ordered_and_one_name_keeps_the_old_key():
    assert ExportConfig(backend=("xnnpack",)) == ExportConfig()  # one spelling, one cache key
    assert ExportConfig().to_dict()["backend"] == "xnnpack"  # as every manifest before lists were accepted
    pair = ExportConfig(backend=["openvino", "xnnpack"])
    assert pair.backend == ("openvino", "xnnpack") and pair.backends == ("openvino", "xnnpack")
    assert pair.to_dict()["backend"] == ["openvino", "xnnpack"]
    assert ExportConfig.from_dict(pair.to_dict()) == pair
    assert ExportConfig(backend=("xnnpack", "openvino")) != pair
    assert pair.tokens_per_call == 1 and ExportConfig().tokens_per_call == ExportConfig().max_seq_len


@pytest.mark.parametrize("backend, message", [
    ("cuda", r"'cuda' is not a supported backend; use one of \['xnnpack', 'portable', 'openvino', 'vulkan', 'coreml'\]"),
    (("openvino", "metal"), r"'metal' is not a supported backend"),
    (("xnnpack", "xnnpack"), r"names a backend twice"),
    (("xnnpack", "portable"), r"'portable' delegates nothing.*use backend='portable' alone"),
    ((), r"backend=\(\) is not valid: give one of"),
    (None, r"backend=None is not valid"),
])
def test_bad_backends_are_refused(backend, message):
    with pytest.raises(InvalidConfigError, match=message):
        ExportConfig(backend=backend)


@pytest.mark.parametrize("fields, message", [
    ({"qlinear": "8da4w"}, r"qlinear='8da4w'.*not a weight compression OpenVINO makes.*'openvino-4w'"),
    ({"qlinear": "4w"}, r"head '4w', qembedding=None is not a weight compression OpenVINO makes"),
    ({"qembedding": "8w"}, r"qembedding='8w' needs qlinear"),
    ({"dtype": "bfloat16"}, r"dtype='bfloat16' is not supported with backend='openvino' first"),
    ({"verify_tokens": 4}, r"verify_tokens=4 cannot run.*one token per forward call"),
    ({"kv_cache_dtype": "int8"}, r"kv_cache_dtype='int8' is not supported with backend='openvino' first"),
])
def test_what_openvino_cannot_do_is_refused(fields, message):
    with pytest.raises(InvalidConfigError, match=message):
        ExportConfig(backend="openvino", **fields)


def test_xnnpack_first_keeps_xnnpack_quantization_but_not_verification_drafts():
    cfg = ExportConfig(backend=("xnnpack", "openvino"), qlinear="8da4w")
    assert cfg.qlinear_group_size == 32  # XNNPACK's default: the first backend's rules apply
    with pytest.raises(InvalidConfigError, match="verify_tokens=8 cannot run"):
        ExportConfig(backend=("xnnpack", "openvino"), verify_tokens=8)


def test_the_backend_table_covers_every_backend():
    from et_transformers.export.backends import BACKEND_TABLE

    assert tuple(BACKEND_TABLE) == BACKENDS
    assert {b.delegate_id for b in BACKEND_TABLE.values()} - {None} == set(delegates.DELEGATES)
    assert {RECIPES[r].get("backend", "xnnpack") for r in RECIPES} == set(BACKENDS)


def test_cli_backend_takes_an_ordered_comma_separated_list(tmp_path):
    proc = run_cli("export", tmp_path / "nowhere", "-o", tmp_path / "out", "--backend", "openvino,cuda")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "backend=('openvino', 'cuda'): 'cuda' is not a supported backend" in proc.stderr


@needs_openvino
def test_cli_exports_an_ordered_list(exported, tmp_path):
    source = exported("llama-llama3rope", "openvino")[0].parent / "source"
    proc = run_cli("export", source, "-o", tmp_path / "out", "--recipe", "openvino-fp32",
                   "--backend", "xnnpack,openvino", "--max-seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"delegation: \d+ OpenvinoBackend, \d+ XnnpackBackend \(\d+ subgraphs\); \d+ of \d+ graph "
                     r"nodes delegated \(\d+%, OpenvinoBackend \d+, XnnpackBackend \d+\)", proc.stdout.strip().splitlines()[-1])
    inspected = run_cli("inspect", tmp_path / "out")
    assert inspected.returncode == 0 and "export config: backend=xnnpack,openvino, ctx 32" in inspected.stdout
