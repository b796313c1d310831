"""Weight bytes per decode token (export) and the achieved weight bandwidth (GenerationStats)."""

from __future__ import annotations

import json
import shutil

import torch
from torch import nn

from et_transformers import ETModelForCausalLM
from et_transformers.export.quantize import QuantizedEmbedding, QuantizedLinear
from et_transformers.export.weight_bytes import decode_weight_bytes
from et_transformers.manifest import MANIFEST_NAME, Manifest


class TinyLM(nn.Module):
    def __init__(self, vocab=100, dim=16, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def test_an_untied_embedding_counts_one_row():
    model = TinyLM()
    head, norm, row = 100 * 16 * 4, 2 * 16 * 4, 16 * 4
    assert decode_weight_bytes(model) == head + norm + row


def test_a_tied_embedding_is_read_whole_by_the_head_and_counted_once():
    assert decode_weight_bytes(TinyLM(tied=True)) == 100 * 16 * 4 + 2 * 16 * 4


def test_quantized_layers_count_their_stored_bits_and_scales():
    qdata = torch.randint(-8, 8, (8, 64), dtype=torch.int8)
    linear = QuantizedLinear(qdata, torch.ones(8, 2), bits=4, group_size=32, dynamic_activations=True)
    # int4 values and float scales; the (symmetric, all-zero) zero points are never read
    assert decode_weight_bytes(linear) == 8 * 64 // 2 + 8 * 2 * 4
    table = QuantizedEmbedding(torch.randint(-128, 128, (10, 32), dtype=torch.int8), torch.ones(10, 1), 8,
                               torch.float32)
    assert decode_weight_bytes(table) == 32 + 4  # one int8 row and its scale


def test_the_export_records_it_and_generate_reports_the_bandwidth(tiny_llama_et, tiny_llama_model):
    config = tiny_llama_model.config
    params = sum(p.numel() * p.element_size() for p in tiny_llama_model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in tiny_llama_model.buffers())
    embedding = config.vocab_size * config.hidden_size * 4
    expected = params + buffers - embedding + config.hidden_size * 4  # the head is untied: one row read
    assert tiny_llama_et.manifest.weight_bytes_per_token == expected

    tiny_llama_et.generate(torch.tensor([[5, 9, 100]]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    stats = tiny_llama_et.stats
    assert stats.weight_bytes_per_token == expected
    assert abs(stats.decode_bandwidth_gb_s - expected * stats.decode_tokens_per_s / 1e9) < 1e-12
    assert "GB/s" in stats.summary()


def test_an_old_manifest_loads_and_the_stat_is_none(tiny_llama_export, tmp_path):
    folder = shutil.copytree(tiny_llama_export.output_dir, tmp_path / "old")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    del data["weight_bytes_per_token"]
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert Manifest.read(folder).weight_bytes_per_token is None
    model = ETModelForCausalLM.from_pretrained(folder, warmup=False)
    model.generate(torch.tensor([[5, 9]]), max_new_tokens=4, eos_token_id=None)
    assert model.stats.weight_bytes_per_token is None and model.stats.decode_bandwidth_gb_s is None
    assert "GB/s" not in model.stats.summary()
