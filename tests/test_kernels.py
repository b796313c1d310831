"""Our own ExecuTorch kernel (``et_transformers::q4_linear``, the ``q4_0`` scheme): the C++ kernel
equals its Python reference bit for bit in the runtime, a q4_0 program equals its eager model and
decodes a token exactly as a longer forward scores it, and a program whose kernels cannot be
loaded fails with a clear error."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import tiny
from et_transformers import ExportConfig, InvalidConfigError
from et_transformers.errors import ProgramError
from et_transformers.export import Exporter
from et_transformers.export.quantize import Q4Linear, Q4LinearSlice, QuantizedLinear, quantize_model
from et_transformers.kernels import ops
from et_transformers.runtime import Program, _bindings, load_kernel_libraries, load_own_kernels, needs_own_kernels

PROMPT = torch.tensor([[5, 9, 100, 33, 7, 200, 17, 4, 61]])


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g), torch.rand(n, k // 32, generator=g) * 0.05


def test_pack_round_trips():
    qdata, scale = _weights(24, 64, 0)
    qweight, scales = ops.pack_q4(qdata, scale)
    assert (qweight.dtype, qweight.shape, scales.dtype, scales.shape) == (torch.uint8, (3, 2, 128), torch.float16, (3, 2, 8))
    back, back_scales = ops.unpack_q4(qweight, scales)
    assert torch.equal(back, qdata) and torch.equal(back_scales, scale.half())
    with pytest.raises(ValueError, match="out_features % 8"):
        ops.pack_q4(qdata[:20], scale[:20])


@pytest.fixture(scope="module")
def linear_program(tmp_path_factory):
    """A program of two q4_linear calls (one on XNNPACK-computed input), with its eager module."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class TwoLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (n, k, seed) in {"a": (200, 96, 1), "b": (64, 200 - 8, 2)}.items():
                qweight, scales = ops.pack_q4(*_weights(n, k, seed))
                self.register_buffer(f"{name}_w", qweight)
                self.register_buffer(f"{name}_s", scales)
                self.register_buffer(f"{name}_c", ops.weight_sums(qweight, scales))

        def forward(self, x):
            y = torch.ops.et_transformers.q4_linear(x, self.a_w, self.a_s)
            per_token = torch.ops.et_transformers.q4_linear_per_token
            t = per_token(x, self.a_w, self.a_s, self.a_c)
            # relu: non-negative rows, whose zero points sit at -128 (the zero point's term at its largest)
            return (y, torch.ops.et_transformers.q4_linear(torch.relu(y[..., :192]), self.b_w, self.b_s),
                    t, per_token(torch.relu(t[..., :192]), self.b_w, self.b_s, self.b_c))

    module = TwoLinears().eval()
    example = (torch.randn(1, 4, 96),)
    exported = torch.export.export(module, example, dynamic_shapes=({1: torch.export.Dim("s", min=1, max=64)},))
    program = to_edge_transform_and_lower(
        exported, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=False)
    ).to_executorch()
    path = tmp_path_factory.mktemp("q4-linear") / "two_linears.pte"
    path.write_bytes(program.buffer)
    load_kernel_libraries()
    load_own_kernels(path)
    return _bindings()._load_for_executorch(str(path)), module, path


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_kernel_equals_reference_bit_for_bit(linear_program, rows):
    runtime, module, _ = linear_program
    x = torch.randn(1, rows, 96) * torch.logspace(-3, 3, rows).view(1, rows, 1)
    x[0, 0, :32] = 0  # an all-zero block: scale 0
    if rows > 1:
        x[0, 1] = 0  # an all-zero row (a verifying head's padding): skipped, its outputs +0
    got = runtime.forward((x,))
    expected = module(x)
    for g, e in zip(got, expected):
        assert torch.equal(g, e), float((g - e).abs().max())
    if rows > 1:
        for out in (got[0], got[2]):
            assert not torch.signbit(out[0, 1]).any() and not out[0, 1].any()
    # each row is computed as it would be alone
    alone = runtime.forward((x[:, -1:].contiguous(),))
    assert torch.equal(alone[0][0, 0], got[0][0, -1]) and torch.equal(alone[2][0, 0], got[2][0, -1])


def test_per_token_kernel_is_the_8da4w_linear(linear_program):
    """``q4_linear_per_token`` is XNNPACK's 8da4w arithmetic: int8 activations from
    ``quantized_decomposed``'s per-token ops (the same values), times the int4 weights, to float
    rounding; ``q4_linear`` on the same weights (per-block activations) is another result."""
    _, module, _ = linear_program
    qd = torch.ops.quantized_decomposed
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(6, 96, generator=g) * 4, torch.rand(2, 96, generator=g) + 0.5])  # mixed-sign and positive rows
    qdata, wscale = ops.unpack_q4(module.a_w, module.a_s)
    weight = (qdata.float().view(200, 3, 32) * wscale.float().unsqueeze(-1)).view(200, 96)
    scale, zero = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    xq = qd.dequantize_per_token(qd.quantize_per_token(x, scale, zero, -128, 127, torch.int8), scale, zero,
                                 -128, 127, torch.int8, torch.float32)
    expected = xq @ weight.T
    got = torch.ops.et_transformers.q4_linear_per_token(x, module.a_w, module.a_s, module.a_c)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert (zero.view(-1)[6:] == -128).all()  # the positive rows exercise the zero point's term
    per_block = torch.ops.et_transformers.q4_linear(x, module.a_w, module.a_s)
    assert (per_block - expected).abs().max() > 1e-3


def test_avx2_paths_pass_the_kernel_tests():
    """Where the CPU has AVX-512 the kernels take those paths; the AVX2 ones (every other x86-64
    CPU's) must pass the same tests: the GEMM bit for bit, attention and the layer operators to
    rounding and row by row. ``ET_TRANSFORMERS_NO_AVX512`` forces them, in a fresh process since the
    choice is made when the library loads."""
    import subprocess
    import sys
    from pathlib import Path

    if "avx512f" not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("no AVX-512 here: the tests above ran the AVX2 paths")
    env = {**os.environ, "ET_TRANSFORMERS_NO_AVX512": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "equals_reference_bit_for_bit or matches_softmax_attention or layer_kernels_match"],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


def test_program_records_that_it_needs_our_kernels(linear_program, tiny_llama_export):
    assert needs_own_kernels(linear_program[2])
    assert not needs_own_kernels(tiny_llama_export.output_dir / "model.pte")


def test_unloadable_kernels_raise_a_clear_error(linear_program, monkeypatch):
    from et_transformers import kernels

    def fail():
        raise kernels.KernelBuildError("no C++ compiler found (install g++ or set CXX)")

    monkeypatch.setattr(kernels, "load", fail)
    with pytest.raises(ProgramError, match=r"q4_linear.*q4_0.*8da4w_own.*no C\+\+ compiler"):
        Program(linear_program[2])


@pytest.fixture(scope="module")
def q4_export(tiny_llama_dir, tmp_path_factory):
    exporter = Exporter.from_pretrained(tiny_llama_dir, ExportConfig(max_seq_len=64, qlinear="q4_0", verify_tokens=8))
    exporter.pte = exporter.run(tmp_path_factory.mktemp("tiny-q4"))
    return exporter


def test_q4_program_equals_its_eager_model(q4_export, tiny_llama_model):
    report = q4_export.quantization_report
    assert report["linear"]["grouped"] == 15 and report["head"]["scheme"] == "q4_0"
    assert report["q4_0_fused"] == 4  # q/k/v and gate/up of each of the 2 layers: one call each
    assert report["q4_0_calibration_tokens"] == 64  # the calibration text, cut to the program's context
    eager = q4_export.module  # quantized with the calibration text's importance, our layer ops
    model = eager.model
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Q4LinearSlice) and attention.q_proj._fused[0] is attention.qkv_fused
    assert isinstance(model.model.layers[0].mlp.down_proj, Q4Linear) and isinstance(model.lm_head, Q4Linear)
    program = Program(q4_export.pte)
    with torch.no_grad():
        expected = eager(PROMPT, torch.arange(PROMPT.shape[1]))
    got = program._run(PROMPT, 0)  # the last 8 positions
    assert got.shape == expected.shape == (1, 8, 256)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        float_logits = tiny_llama_model(PROMPT).logits
    assert (got - float_logits[:, -8:]).abs().max() > 1e-3, "the weights were not quantized"
    operators = {f"{op.name}.{op.overload}" for op in q4_export.executorch_program.executorch_program.execution_plan[0].operators}
    ours = {f"et_transformers::{name}.out" for name in ("q4_linear", "sdpa", "rms_norm", "rope", "silu_mul")}
    assert ours <= operators
    assert "llama::custom_sdpa.out" not in operators
    # nothing between our kernels is left to XNNPACK (a delegate call per op would wake its pool)
    assert not q4_export.executorch_program.executorch_program.execution_plan[0].delegates


def test_q4_scales_are_searched_against_the_inputs():
    """Weighted by the inputs' mean squares, the searched scales beat llama.cpp's ``max / -8`` rule
    on every block's weighted error, and weighting moves the error off the heavy channels."""
    from et_transformers.export.weight_search import search_q4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    importance = torch.rand(128, generator=g) ** 4 * 100

    def blockwise_error(q, d, imp):
        deq = (q.float().view(64, 4, 32) * d.view(64, 4, 1)).view(64, 128)
        return ((deq - w) ** 2 * imp).view(64, 4, 32).sum(-1)

    blocks = w.view(-1, 32)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d_rule = (peak / -8).half().float()
    q_rule = torch.clamp(torch.floor(blocks / (peak / -8) + 8.5), 0, 15) - 8
    rule = blockwise_error(q_rule.view(64, 128), d_rule.view(64, 4), importance)
    searched = blockwise_error(*search_q4(w, importance), importance)
    assert (searched <= rule + 1e-6).all() and searched.sum() < 0.9 * rule.sum()
    uniform = blockwise_error(*search_q4(w), importance)
    assert searched.sum() < uniform.sum()


def test_a_program_built_for_other_kernels_is_refused(q4_export, monkeypatch):
    from et_transformers import kernels

    built_for = kernels.ABI
    monkeypatch.setattr(kernels, "COMPATIBLE_ABIS", (built_for + 1,))
    with pytest.raises(ProgramError, match=rf"built for version {built_for} .* run versions \[{built_for + 1}\] .*export it again"):
        Program(q4_export.pte)


def test_q4_decode_step_scores_a_token_as_a_longer_forward_does(q4_export):
    """One token decoded at position p gets, bit for bit, the logits a multi-token forward gives
    position p: every kernel computes each row alike, so verifying a draft scores it exactly as
    plain decoding would."""
    program = Program(q4_export.pte)
    together = program._run(PROMPT, 0)[0]  # positions 1 .. 8
    program.forward(PROMPT[:, :-3], 0)
    for i in range(PROMPT.shape[1] - 3, PROMPT.shape[1]):
        step = program.decode(int(PROMPT[0, i]), i)
        assert torch.equal(step[0], together[i - 1]), float((step[0] - together[i - 1]).abs().max())
    # our kernel's head returns min(S, k) rows: a decode step computes and returns one, not k - 1 of padding
    assert program._run(PROMPT[:, :1], 0).shape == (1, 1, 256)
    short = program._run(PROMPT[:, :3], 0)
    assert short.shape == (1, 3, 256) and torch.equal(short[0, 1:], together[:2])


def test_assisted_greedy_on_a_q4_program_is_plain_greedy(q4_export):
    """Exact on a quantized program: prompt lookup and a draft model keep plain greedy's tokens."""
    from et_transformers import ETModelForCausalLM

    target = ETModelForCausalLM.from_pretrained(q4_export.pte.parent)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]])
    plain = target.generate(prompt, max_new_tokens=40, do_sample=False)
    looked_up = target.generate(prompt, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5)
    assert torch.equal(looked_up, plain) and target.stats.drafted_tokens > 0
    drafted = target.generate(prompt, max_new_tokens=40, do_sample=False,
                              assistant_model=ETModelForCausalLM.from_pretrained(q4_export.pte.parent))
    assert torch.equal(drafted, plain) and target.stats.accepted_tokens == target.stats.drafted_tokens > 0


def test_q4_mixed_precision_and_bad_configs(tiny_llama_model):
    model = copy.deepcopy(tiny_llama_model)
    quantize_model(model, ExportConfig(qlinear="q4_0", qhead="8da8w", qlinear_8bit=("*.mlp.down_proj",)))
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, Q4LinearSlice)
    assert isinstance(layer.mlp.down_proj, QuantizedLinear) and layer.mlp.down_proj.bits == 8
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    with pytest.raises(InvalidConfigError, match=r"qlinear='q4_0' needs dtype='float32'.*bfloat16"):
        ExportConfig(qlinear="q4_0", dtype="bfloat16")
    for scheme in ("q4_0", "8da4w_own"):
        with pytest.raises(InvalidConfigError, match=rf"qlinear_group_size=64 has no effect: '{scheme}'.*groups of 32"):
            ExportConfig(qlinear=scheme, qlinear_group_size=64)
    with pytest.raises(InvalidConfigError, match=r"qhead='8da4w_own' needs dtype='float32'.*float16"):
        ExportConfig(qlinear="8da4w", qhead="8da4w_own", dtype="float16")
    # a layer the kernel's layout cannot hold runs the same numerics on XNNPACK
    odd = copy.deepcopy(tiny_llama_model)
    odd.lm_head = torch.nn.Linear(odd.lm_head.in_features, 250, bias=False)  # 250 outputs: not a multiple of 8
    report = quantize_model(odd, ExportConfig(qlinear="8da4w_own"))
    assert report["8da4w_own_fallback_8da4w"] == 1
    assert isinstance(odd.lm_head, QuantizedLinear) and (odd.lm_head.bits, odd.lm_head.group_size) == (4, 32)
    assert odd.lm_head.dynamic_activations


@pytest.fixture(scope="module")
def attention_program(tmp_path_factory):
    """A program of one ``et_transformers::sdpa`` call (q of 1-32 tokens, caches of 128 positions)."""
    from executorch.exir import EdgeCompileConfig, to_edge

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, pos):
            return torch.ops.et_transformers.sdpa(q, k, v, pos.item(), 0.125)

    example = (torch.randn(1, 3, 6, 64), torch.randn(1, 128, 2, 64), torch.randn(1, 128, 2, 64), torch.tensor([5]))
    s = torch.export.Dim("s", min=1, max=32)
    exported = torch.export.export(Attention(), example, dynamic_shapes=({1: s}, None, None, None), strict=False)
    path = tmp_path_factory.mktemp("sdpa") / "sdpa.pte"
    path.write_bytes(to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch().buffer)
    load_kernel_libraries()
    load_own_kernels(path)
    return _bindings()._load_for_executorch(str(path))


@pytest.mark.parametrize("start_pos, rows", [(0, 1), (0, 7), (37, 1), (90, 5), (3, 30), (100, 28)])
def test_attention_kernel_matches_softmax_attention(attention_program, start_pos, rows):
    """``et_transformers::sdpa`` in the runtime equals float32 softmax attention (grouped heads,
    causal from ``start_pos``) to float rounding, for one-token steps and multi-token calls, and
    computes each query exactly as a one-token step at its position would (what exact verification
    of drafts relies on)."""
    g = torch.Generator().manual_seed(start_pos + rows)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((1, rows, 6, 64), (1, 128, 2, 64), (1, 128, 2, 64)))
    got = attention_program.forward((q, k, v, torch.tensor([start_pos])))[0]
    torch.testing.assert_close(got, ops.sdpa_reference(q, k, v, start_pos, 0.125), atol=2e-6, rtol=1e-5)
    for s in {0, rows // 2, rows - 1}:
        alone = attention_program.forward((q[:, s : s + 1].contiguous(), k, v, torch.tensor([start_pos + s])))[0]
        assert torch.equal(alone[0, 0], got[0, s])


@pytest.fixture(scope="module")
def layer_ops_program(tmp_path_factory):
    """A program of our layer operators: RMSNorm (both forms), RoPE and SiLU-gated multiply."""
    from executorch.exir import EdgeCompileConfig, to_edge

    class LayerOps(torch.nn.Module):
        def forward(self, x, w, q, cos, sin, gate, up):
            ops_ = torch.ops.et_transformers
            return (ops_.rms_norm(x, w, 1e-6, False), ops_.rms_norm(x, w, 1e-5, True), ops_.rope(q, cos, sin),
                    ops_.silu_mul(gate, up))

    s = torch.export.Dim("s", min=1, max=32)
    example = (torch.randn(1, 3, 72), torch.randn(72), torch.randn(1, 3, 4, 24), torch.randn(1, 3, 24),
               torch.randn(1, 3, 24), torch.randn(1, 3, 44), torch.randn(1, 3, 44))
    shapes = ({1: s}, None, {1: s}, {1: s}, {1: s}, {1: s}, {1: s})
    exported = torch.export.export(LayerOps(), example, dynamic_shapes=shapes, strict=False)
    path = tmp_path_factory.mktemp("layer-ops") / "layer_ops.pte"
    path.write_bytes(to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch().buffer)
    load_kernel_libraries()
    load_own_kernels(path)
    return _bindings()._load_for_executorch(str(path))


@pytest.mark.parametrize("rows", [1, 5, 27])
def test_layer_kernels_match_their_references(layer_ops_program, rows):
    """RoPE equals transformers' formula bit for bit; RMSNorm and SiLU-mul to float rounding (wide
    value ranges, a last dim that is not a multiple of 8); every row as it would be alone."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 72, generator=g) * torch.logspace(-4, 4, rows).view(1, rows, 1)
    w = torch.randn(72, generator=g)
    q = torch.randn(1, rows, 4, 24, generator=g)
    angles = torch.randn(1, rows, 24, generator=g) * 50
    gate, up = torch.randn(1, rows, 44, generator=g) * 30, torch.randn(1, rows, 44, generator=g)
    got = layer_ops_program.forward((x, w, q, angles.cos(), angles.sin(), gate, up))
    torch.testing.assert_close(got[0], ops.rms_norm_reference(x, w, 1e-6, False), atol=1e-6, rtol=2e-6)
    torch.testing.assert_close(got[1], ops.rms_norm_reference(x, w, 1e-5, True), atol=1e-6, rtol=2e-6)
    assert torch.equal(got[2], ops.rope_reference(q, angles.cos(), angles.sin()))
    torch.testing.assert_close(got[3], ops.silu_mul_reference(gate, up), atol=1e-6, rtol=2e-6)
    last = layer_ops_program.forward(tuple(t[:, -1:].contiguous() if t.dim() > 1 else t
                                           for t in (x, w, q, angles.cos(), angles.sin(), gate, up)))
    for a, b in zip(last, got):
        assert torch.equal(a[0, 0], b[0, -1])


@pytest.fixture(scope="module")
def own_8da4w_model(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama exported with ``xnnpack-8da4w-own`` (the peer's scheme on our kernels)."""
    from et_transformers import ETModelForCausalLM

    return ETModelForCausalLM.from_pretrained(tiny_llama_dir, recipe="xnnpack-8da4w-own", max_seq_len=64,
                                              cache_dir=tmp_path_factory.mktemp("own-8da4w"), warmup=False)


def test_8da4w_own_is_8da4w_on_our_kernel(own_8da4w_model, tiny_llama_model):
    """The same torchao weights as XNNPACK's ``8da4w`` in groups of 32 (scales as float16), the head
    too; every linear runs ``q4_linear_per_token`` (q/k/v and gate/up fused), nothing on XNNPACK; the
    logits are the eager 8da4w model's (its scales rounded to float16 as ours are) to float rounding
    and the greedy tokens the same."""
    from executorch.exir._serialize import _deserialize_pte_binary

    own = copy.deepcopy(tiny_llama_model)
    quantize_model(own, ExportConfig(qlinear="8da4w_own", qembedding="8w"))
    xnn = copy.deepcopy(tiny_llama_model)
    quantize_model(xnn, ExportConfig(qlinear="8da4w", qlinear_group_size=32, qembedding="8w"))
    for name, module in xnn.named_modules():
        if isinstance(module, QuantizedLinear):
            mine = own.get_submodule(name)
            if isinstance(mine, Q4LinearSlice):
                fused = mine._fused[0]
                qdata, scale = ops.unpack_q4(fused.qweight, fused.scales)
                qdata, scale = qdata[mine.start : mine.stop], scale[mine.start : mine.stop]
            else:
                qdata, scale = ops.unpack_q4(mine.qweight, mine.scales)
            assert torch.equal(qdata, module.qdata), name
            assert torch.equal(scale, module.scale.half()), name
    assert isinstance(own.lm_head, Q4Linear) and own.lm_head.scheme == "8da4w_own"
    program = _deserialize_pte_binary(own_8da4w_model.pte_path.read_bytes()).program
    operators = {f"{op.name}.{op.overload}" for op in program.execution_plan[0].operators}
    assert "et_transformers::q4_linear_per_token.out" in operators and "et_transformers::q4_linear.out" not in operators
    assert not program.execution_plan[0].delegates
    for module in xnn.modules():  # our layout keeps the scales as float16 (XNNPACK's as bfloat16)
        if isinstance(module, QuantizedLinear):
            module.scale.data = module.scale.half().float()
    with torch.no_grad():
        expected = xnn(PROMPT).logits[:, -1]
    got = own_8da4w_model.program.forward(PROMPT, 0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = xnn.generate(PROMPT, max_new_tokens=24, do_sample=False, eos_token_id=None)
    ours = own_8da4w_model.generate(PROMPT, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, plain)


def test_cpp_runner_runs_an_8da4w_own_program_as_generate_does(own_8da4w_model):
    tok = tiny.make_tokenizer()
    prompt = "Paris is the capital of"
    text = tiny.cpp_runner_text(own_8da4w_model.pte_path.parent, prompt, 24)
    ids = tok(prompt, return_tensors="pt").input_ids
    ours = own_8da4w_model.generate(ids, max_new_tokens=24, do_sample=False)
    assert text == tok.decode(ours[0, ids.shape[1]:])
