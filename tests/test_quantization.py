"""Quantization on a tiny Llama: every scheme exports and generates, knobs change the program,
fallbacks are logged, evaluation programs return every position, and bad values fail clearly.

Each distinct program is exported once per module (``programs`` fixture) and shared by the tests.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import tiny
from et_transformers import ETModelForCausalLM, ExportConfig, InvalidConfigError
from et_transformers.config import DEFAULT_RECIPE, RECIPES, recipe
from et_transformers.export import Exporter
from et_transformers.export.quantize import quantize_model
from et_transformers.runtime import Program

PROMPT = torch.tensor([[5, 9, 100, 33, 7, 200, 17]])

#: name -> ExportConfig fields; together they cover every scheme, dtype and knob.
VARIANTS = {
    "8da4w-g32": dict(qlinear="8da4w", qlinear_group_size=32, qembedding="4w", qembedding_group_size=32),
    "8da4w-g128": dict(qlinear="8da4w", qlinear_group_size=128, qembedding="4w", qembedding_group_size=32),
    "8da8w-kv8": dict(qlinear="8da8w", qlinear_group_size=None, qembedding="8w", kv_cache_dtype="int8"),
    "portable-4w": dict(backend="portable", qlinear="4w", qlinear_group_size=None, qembedding="8w"),
    "portable-8w": dict(backend="portable", qlinear="8w", qlinear_group_size=None),
    "bf16-8da4w": dict(dtype="bfloat16", qlinear="8da4w"),
    "fp16-8da4w-head8": dict(dtype="float16", qlinear="8da4w", qhead="8da8w", qlinear_8bit=("*.mlp.down_proj",)),
    "fp32-all-logits": dict(logits="all"),
    "fp32-kv8-all-logits": dict(kv_cache_dtype="int8", logits="all"),
}
#: largest relative error of the last logits vs eager fp32 we accept (random weights quantize badly:
#: their values are uniform, so 4-bit steps are coarse; 8-bit must be close).
TOLERANCE = {"4": 0.7, "8": 0.1, "all": 1e-5}


class _Programs:
    def __init__(self, model_dir, root):
        self.model_dir, self.root, self.built = model_dir, root, {}

    def get(self, name: str) -> Exporter:
        if name not in self.built:
            exporter = Exporter.from_pretrained(self.model_dir, ExportConfig(max_seq_len=64, **VARIANTS[name]))
            exporter.pte = exporter.run(self.root / name)
            self.built[name] = exporter
        return self.built[name]


@pytest.fixture(scope="module")
def programs(tiny_llama_dir, tmp_path_factory):
    """Exports of ``VARIANTS`` made on first use and shared by the module's tests."""
    return _Programs(tiny_llama_dir, tmp_path_factory.mktemp("quantized"))


def _operators(exporter: Exporter) -> set[str]:
    plan = exporter.executorch_program.executorch_program.execution_plan[0]
    return {f"{op.name}.{op.overload}" for op in plan.operators}


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_scheme_exports_and_generates(programs, tiny_llama_model, name):
    exporter = programs.get(name)
    fields = VARIANTS[name]
    program = Program(exporter.pte)
    with torch.no_grad():
        reference = tiny_llama_model(PROMPT).logits[:, -1]
    error = _relative_error(program.forward(PROMPT, 0), reference)
    scheme = fields.get("qlinear")
    if scheme is None:  # float weights: exact, unless the KV cache is int8
        assert error < TOLERANCE["8" if fields.get("kv_cache_dtype") else "all"], (name, error)
    else:
        assert error < TOLERANCE[scheme[-2]], (name, error)
        assert error > 1e-4, f"{name}: logits equal fp32's, so the weights were not quantized"
    # it generates through the model API, as any user would call it
    model = ETModelForCausalLM.from_pte(exporter.pte)
    out = model.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out.shape == (1, PROMPT.shape[1] + 8)
    assert int(out.min()) >= 0 and int(out.max()) < tiny.VOCAB_SIZE

    report = exporter.quantization_report
    if scheme is not None:
        assert report["linear"]["grouped"] + report["linear"]["per_channel_fallback"] == 15  # 7 per layer + head
        assert report["head"] == {"name": "model.lm_head", "scheme": fields.get("qhead", scheme)}
    if fields.get("qembedding"):
        assert report["embedding"]["grouped"] == 1
    operators = _operators(exporter)
    if fields.get("kv_cache_dtype") == "int8":
        assert "llama::custom_quantized_sdpa.out" in operators, operators
    if fields.get("backend") == "portable":
        assert exporter.delegation_summary().num_delegated_subgraphs == 0
    elif scheme is not None:
        table = exporter.delegation_summary().get_operator_delegation_dataframe().set_index("op_type")
        assert table.loc["aten_linear_default", "occurrences_in_non_delegated_graphs"] == 0


def test_group_size_changes_size_and_numerics(programs):
    fine, coarse = programs.get("8da4w-g32"), programs.get("8da4w-g128")
    assert fine.pte.stat().st_size != coarse.pte.stat().st_size
    a, b = Program(fine.pte).forward(PROMPT, 0), Program(coarse.pte).forward(PROMPT, 0)
    assert not torch.allclose(a, b)
    # hidden size 64 < 128: q/k/v/o/gate/up (and the head) fall back to per-channel; down_proj (in 128) is grouped
    assert coarse.quantization_report["linear"] == {"grouped": 2, "per_channel_fallback": 13}


def test_group_size_fallback_is_logged_per_layer(tiny_llama_model, caplog):
    model = copy.deepcopy(tiny_llama_model)
    with caplog.at_level(logging.INFO, logger="et_transformers.export.quantize"):
        report = quantize_model(model, ExportConfig(qlinear="8da4w", qlinear_group_size=128))
    assert report["linear"] == {"grouped": 2, "per_channel_fallback": 13}
    assert "quantized per output channel instead" in caplog.text
    assert "model.layers.0.self_attn.q_proj" in caplog.text


def test_8bit_layers_are_quantized_per_channel_at_8_bits(tiny_llama_model):
    model = copy.deepcopy(tiny_llama_model)
    quantize_model(model, ExportConfig(qlinear="8da4w", qlinear_8bit=("*.mlp.down_proj",)))
    down, up = model.model.layers[0].mlp.down_proj, model.model.layers[0].mlp.up_proj
    assert (down.bits, down.per_channel) == (8, True)
    assert (up.bits, up.per_channel) == (4, False)


def test_head_scheme_is_honoured(programs):
    head8 = programs.get("fp16-8da4w-head8")
    assert head8.quantization_report["head"]["scheme"] == "8da8w"
    assert head8.quantization_report["linear_8bit"] == 2  # one down_proj per layer
    assert "8da8w" not in {v["scheme"] for k, v in programs.get("bf16-8da4w").quantization_report.items()
                           if k == "head"}


def test_evaluation_program_returns_every_position_like_eager(programs, tiny_llama_model):
    program = Program(programs.get("fp32-all-logits").pte)
    assert program.metadata.all_logits
    with torch.no_grad():
        reference = tiny_llama_model(PROMPT).logits
    logits = program.forward_all(PROMPT, 0)
    assert logits.shape == (1, PROMPT.shape[1], tiny.VOCAB_SIZE)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(program.forward(PROMPT, 0), reference[:, -1], atol=1e-4, rtol=0)


def test_int8_kv_cache_program_equals_the_eager_wrapper(programs, tiny_llama_model):
    """The exported int8-KV program computes what the eager wrapper computes (the same ExecuTorch
    kernels run in both), over a prefill and decode steps that read the quantized cache; so
    int8-KV quality measured in eager (tests/test_real_model.py) is the program's."""
    from et_transformers.export.wrapper import ExportableCausalLM

    program = Program(programs.get("fp32-kv8-all-logits").pte)
    eager = ExportableCausalLM(copy.deepcopy(tiny_llama_model), 64, kv_cache_dtype="int8", logits="all").eval()
    steps = [PROMPT, torch.tensor([[11]]), torch.tensor([[42]]), torch.tensor([[3, 8]])]
    pos = 0
    for ids in steps:
        positions = torch.arange(pos, pos + ids.shape[1])
        with torch.no_grad():
            expected = eager(ids, positions)
        torch.testing.assert_close(program.forward_all(ids, pos), expected, atol=1e-4, rtol=0)
        pos += ids.shape[1]
    with torch.no_grad():
        float_logits = tiny_llama_model(torch.cat(steps, dim=1)).logits[:, -2:]
    assert (expected - float_logits).abs().max() > 1e-5, "the cache was not quantized"


def test_model_call_returns_logits_like_transformers(tiny_llama_et, tiny_llama_model):
    """``model(input_ids).logits`` on a generation program (one call per position) equals eager."""
    with torch.no_grad():
        reference = tiny_llama_model(PROMPT).logits
    out = tiny_llama_et(PROMPT)
    assert out.logits.shape == reference.shape
    torch.testing.assert_close(out.logits, reference, atol=1e-4, rtol=0)


def test_recipes():
    assert DEFAULT_RECIPE in RECIPES
    cfg = recipe("xnnpack-8da4w-kv8", max_seq_len=256)
    assert (cfg.qlinear, cfg.kv_cache_dtype, cfg.max_seq_len) == ("8da4w", "int8", 256)
    assert recipe("xnnpack-fp32") == ExportConfig()
    with pytest.raises(InvalidConfigError, match=r"recipe='xnnpack-3bit'.*xnnpack-8da4w"):
        recipe("xnnpack-3bit")
    with pytest.raises(InvalidConfigError, match="not both"):
        ETModelForCausalLM.from_pretrained("unused", recipe="xnnpack-fp32", export_config=ExportConfig())


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"qlinear": "int4"}, r"qlinear='int4'.*'8da4w', '8da8w', '4w', '8w'"),
        ({"qembedding": "2w"}, r"qembedding='2w'.*'4w', '8w'"),
        ({"qhead": "fp8"}, r"qhead='fp8'.*'same'"),
        ({"qlinear": "8da4w", "qlinear_group_size": 0}, r"qlinear_group_size=0.*power of two"),
        ({"qembedding": "8w", "qembedding_group_size": 24}, r"qembedding_group_size=24.*power of two"),
        ({"kv_cache_dtype": "int4"}, r"kv_cache_dtype='int4'.*int8"),
        ({"logits": "some"}, r"logits='some'.*'last', 'all'"),
        ({"qlinear": "4w"}, r"qlinear='4w' cannot run on backend='xnnpack'.*8da4w"),
        ({"qlinear": "8da8w", "qlinear_group_size": 32}, r"qlinear_group_size=32 has no effect.*'8da8w'.*None"),
        ({"qlinear": "8da8w", "qlinear_group_size": None, "dtype": "bf16"}, r"bfloat16.*xnnpack"),
        ({"backend": "portable", "qlinear": "4w", "qlinear_group_size": 64}, r"portable.*per output channel"),
        ({"qhead": "8w"}, r"qhead='8w' cannot run on backend='xnnpack'"),
        ({"qlinear": "8da4w", "qhead": "8da8w", "dtype": "bfloat16"}, r"qhead='8da8w' with dtype='bfloat16'"),
        ({"qlinear": "8da4w", "qlinear_8bit": "*.down_proj"}, r"qlinear_8bit='\*.down_proj'.*tuple"),
        ({"qlinear": "8da8w", "qlinear_group_size": None, "qlinear_8bit": ("*.down_proj",)}, r"needs a 4-bit"),
    ],
)
def test_bad_quantization_values_list_the_accepted_ones(fields, fragment):
    with pytest.raises(InvalidConfigError, match=fragment):
        ExportConfig(**fields)


# -- half-precision checkpoints and memory ---------------------------------------------------------

def _staged(model_dir, fields) -> Exporter:
    """An exporter run through load → source_transform → to_dtype → quantize (no lowering)."""
    exporter = Exporter.from_pretrained(model_dir, ExportConfig(max_seq_len=64, **fields), progress=False)
    return exporter.load().source_transform().to_dtype().quantize()


def _tensors(module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    named.update({n: b for n, b in module.named_buffers(remove_duplicate=False)})
    return named


@pytest.mark.parametrize(
    "case, stored, fields",
    [
        ("llama-llama3rope", torch.bfloat16, RECIPES[DEFAULT_RECIPE]),
        ("llama-llama3rope", torch.float16, RECIPES[DEFAULT_RECIPE]),
        ("gpt2", torch.bfloat16, RECIPES[DEFAULT_RECIPE]),  # Conv1D -> Linear before the cast
        ("gemma3_text", torch.bfloat16, dict(qlinear="8da4w", qembedding="8w", dtype="bfloat16")),
        ("gemma3_text", torch.bfloat16, dict(qlinear=None, qembedding=None)),
    ],
    ids=["llama-bf16-default-recipe", "llama-fp16-default-recipe", "gpt2-bf16-default-recipe",
         "gemma3-bf16-8da4w", "gemma3-bf16-fp32"],
)
def test_half_precision_checkpoint_exports_exactly_like_a_float32_load(case, stored, fields, tmp_path, monkeypatch):
    """A bf16/fp16 checkpoint loads memory-mapped as stored and each layer is cast when quantized,
    yet the program's weights and buffers are bit-identical to loading everything in float32 first
    (Gemma3's embedding scale, sqrt(96), is not representable in bf16: it must still come out exact)."""
    from et_transformers.export import loading
    from et_transformers.export.quantize import float_layer_weights

    config = tiny.FAMILY_CASES[case](hidden_size=96) if case.startswith("gemma") else tiny.FAMILY_CASES[case]()
    tiny.make_model(config).to(stored).save_pretrained(tmp_path / "half")
    tiny.make_tokenizer().save_pretrained(tmp_path / "half")

    lazy = Exporter.from_pretrained(tmp_path / "half", ExportConfig(max_seq_len=64, **fields), progress=False)
    lazy.load().source_transform().to_dtype()
    quantizing = fields.get("qlinear") or fields.get("qembedding")
    # until the quantize stage, linear/embedding weights stay as stored, never whole in float32
    assert {w.dtype for w in float_layer_weights(lazy.module)} == {stored if quantizing else torch.float32}
    lazy.quantize()

    monkeypatch.setattr(loading, "stored_dtype", lambda source: torch.float32)
    eager = _staged(tmp_path / "half", fields)

    got, expected = _tensors(lazy.module), _tensors(eager.module)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    if case.startswith("gemma") and fields.get("dtype") is None:
        assert float(got["model.model.embed_tokens.embed_scale"]) == pytest.approx(96 ** 0.5, abs=1e-6)


def test_chunked_quantization_is_bit_identical(tiny_llama_model, monkeypatch):
    """Weights are quantized a block of rows at a time (a 128k-row head would otherwise need GBs of
    temporaries); blocks of 3 rows give exactly the values of one call over the whole weight."""
    from et_transformers.export import quantize as q

    whole, chunked = copy.deepcopy(tiny_llama_model), copy.deepcopy(tiny_llama_model)
    config = ExportConfig(**RECIPES[DEFAULT_RECIPE])  # 4-bit g32, 8-bit head/down_proj, 8-bit embedding
    quantize_model(whole, config)
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 3 * 64)
    quantize_model(chunked, config)
    a, b = dict(whole.named_buffers()), dict(chunked.named_buffers())
    assert a.keys() == b.keys() and any(n.endswith("qdata") for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stored_dtype_reads_the_safetensors_headers(tmp_path):
    """One floating dtype in every file: load in it; mixed, pickles or GGUF: float32 (always exact)."""
    from safetensors.torch import save_file

    from et_transformers.export.loading import stored_dtype
    from et_transformers.hub import ModelSource

    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.zeros(2, dtype=torch.long)},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert stored_dtype(ModelSource(tmp_path)) == torch.bfloat16
    assert stored_dtype(ModelSource(tmp_path, use_safetensors=False)) == torch.float32
    assert stored_dtype(ModelSource(tmp_path, gguf_file="m.gguf")) == torch.float32
    save_file({"c": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "extra.safetensors"))
    assert stored_dtype(ModelSource(tmp_path)) == torch.float32


def test_each_activation_is_quantized_once(programs):
    """q/k/v read one quantized copy of the normed hidden states, gate/up another: per layer four
    dynamic quantizations (attention input, o_proj's, MLP input, down_proj's), plus the head's."""
    exporter = programs.get("8da4w-g32")
    choose = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default
    count = sum(n.target == choose for n in exporter.exported_program.graph.nodes)
    assert count == 4 * tiny.llama_config().num_hidden_layers + 1
