"""The ``et-transformers`` command line: the parser and the entry point.

Subcommands: ``export``, ``generate``, ``chat``, ``serve``, ``inspect``, ``profile``, ``bench`` and
``cache``.
This module only parses: each subcommand's options map one-to-one onto ``ExportConfig`` fields and
``generate()`` keywords (validated by them, never here), and :mod:`.cli_commands` runs the command
through the Python API; :mod:`.cli_output` formats the results. Long work shows tqdm bars on a
terminal only; logs appear with ``--verbose``. Errors print as one line on stderr with a non-zero
exit; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cli_commands as commands
from .config import (
    AUTO,
    BACKENDS,
    DEFAULT_RECIPE,
    DTYPES,
    KV_CACHE_DTYPES,
    LOGITS_MODES,
    QEMBEDDING_SCHEMES,
    QLINEAR_SCHEMES,
    RECIPES,
)
from .errors import ETTransformersError
from .threads import prefer_single_threaded_blas

logger = logging.getLogger(__name__)

PROG = "et-transformers"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``et-transformers: error: ...``) instead of usage dumps, and
    no abbreviated options: a typo such as ``--max-new-token`` is an error, not a silent match."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# -- options ----------------------------------------------------------------------------------


def _group_size(text: str) -> int | str:
    """A group size: an integer, ``"auto"`` (the scheme's default), or ``"none"`` (one group per
    channel; ``None`` once parsed)."""
    if text.lower() == AUTO:
        return AUTO
    return "none" if text.lower() in ("none", "channel", "per-channel") else int(text)


def _backends(text: str) -> str | tuple[str, ...]:
    """``--backend``: one name, or a comma-separated ordered list (a tuple; ``ExportConfig`` checks the names)."""
    names = tuple(n.strip() for n in text.split(","))
    return names[0] if len(names) == 1 else names


def _add_export_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export options (a recipe, then ExportConfig fields on top of it)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help=f"named export recipe (default {DEFAULT_RECIPE})")
    g.add_argument("--max-seq-len", type=int, help="KV cache length: the whole context the program holds")
    g.add_argument("--dtype", choices=sorted(set(DTYPES.values())), help="weights/activations dtype")
    g.add_argument("--backend", type=_backends, metavar="NAME[,NAME...]",
                   help=f"one of {', '.join(BACKENDS)}, or an ordered comma-separated list of them (the first "
                        f"gets first pick of the operators), e.g. openvino,xnnpack (default xnnpack)")
    g.add_argument("--qlinear", choices=[*QLINEAR_SCHEMES, "none"], help="linear-layer quantization")
    g.add_argument("--qlinear-group-size", type=_group_size,
                   help="group of 4-bit weights: a multiple of 32 on XNNPACK, or 'none' (default: the scheme's)")
    g.add_argument("--qhead", choices=["same", *QLINEAR_SCHEMES, "none"], help="output-head quantization")
    g.add_argument("--qlinear-8bit", action="append", metavar="PATTERN",
                   help="module-name pattern of linear layers kept at 8 bits (repeatable), e.g. '*.down_proj'")
    g.add_argument("--qembedding", choices=[*QEMBEDDING_SCHEMES, "none"], help="embedding quantization")
    g.add_argument("--qembedding-group-size", type=_group_size, help="power of two, or 'none' for per-row")
    g.add_argument("--kv-cache-dtype", choices=[k for k in KV_CACHE_DTYPES if k], help="int8 KV cache")
    g.add_argument("--logits", choices=LOGITS_MODES, help="'all' builds an evaluation program")
    g.add_argument("--verify-tokens", type=int, metavar="K",
                   help="forward returns the last K positions' logits (assisted generation verifies K-1 drafts); "
                        "default 8 where the head runs on our kernel (q4_0, 8da4w_own), else 1")


def _add_load_options(
    p: argparse.ArgumentParser, what: str = "Hub id, model folder, .gguf file, or exported model folder"
) -> None:
    p.add_argument("model", help=what)
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--gguf-file", help="GGUF file inside the folder or repository")
    p.add_argument("--cache-dir", help="root of downloads and exported artifacts")
    p.add_argument("--offline", action="store_true", help="use local files and the cache only")
    p.add_argument("--force-export", action="store_true", help="export again even if cached")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    _add_export_options(p)


def _add_tokenizer_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="folder holding the tokenizer, for a model saved without one")


def _add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("generation options (GenerationConfig fields)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"new tokens to generate at most (default {max_new_tokens})")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, help="softmax temperature when sampling")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample within the top-p probability mass")
    g.add_argument("--min-p", type=float, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="penalise tokens already in the text")
    g.add_argument("--seed", type=int, help="torch.manual_seed before sampling")
    g.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="assisted generation: draft up to N tokens by n-gram lookup in the text so far")
    g.add_argument("--draft", metavar="MODEL",
                   help="assisted generation: a smaller model (same tokenizer) drafting for this one")


_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_AGE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def _size(text: str) -> int:
    """``500M``, ``2G``, ``1.5GiB`` -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 2G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _age(text: str) -> float:
    """``30d``, ``12h``, ``90min`` -> seconds."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(s|m|min|h|d|w)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 30d, 12h or 90min")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``et-transformers``."""
    verbose = _Parser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                         help="show logs, and tracebacks on errors")
    parser = _Parser(
        prog=PROG,
        description="Run Hugging Face causal LMs on ExecuTorch: export, generate, chat, serve, inspect, profile, bench.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show logs, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[verbose], **kwargs)
        p.set_defaults(func=func)
        return p

    p = command("export", commands.cmd_export, "export a model to a .pte folder (or into the cache)")
    _add_load_options(p, "Hub id, model folder or .gguf file")
    p.add_argument("-o", "--output", type=Path, help="output folder (default: the cache from_pretrained uses)")
    p.add_argument("--etrecord", action="store_true", help="also write etrecord.bin (names operators in 'profile')")

    p = command("generate", commands.cmd_generate, "generate text for a prompt, streaming it")
    _add_load_options(p)
    _add_tokenizer_option(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--image", action="append", type=Path, metavar="PATH",
                   help="an image shown with the prompt (image-text-to-text models; repeat for several)")
    p.add_argument("--stats", action="store_true", help="print TTFT, prefill/decode tok/s and peak RSS")
    g = p.add_argument_group("structured output (one of; needs the 'structured' extra)")
    form = g.add_mutually_exclusive_group()
    form.add_argument("--json-schema", type=Path, metavar="FILE", help="the output is JSON valid under this JSON schema")
    form.add_argument("--regex", help="the output matches this regular expression")
    form.add_argument("--grammar", type=Path, metavar="FILE", help="the output follows this context-free grammar")
    g.add_argument("--grammar-syntax", choices=["lark", "gbnf"], default="lark",
                   help="syntax of --grammar: Lark (default) or llama.cpp's GBNF")
    _add_sampling_options(p)

    p = command("chat", commands.cmd_chat, "interactive multi-turn chat (the KV cache is kept across turns)")
    _add_load_options(p)
    _add_tokenizer_option(p)
    p.add_argument("--system", help="system prompt opening the conversation")
    p.add_argument("--stats", action="store_true", help="print each turn's figures (TTFT, tokens prefilled)")
    _add_sampling_options(p, max_new_tokens=256)

    p = command("serve", commands.cmd_serve,
                "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) with prompt caching")
    _add_load_options(p)
    _add_tokenizer_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    p.add_argument("--slots", type=int, default=1,
                   help="programs loaded side by side, each with its own KV cache: requests served in parallel "
                        "(default %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a free slot; more get 429 (default %(default)s)")
    _add_sampling_options(p, max_new_tokens=256)

    p = command("inspect", commands.cmd_inspect, "methods, metadata, size and delegation table of a program")
    _add_load_options(p, "a .pte file, a folder holding model.pte, or a model (exported/cached first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("profile", commands.cmd_profile, "profile one generation with ETDump + the Inspector")
    _add_load_options(p)
    _add_tokenizer_option(p)
    p.add_argument("prompt", nargs="?", default="Once upon a time", help="the prompt (default: %(default)r)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--etdump", type=Path, help="keep the raw ETDump in this file")
    p.add_argument("--etrecord", type=Path, help="ETRecord to link (default: etrecord.bin beside the .pte)")
    p.add_argument("--top", type=int, default=25, help="operator rows to show (default %(default)s)")
    _add_sampling_options(p, max_new_tokens=32)

    p = command("bench", commands.cmd_bench,
                "speed and memory: ours vs eager transformers vs ExecuTorch's C++ runner vs llama.cpp")
    _add_load_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per contender, after a warm-up")
    p.add_argument("--gguf", help="GGUF of the same model for the llama.cpp column (default: MODEL if a .gguf)")
    p.add_argument("--llama-bench", help="llama-bench binary (default: on PATH)")
    p.add_argument("--threads", type=int, help="threads for eager PyTorch and llama.cpp (default: all cores)")
    p.add_argument("--contenders",
                   help="comma-separated subset of: et_transformers,transformers,executorch-runner,llama.cpp")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = command("cache", commands.cmd_cache, "list, remove or prune exported models in the cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = cache_sub.add_parser("ls", help="list entries: model, config, size, last use", parents=[verbose])
    c.add_argument("--json", action="store_true", help="print the entries as JSON")
    c = cache_sub.add_parser("rm", help="remove entries by key prefix", parents=[verbose])
    c.add_argument("keys", nargs="*", help="keys or key prefixes (at least 4 characters)")
    c.add_argument("--all", action="store_true", help="remove every entry")
    c = cache_sub.add_parser("prune", help="remove old or least recently used entries", parents=[verbose])
    c.add_argument("--max-size", type=_size, help="keep the cache under this size (e.g. 2G), dropping LRU entries")
    c.add_argument("--older-than", type=_age, help="remove entries unused for this long (e.g. 30d)")
    for c in cache_sub.choices.values():
        c.add_argument("--cache-dir", help="root of downloads and exported artifacts")
    return parser


def _configure_output(verbose: bool) -> None:
    """``--verbose``: every INFO log. Otherwise our warnings only, and no third-party chatter."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    if verbose:
        return
    logging.getLogger("et_transformers").setLevel(logging.WARNING)
    # Third-party progress bars are noise in a pipe (ours use tqdm, which checks for a terminal).
    if sys.stderr is None or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torch sets its own loggers' levels when it is imported (after this), from TORCH_LOGS: "-torch"
    # makes that level ERROR, so its deprecation chatter ("W1203 ... _pytree.py ...") stays out.
    os.environ.setdefault("TORCH_LOGS", "-torch")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("torch", "torchao", "executorch", "transformers"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        logging.getLogger(module).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``et-transformers``; returns the exit code."""
    prefer_single_threaded_blas()  # before torch loads: see et_transformers.threads
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    _configure_output(verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # `... | head`: the reader left
    except Exception as e:  # the command line's boundary: one line, unless asked for the traceback
        if verbose:
            raise
        known = isinstance(e, (ETTransformersError, ValueError, OSError))
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if known else f" ({type(e).__name__}; --verbose shows the traceback)"
        print(f"{PROG}: error: {message}{hint}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
