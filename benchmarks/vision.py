"""Vision-encoder benchmark: export time, peak RSS, .pte size, encode latency and quantization error
of the ``vision_encoder`` method of image-text-to-text programs.

Per family (LLaVA, SmolVLM, Gemma 3; Idefics3 with ``--families``) and size:

* ``tiny``: the random 32x32 towers of ``tests/tiny.py`` (``vlm_config``);
* ``real``: a real model's vision tower and projector with random weights (SmolVLM-256M-Instruct's
  SigLIP 512/16 with scale factor 4, 64 tokens; LLaVA-1.5's CLIP ViT-L/14-336, 576 tokens;
  Gemma 3 4B's SigLIP 896/14 pooled to 256 tokens; Idefics3-8B's SigLIP 364/14, 169 tokens), on a
  2-layer text decoder of hidden size ``--text-hidden`` (the projector maps to it; the text decoder
  is not measured, and a real one would not fit in memory with random weights).

and per scheme of the vision linears (``fp32``, ``8da8w``, ``8da4w`` with groups of 32, quantized by
``quantize_model`` as ``MultimodalExporter.quantize`` does), each in a fresh process of its own:

* **export**: ``VisionEncoder`` -> quantize -> ``torch.export`` (+ the XNNPACK-friendly rewrites)
  -> ``lowering.lower`` with the XNNPACK partitioner -> ``to_executorch`` -> ``.pte`` written, the
  library's own path for that method; seconds from building the ``VisionEncoder`` (the checkpoint
  load before it is not counted), the process's peak RSS (``ru_maxrss``, imports and the loaded
  model included) and the file size;
* **encode**: the ``.pte`` loaded by the ExecuTorch runtime alone (no transformers in that process),
  one warm-up call (XNNPACK packs its weights), then the median of ``--runs`` calls of
  ``vision_encoder`` on one random image;
* **quality**: relative L2 error and mean per-token cosine similarity of those features against the
  float32 eager ``VisionEncoder`` on the same image (the ``eager`` row: its encode time, torch on
  one thread, as ``OMP_NUM_THREADS=1`` leaves it). Random weights have none of a trained model's
  outlier channels, so these errors are a floor, not a prediction for a checkpoint.

The ``program`` rows are whole ``ETModelForImageTextToText.from_pretrained(tiny folder,
recipe="xnnpack-fp32", force_export=True)`` exports (``model.stats.export_time``; all three methods,
default ``max_seq_len``), with the encode time and error of the program's own ``vision_encoder``.

Threads: ExecuTorch's pool uses every core; run with ``OMP_NUM_THREADS=1`` (set here if unset).
A configuration whose process runs past ``--timeout`` seconds is reported as skipped; ``--skip``
leaves configurations out (``gemma3:real``, ``llava:real:8da4w``, ``program``).

Run:  python benchmarks/vision.py [--families llava,smolvlm,gemma3] [--sizes tiny,real]
                                 [--schemes fp32,8da8w,8da4w] [--runs 5] [--skip gemma3:real] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from et_transformers.threads import prefer_single_threaded_blas  # noqa: E402

prefer_single_threaded_blas()  # before torch loads

FAMILIES = ("llava", "smolvlm", "gemma3", "idefics3")
DEFAULT_FAMILIES = ("llava", "smolvlm", "gemma3")
SIZES = ("tiny", "real")
SCHEMES = ("fp32", "8da8w", "8da4w")
GROUP_SIZE = 32
METHOD = "vision_encoder"
MIB = 1024 * 1024

#: Real vision towers: (vision config class, its fields, the VLM config's own fields). The text
#: decoder stays the tiny one, widened to --text-hidden.
REAL_VISION = {
    "smolvlm": ("SmolVLMVisionConfig",  # SmolVLM-256M-Instruct
                dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=512, patch_size=16),
                dict(scale_factor=4)),
    "llava": ("CLIPVisionConfig",  # llava-1.5-7b-hf (CLIP ViT-L/14-336)
              dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
              dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
    "gemma3": ("SiglipVisionConfig",  # gemma-3-4b-it (SigLIP-So400m, no pooling head)
               dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False),
               dict(mm_tokens_per_image=256)),
    "idefics3": ("Idefics3VisionConfig",  # Idefics3-8B-Llama3 (SigLIP-So400m at 364)
                 dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=364, patch_size=14),
                 dict(scale_factor=2)),
}
REAL_TOKENS = {"smolvlm": 64, "llava": 576, "gemma3": 256, "idefics3": 169}


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, the last one the parent reads."""
    print("RESULT " + json.dumps(result), flush=True)


# -- workers (each in its own process) -------------------------------------------------------------


def vlm_config(kind: str, size: str, text_hidden: int):
    """The tiny config of ``kind``, or its real vision tower on the tiny text decoder widened to
    ``text_hidden``; token ids are the tiny tokenizer's either way."""
    import transformers

    import tiny

    config = tiny.vlm_config(kind)
    if size == "tiny":
        return config
    vision_class, vision_fields, own = REAL_VISION[kind]
    fields = config.to_dict()
    text = dict(fields["text_config"])
    text.update(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    text["head_dim"] = text_hidden // 4
    fields.update(own, text_config=text, vision_config=getattr(transformers, vision_class)(**vision_fields).to_dict())
    return type(config).from_dict(fields)


def write_folder(kind: str, size: str, folder: Path, text_hidden: int) -> dict:
    """A random-weight checkpoint of ``(kind, size)`` in ``folder``: config, safetensors, tokenizer."""
    import torch
    import transformers

    import tiny

    from et_transformers.architectures import resolve_vision_architecture

    t0 = time.perf_counter()
    config = vlm_config(kind, size, text_hidden)
    torch.manual_seed(0)
    model = getattr(transformers, resolve_vision_architecture(config).model_class)(config).eval()
    if kind == "gemma3":
        # transformers initialises Gemma 3's projection matrix (a Parameter, not a Linear) to zeros,
        # and random weights never change it: every image's features would be zero.
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            weight.normal_(std=config.text_config.initializer_range)
    model.save_pretrained(folder)
    tok = tiny.make_vlm_tokenizer()
    processor = tiny.vlm_processor(kind, tok) if size == "tiny" else None
    (processor or tok).save_pretrained(folder)
    return {"seconds": time.perf_counter() - t0}


def load(folder: Path):
    """The checkpoint through the exporter's own loader: ``(model, vision architecture, image shape)``."""
    from et_transformers.export.multimodal import load_vision_model
    from et_transformers.hub import ModelSource

    loaded, arch = load_vision_model(ModelSource(path=folder))
    vision = loaded.model.config.vision_config
    side = int(vision.image_size)
    return loaded.model, arch, (1, int(getattr(vision, "num_channels", 3)), side, side)


def random_image(shape: tuple[int, ...], seed: int = 0):
    """Pixels in [-1, 1], the range the families' processors normalise to."""
    import torch

    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference(folder: Path, out: Path, runs: int) -> dict:
    """The float32 eager features of the benchmark image (saved to ``out``) and the eager encode time."""
    import torch

    from et_transformers.export.multimodal import VisionEncoder

    vlm, arch, shape = load(folder)
    encoder = VisionEncoder(vlm, arch, shape).eval()
    image = random_image(shape)
    times = []
    with torch.no_grad():
        for _ in range(max(1, min(runs, 3))):
            t0 = time.perf_counter()
            features = encoder(image)
            times.append(time.perf_counter() - t0)
    torch.save({"image": image, "features": features}, out)
    params = sum(p.numel() for p in encoder.parameters())
    return {"encode_ms": 1000 * statistics.median(times), "shape": list(features.shape), "params": params,
            "finite": bool(torch.isfinite(features).all()), "feature_std": float(features.std()),
            "peak_rss_mib": peak_rss_mib()}


def export(folder: Path, scheme: str, pte: Path) -> dict:
    """Export the vision encoder of ``folder`` alone as a one-method program (see the module docstring)."""
    import torch

    import executorch.kernels.quantized  # noqa: F401  (out-variants of the quantized ops)
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    from et_transformers import ExportConfig
    from et_transformers.export.backends import keep_ops_for, partitioners_for
    from et_transformers.export.lowering import lower
    from et_transformers.export.multimodal import VisionEncoder
    from et_transformers.export.passes import apply_xnnpack_friendly_rewrites
    from et_transformers.export.quantize import quantize_model

    t0 = time.perf_counter()
    vlm, arch, shape = load(folder)
    load_s, rss_loaded = time.perf_counter() - t0, peak_rss_mib()
    stages: dict[str, float] = {}
    report = None
    cfg = ExportConfig(max_seq_len=64, qlinear=None if scheme == "fp32" else scheme, qhead=None,
                       qlinear_group_size=GROUP_SIZE if scheme == "8da4w" else None)
    start = mark = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    encoder = VisionEncoder(vlm, arch, shape).eval()
    stage("encoder")
    if scheme != "fp32":
        report = quantize_model(encoder, cfg, torch.float32)
        stage("quantize")
    with torch.no_grad():
        ep = torch.export.export(encoder, (torch.zeros(shape),), strict=False)
        ep = apply_xnnpack_friendly_rewrites(ep)
    stage("export")
    edge = lower({METHOD: ep}, partitioners_for(cfg), {}, keep_ops=keep_ops_for(cfg))
    stage("lower")
    edge = edge.transform([ConvertToLinearPass()])
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    stage("to_executorch")
    with open(pte, "wb") as f:
        program.write_to_file(f)
    stage("write")
    seconds, rss = time.perf_counter() - start, peak_rss_mib()
    info = get_delegation_info(edge.exported_program(METHOD).graph_module)
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated}
    return {"export_s": seconds, "stages_s": stages, "load_s": load_s, "peak_rss_mib": rss,
            "rss_after_load_mib": rss_loaded, "pte_mb": pte.stat().st_size / 1e6,
            "delegated_subgraphs": info.num_delegated_subgraphs, "non_delegated_ops": outside,
            "quantization": report}


def compare(features, ref) -> dict:
    """Relative L2 error and mean per-token cosine similarity of ``features`` against ``ref``."""
    import torch

    got, want = features.reshape(-1, ref.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double()
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    cos = float(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean())
    return {"rel_error": rel, "cosine": cos, "finite": bool(torch.isfinite(got).all())}


def run(pte: Path, ref_path: Path, runs: int) -> dict:
    """Encode the benchmark image with the ``.pte`` (ExecuTorch runtime only): timings and error."""
    import torch

    from et_transformers.runtime import _bindings, load_kernel_libraries

    ref = torch.load(ref_path)
    load_kernel_libraries()
    t0 = time.perf_counter()
    module = _bindings()._load_for_executorch(str(pte))
    load_s = time.perf_counter() - t0
    image = ref["image"].contiguous()
    t0 = time.perf_counter()
    features = module.run_method(METHOD, (image,))[0]
    first_ms = 1000 * (time.perf_counter() - t0)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        features = module.run_method(METHOD, (image,))[0]
        times.append(time.perf_counter() - t0)
    return {"encode_ms": 1000 * statistics.median(times), "first_ms": first_ms, "load_s": load_s,
            "peak_rss_mib": peak_rss_mib(), **compare(features, ref["features"])}


def program(kind: str, work: Path, runs: int) -> dict:
    """The whole fp32 program of the tiny ``kind`` through ``ETModelForImageTextToText.from_pretrained``."""
    import torch

    from et_transformers import ETModelForImageTextToText
    from et_transformers.export.multimodal import VisionEncoder

    folder = work / "src"
    write_folder(kind, "tiny", folder, 0)
    t0 = time.perf_counter()
    model = ETModelForImageTextToText.from_pretrained(folder, recipe="xnnpack-fp32", force_export=True,
                                                      cache_dir=work / "cache")
    wall, rss = time.perf_counter() - t0, peak_rss_mib()
    vlm, arch, shape = load(folder)
    image = random_image(shape)
    with torch.no_grad():
        ref = VisionEncoder(vlm, arch, shape).eval()(image)
    model.program.encode_image(image)  # warm-up
    times = []
    for _ in range(runs):
        t1 = time.perf_counter()
        features = model.program.encode_image(image)
        times.append(time.perf_counter() - t1)
    return {"export_s": model.stats.export_time, "wall_s": wall, "peak_rss_mib": rss,
            "pte_mb": model.pte_path.stat().st_size / 1e6, "encode_ms": 1000 * statistics.median(times),
            "max_seq_len": model.program.metadata.max_context_len, **compare(features, ref)}


def worker(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    task, folder = args.worker, Path(args.folder) if args.folder else None
    if task == "write":
        emit(write_folder(args.family, args.size, folder, args.text_hidden))
    elif task == "reference":
        emit(reference(folder, Path(args.out), args.runs))
    elif task == "export":
        emit(export(folder, args.scheme, Path(args.out)))
    elif task == "run":
        emit(run(Path(args.out), Path(args.ref), args.runs))
    elif task == "program":
        emit(program(args.family, Path(args.out), args.runs))


# -- the parent ------------------------------------------------------------------------------------


class Skipped(Exception):
    pass


def spawn(timeout: float, *argv: str) -> dict:
    """Run one worker in a fresh process and return its result (raise :class:`Skipped` on a timeout
    or a failure, with the reason)."""
    cmd = [sys.executable, __file__, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Skipped(f"timeout after {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Skipped(f"exit {proc.returncode}: {tail[:200]}")
    return json.loads(lines[-1][len("RESULT "):])


def skipped(rules: list[str], *key: str) -> bool:
    """Whether a ``--skip`` rule (``family``, ``family:size``, ``family:size:scheme``, ``program``) matches."""
    return any(tuple(rule.split(":")) == key[: len(rule.split(":"))] for rule in rules)


def render(rows: list[dict], caption: str) -> str:
    """The markdown table."""
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    def ms(v):  # three significant digits, tiny towers encode in microseconds
        return "—" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"

    head = "| family | size | scheme | export s | peak RSS MiB | .pte MB | encode ms | rel. error | cosine |"
    lines = [caption, "", head, "|" + "---|" * 9]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['family']} | {r['size']} | {r['scheme']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['family']} | {r['size']} | {r['scheme']} | {num(r.get('export_s'), '.1f')} | "
            f"{num(r.get('peak_rss_mib'), '.0f')} | {num(r.get('pte_mb'), '.2f')} | {ms(r.get('encode_ms'))} | "
            f"{num(r.get('rel_error'), '.2e')} | {num(r.get('cosine'), '.6f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--runs", type=int, default=5, help="timed encodes per program (median)")
    parser.add_argument("--text-hidden", type=int, default=256, help="text hidden size of the real-size configs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one process may take before it is skipped")
    parser.add_argument("--skip", default="", help="comma-separated family[:size[:scheme]] or 'program'")
    parser.add_argument("--no-program", action="store_true", help="leave out the whole-program rows")
    parser.add_argument("--json", action="store_true", help="also print each row as a JSON line as it finishes")
    parser.add_argument("--worker", choices=["write", "reference", "export", "run", "program"], help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    families = [f for f in args.families.split(",") if f]
    sizes = [s for s in args.sizes.split(",") if s]
    schemes = [s for s in args.schemes.split(",") if s]
    for value, known in ((families, FAMILIES), (sizes, SIZES), (schemes, SCHEMES)):
        bad = [v for v in value if v not in known]
        if bad:
            parser.error(f"unknown {bad}; choose from {list(known)}")
    rules = [r for r in args.skip.split(",") if r]
    common = ["--runs", str(args.runs), "--text-hidden", str(args.text_hidden)]
    rows: list[dict] = []
    started = time.perf_counter()

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"[{time.perf_counter() - started:6.0f} s] {row['family']} {row['size']} {row['scheme']}: "
              + (f"skipped ({row['skipped']})" if row.get("skipped") else
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))),
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="vision-bench-") as tmp:
        tmp = Path(tmp)
        for family in families:
            for size in sizes:
                base = {"family": family, "size": size}
                if skipped(rules, family, size):
                    add({**base, "scheme": "all", "skipped": "--skip"})
                    continue
                folder, ref = tmp / f"{family}-{size}", tmp / f"{family}-{size}.ref.pt"
                try:
                    spawn(args.timeout, "--worker", "write", "--family", family, "--size", size,
                          "--folder", str(folder), *common)
                    eager = spawn(args.timeout, "--worker", "reference", "--folder", str(folder), "--out", str(ref),
                                  *common)
                except Skipped as e:
                    add({**base, "scheme": "all", "skipped": str(e)})
                    continue
                add({**base, "scheme": "eager fp32", "encode_ms": eager["encode_ms"],
                     "tokens": eager["shape"][1], "vision_params": eager["params"], "finite": eager["finite"],
                     "feature_std": eager["feature_std"], "ref_peak_rss_mib": eager["peak_rss_mib"]})
                for scheme in schemes:
                    row = {**base, "scheme": scheme if scheme != "8da4w" else f"8da4w g{GROUP_SIZE}"}
                    if skipped(rules, family, size, scheme):
                        add({**row, "skipped": "--skip"})
                        continue
                    pte = tmp / f"{family}-{size}-{scheme}.pte"
                    try:
                        exported = spawn(args.timeout, "--worker", "export", "--folder", str(folder),
                                         "--scheme", scheme, "--out", str(pte), *common)
                        ran = spawn(args.timeout, "--worker", "run", "--out", str(pte), "--ref", str(ref), *common)
                    except Skipped as e:
                        add({**row, "skipped": str(e)})
                        continue
                    finally:
                        pte.unlink(missing_ok=True)
                    add({**row, **exported, "encode_ms": ran["encode_ms"], "first_encode_ms": ran["first_ms"],
                         "run_peak_rss_mib": ran["peak_rss_mib"], "rel_error": ran["rel_error"],
                         "cosine": ran["cosine"], "finite": ran["finite"]})
                for path in (folder, ref):
                    subprocess.run(["rm", "-rf", str(path)], check=False)
        if not args.no_program and not skipped(rules, "program"):
            for family in families:
                row = {"family": family, "size": "tiny", "scheme": "program fp32"}
                try:
                    done = spawn(args.timeout, "--worker", "program", "--family", family,
                                 "--out", str(tmp / f"program-{family}"), *common)
                except Skipped as e:
                    add({**row, "skipped": str(e)})
                    continue
                add({**row, **done})
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    caption = (f"Vision encoders on XNNPACK, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
               f"commit {commit}; encode = median of {args.runs}; error vs eager fp32 on one random image; "
               f"total {time.perf_counter() - started:.0f} s.")
    print(render(rows, caption))


if __name__ == "__main__":
    main()
