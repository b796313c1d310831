"""The ``et-transformers`` command line: builds the same dataclasses as the Python API and calls it.

Each subcommand is a small function over :class:`~et_transformers.modeling.ETModelForCausalLM`
and friends; options map one-to-one onto ``ExportConfig`` fields and ``generate()`` keywords, and
all validation is theirs (nothing is checked twice here). Errors print as one line on stderr with
a non-zero exit; ``--verbose`` shows logs and tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import (
    BACKENDS,
    DEFAULT_RECIPE,
    DTYPES,
    KV_CACHE_DTYPES,
    LOGITS_MODES,
    QEMBEDDING_SCHEMES,
    QLINEAR_SCHEMES,
    RECIPES,
    ExportConfig,
)
from .config import recipe as make_recipe
from .errors import ETTransformersError
from .threads import prefer_single_threaded_blas

logger = logging.getLogger(__name__)


def _group_size(text: str) -> int | str:
    """A group size: an integer, or ``"none"`` (one group per channel; ``None`` once parsed)."""
    return "none" if text.lower() in ("none", "channel", "per-channel") else int(text)


def _add_export_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export options (a recipe, then ExportConfig fields on top of it)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help=f"named export recipe (default {DEFAULT_RECIPE})")
    g.add_argument("--max-seq-len", type=int, help="KV cache length: the whole context the program holds")
    g.add_argument("--dtype", choices=sorted(set(DTYPES.values())), help="weights/activations dtype")
    g.add_argument("--backend", choices=BACKENDS, help="xnnpack (default) or portable (no delegate)")
    g.add_argument("--qlinear", choices=[*QLINEAR_SCHEMES, "none"], help="linear-layer quantization")
    g.add_argument("--qlinear-group-size", type=_group_size, help="power of two, or 'none' for per-channel")
    g.add_argument("--qhead", choices=["same", *QLINEAR_SCHEMES, "none"], help="output-head quantization")
    g.add_argument("--qlinear-8bit", action="append", metavar="PATTERN",
                   help="module-name pattern of linear layers kept at 8 bits (repeatable), e.g. '*.down_proj'")
    g.add_argument("--qembedding", choices=[*QEMBEDDING_SCHEMES, "none"], help="embedding quantization")
    g.add_argument("--qembedding-group-size", type=_group_size, help="power of two, or 'none' for per-row")
    g.add_argument("--kv-cache-dtype", choices=[k for k in KV_CACHE_DTYPES if k], help="int8 KV cache")
    g.add_argument("--logits", choices=LOGITS_MODES, help="'all' builds an evaluation program")


def _export_overrides(args: argparse.Namespace) -> dict:
    """The ``ExportConfig`` fields given on the command line (``none`` means ``None``)."""
    overrides = {}
    for f in dataclasses.fields(ExportConfig):
        value = getattr(args, f.name, None)
        if isinstance(value, list):
            value = tuple(value)
        if value is not None:
            overrides[f.name] = None if value == "none" else value
    return overrides


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hub id, model folder, .gguf file, or exported model folder")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--gguf-file", help="GGUF file inside the folder or repository")
    p.add_argument("--cache-dir", help="root of downloads and exported artifacts")
    p.add_argument("--offline", action="store_true", help="use local files and the cache only")
    p.add_argument("--force-export", action="store_true", help="export again even if cached")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    _add_export_options(p)


def _load(args: argparse.Namespace):
    from .modeling import ETModelForCausalLM

    return ETModelForCausalLM.from_pretrained(
        args.model,
        recipe=args.recipe,
        revision=args.revision,
        gguf_file=args.gguf_file,
        cache_dir=args.cache_dir,
        local_files_only=args.offline,
        force_export=args.force_export,
        trust_remote_code=args.trust_remote_code,
        **_export_overrides(args),
    )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation options (GenerationConfig fields)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="new tokens to generate at most")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="torch.manual_seed before sampling")


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample:
        kwargs["do_sample"] = True
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


# -- subcommands ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to a folder (model.pte + manifest + tokenizer files)."""
    from .export import Exporter

    exporter = Exporter.from_pretrained(
        args.model,
        make_recipe(args.recipe or DEFAULT_RECIPE, **_export_overrides(args)),
        revision=args.revision,
        gguf_file=args.gguf_file,
        cache_dir=args.cache_dir,
        local_files_only=args.offline,
        trust_remote_code=args.trust_remote_code,
        progress=None,
    )
    pte = exporter.run(args.output)
    info = exporter.delegation_summary()
    size_mb = pte.stat().st_size / 2**20
    print(f"{pte}  {size_mb:.1f} MiB  {sum(exporter.timings.values()):.0f} s")
    print(
        f"delegation: {info.num_delegated_subgraphs} delegated subgraphs, {info.num_delegated_nodes} "
        f"delegated nodes, {info.num_non_delegated_nodes} non-delegated nodes"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text for a prompt, streaming tokens as they are produced."""
    import torch
    from transformers import TextStreamer

    model = _load(args)
    tok = model.tokenizer
    if tok is None:
        raise ETTransformersError(f"{args.model} has no tokenizer; cannot encode a text prompt.")
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, streamer=streamer, **_generation_kwargs(args))
    if args.stats:
        print(model.stats.summary(), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``et-transformers``."""
    parser = argparse.ArgumentParser(
        prog="et-transformers",
        description="Run Hugging Face causal LMs on ExecuTorch: export, generate, inspect.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a model to a .pte folder")
    _add_load_options(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text for a prompt (streams)")
    _add_load_options(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--stats", action="store_true", help="print TTFT and prefill/decode tok/s")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``et-transformers``; returns the exit code."""
    prefer_single_threaded_blas()  # before torch loads: see et_transformers.threads
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ETTransformersError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"et-transformers: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("et-transformers: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
