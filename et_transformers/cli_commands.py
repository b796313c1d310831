"""What each ``et-transformers`` subcommand does: call the library, print its results.

:mod:`.cli` parses the command line and hands the parsed arguments to a ``cmd_*`` function here.
Each is a few calls into the Python API (:class:`~et_transformers.ETModelForCausalLM`,
:class:`~et_transformers.chat.ChatSession`, :mod:`.serving`, :mod:`.inspection`, :mod:`.profiling`, :mod:`.bench`,
:mod:`.cache`) with options mapped one-to-one onto ``ExportConfig`` fields and ``generate()``
keywords, whose validation is theirs; :mod:`.cli_output` formats what they return. Results go to
stdout, diagnostics and per-turn figures to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_RECIPE, ExportConfig
from .config import recipe as make_recipe
from .errors import ContextFullError, ETTransformersError, InvalidConfigError

# -- shared steps -------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _native_stderr_muted():
    """Inside: file descriptor 2 goes to /dev/null, so what C/C++ code writes there is dropped.

    Python's ``sys.stderr`` writes to the same descriptor: keep the block to native calls.
    """
    if sys.stderr is not None:
        sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load(args: argparse.Namespace, warmup: bool = True):
    """The model the load options name (exported into the cache the first time).

    Without ``--verbose`` the ExecuTorch runtime is started first with its C++ log lines muted
    (they are written to file descriptor 2, past Python's logging: see ``runtime.start_runtime``).
    """
    from .runtime import start_runtime

    if not getattr(args, "verbose", False):
        with _native_stderr_muted():
            start_runtime()

    return _model_class(args).from_pretrained(
        args.model,
        recipe=args.recipe,
        revision=args.revision,
        gguf_file=args.gguf_file,
        cache_dir=args.cache_dir,
        local_files_only=args.offline,
        force_export=args.force_export,
        trust_remote_code=args.trust_remote_code,
        warmup=warmup,
        tokenizer=getattr(args, "tokenizer", None),  # generate, chat and profile take --tokenizer
        **_export_overrides(args),
    )


def _model_class(args: argparse.Namespace):
    """``ETModelForImageTextToText`` when the model named is an image-text-to-text one (its
    ``config.json`` says so), else ``ETModelForCausalLM``."""
    from . import hub
    from .architectures import VISION_MODEL_TYPES
    from .modeling import ETModelForCausalLM

    try:
        source = hub.resolve(args.model, revision=args.revision, gguf_file=args.gguf_file, cache_dir=args.cache_dir,
                             local_files_only=args.offline)
        model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
    except (ETTransformersError, OSError, ValueError):
        model_type = None  # from_pretrained reports what is wrong with the model
    if model_type in VISION_MODEL_TYPES:
        from .modeling_vlm import ETModelForImageTextToText

        return ETModelForImageTextToText
    return ETModelForCausalLM


def _image_inputs(model, prompt: str, images: list, chat: bool) -> dict:
    """The processor's inputs (``input_ids``, ``pixel_values``...) for ``prompt`` showing ``images``."""
    from .chat import _open_image

    if not hasattr(model, "prepare_inputs"):
        raise ETTransformersError(
            f"--image was given, but {model.pte_path.parent.name} is a text-only model: it takes no images."
        )
    return model.prepare_inputs(prompt, [_open_image(path) for path in images], chat=chat)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample:
        kwargs["do_sample"] = True
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "prompt_lookup", None) is not None:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    if getattr(args, "draft", None):
        from .modeling import ETModelForCausalLM

        kwargs["assistant_model"] = ETModelForCausalLM.from_pretrained(
            args.draft, trust_remote_code=getattr(args, "trust_remote_code", False)
        )
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return kwargs


def _response_format(args: argparse.Namespace) -> dict | None:
    """``--json-schema FILE`` / ``--regex`` / ``--grammar FILE`` as a ``response_format`` (checked by
    generate(), before the program runs).

    Raises:
        ETTransformersError: ``--grammar-syntax`` without ``--grammar``; a schema file that is not JSON.
    """
    if args.grammar_syntax != "lark" and args.grammar is None:
        raise ETTransformersError("--grammar-syntax applies to --grammar FILE only.")
    if args.json_schema is not None:
        try:
            return {"type": "json_schema", "json_schema": {"name": args.json_schema.stem,
                                                           "schema": json.loads(args.json_schema.read_text())}}
        except ValueError as e:
            raise ETTransformersError(f"--json-schema {args.json_schema}: not a JSON file ({e}).") from e
    if args.regex is not None:
        return {"type": "regex", "pattern": args.regex}
    if args.grammar is not None:
        return {"type": "grammar", "grammar": args.grammar.read_text(), "syntax": args.grammar_syntax}
    return None


def _streamer(tokenizer):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _require_tokenizer(model, args):
    return model.require_tokenizer("a text prompt")  # TokenizerError naming the model and the fix


def _err(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- subcommands ------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model: to ``-o DIR``, or into the cache; print path, size and delegation summary."""
    from .inspection import inspect_program

    t0 = time.perf_counter()
    if args.output is not None:
        from .export import Exporter

        exporter = Exporter.from_pretrained(
            args.model,
            make_recipe(args.recipe or DEFAULT_RECIPE, **_export_overrides(args)),
            revision=args.revision,
            gguf_file=args.gguf_file,
            cache_dir=args.cache_dir,
            local_files_only=args.offline,
            trust_remote_code=args.trust_remote_code,
            progress=None,  # a bar on a terminal, nothing when piped
        )
        pte = exporter.run(args.output, etrecord=args.etrecord)
        how = f"exported in {time.perf_counter() - t0:.0f} s"
    else:
        if args.etrecord:
            raise ETTransformersError("--etrecord needs an output folder (-o DIR) to write etrecord.bin to.")
        model = _load(args, warmup=False)
        pte = model.pte_path
        exported = model.stats.export_time
        how = f"exported in {exported:.0f} s" if exported is not None else "already in the cache"
    report = inspect_program(pte)
    print(f"{pte}  {report.size_bytes / 2**20:.1f} MiB  ({how})")
    if report.etrecord:
        print(f"etrecord: {report.etrecord}")
    print(report.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text for a prompt, streaming tokens as they are produced."""
    model = _load(args)
    tok = _require_tokenizer(model, args)
    from .profiling import encode_prompt

    if args.image:
        inputs = _image_inputs(model, args.prompt, args.image, args.chat)
    else:
        inputs = {"input_ids": encode_prompt(tok, args.prompt, args.chat)}
    kwargs = _generation_kwargs(args)
    response_format = _response_format(args)
    if response_format is not None:
        kwargs["response_format"] = response_format
    model.generate(**inputs, streamer=_streamer(tok), **kwargs)
    if args.stats:
        _err(model.stats.summary())
    return 0


def _chat_stats(session) -> str:
    s, extra = session.stats, session.stats.extra
    if not extra:
        return f"no turn yet; context {session.context_size} tokens"
    return (
        f"{s.summary()}; prefilled {extra['prefilled_tokens']} tok, reused {extra['cached_tokens']} cached; "
        f"context {extra['context_used']}/{extra['context_size']}"
    )


CHAT_HELP = ("/image PATH shows an image with your next message, /reset starts over, /stats shows the last "
             "turn's figures, Ctrl-D (or /exit) leaves.")


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat; the KV cache is kept across turns."""
    from .chat import ChatSession

    model = _load(args)
    session = ChatSession(model, system_prompt=args.system, **_generation_kwargs(args))
    if sys.stdin is None:  # started with stdin closed (`<&-`): no message will ever come
        return 0
    interactive = sys.stdin.isatty()
    pending: list[str] = []  # /image paths for the next message
    if interactive:
        _err(f"Chatting with {args.model} (context {session.context_size} tokens). {CHAT_HELP}")
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = None
        if line is None or (not interactive and line == ""):  # Ctrl-D / end of input
            if interactive:
                _err()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            session.reset()
            _err("(conversation reset)")
            continue
        if text == "/stats":
            _err(_chat_stats(session))
            continue
        if text.split()[0] == "/image":
            path = text[len("/image"):].strip()
            if not hasattr(model, "image_features"):
                _err(f"{args.model} is a text-only model: it takes no images.")
            elif not path or not Path(path).is_file():
                _err(f"no image file at {path!r}: /image PATH")
            else:
                pending.append(path)
                _err(f"(image {Path(path).name} goes with your next message)")
            continue
        if text.startswith("/"):
            _err(f"unknown command {text.split()[0]}: {CHAT_HELP}")
            continue
        try:
            session.send(text, images=pending, streamer=_streamer(session.tokenizer))
        except (ContextFullError, ValueError) as e:
            _err(f"context full: {e}" if isinstance(e, ContextFullError) else str(e))
            continue
        finally:
            pending = []
        if args.stats:
            _err(_chat_stats(session))
        if session.stats.extra.get("context_full"):
            _err("(the context is now full: the reply was cut; /reset to start a new conversation)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over an OpenAI-compatible HTTP API until interrupted."""
    try:
        from .serving import create_app, load_slots, run
    except ImportError as e:
        raise ETTransformersError(
            f"'serve' needs the server's packages ({e.name} is missing): pip install 'et-transformers[serve]'."
        ) from e
    if args.draft and args.slots > 1:
        raise InvalidConfigError(
            f"--draft with --slots {args.slots}: the slots would share one draft model and its KV cache. "
            f"Use --slots 1 with --draft, or --prompt-lookup (no draft model) with several slots."
        )
    model = _load(args)
    models = load_slots(model, args.slots)
    app = create_app(models, model_id=args.model, api_key=args.api_key, max_queue=args.max_queue,
                     defaults=_generation_kwargs(args))
    meta = model.program.metadata
    _err(f"Serving {args.model} on http://{args.host}:{args.port}/v1 ({args.slots} slot(s), context "
         f"{meta.max_context_len} tokens, queue {args.max_queue}{', API key required' if args.api_key else ''}). "
         f"Ctrl-C stops.")
    run(app, host=args.host, port=args.port, log_level="info" if getattr(args, "verbose", False) else "warning")
    return 0


def _export_options_given(args: argparse.Namespace) -> list[str]:
    """The export options (``--recipe``, ``--qlinear``, ..., ``--force-export``) on the command line."""
    names = [*(["recipe"] if args.recipe else []), *_export_overrides(args), *(["force_export"] * args.force_export)]
    return ["--" + name.replace("_", "-") for name in names]


def _pte_or_model(args: argparse.Namespace) -> Path:
    """The ``.pte`` that ``inspect``'s argument names: a file, a folder with one, or a model to load.

    Raises:
        InvalidConfigError: export options given with a program that is already exported.
    """
    from .inspection import resolve_pte

    path = Path(args.model).expanduser()
    if path.is_file() or path.suffix == ".pte" or (path.is_dir() and (path / "model.pte").is_file()):
        given = _export_options_given(args)
        if given:
            raise InvalidConfigError(
                f"{' '.join(given)} cannot apply to {args.model}: it is an already exported program, there is "
                f"nothing to export. Inspect it without them, or pass the original checkpoint to export it."
            )
        return resolve_pte(path)
    return _load(args, warmup=False).pte_path


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a program's methods, metadata, size and delegation table."""
    from .cli_output import program_report
    from .inspection import inspect_program

    report = inspect_program(_pte_or_model(args))
    print(json.dumps(report.as_dict(), indent=2, default=str) if args.json else program_report(report))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile one generation with ETDump: per-operator table and per-phase breakdown."""
    from .cli_output import profile_report
    from .profiling import profile_generation

    model = _load(args, warmup=False)
    _require_tokenizer(model, args)
    report = profile_generation(
        model, args.prompt, chat=args.chat, etdump_path=args.etdump, etrecord_path=args.etrecord,
        **_generation_kwargs(args),
    )
    print(f"generated: {report.text!r}")
    print(profile_report(report, top=args.top))
    if args.etdump:
        print(f"ETDump written to {report.etdump_path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Prefill/decode tok/s, TTFT and peak RSS: ours vs eager transformers vs the C++ runner vs llama.cpp."""
    from tqdm.auto import tqdm

    from .bench import CONTENDERS, compare, spec_for
    from .cli_output import bench_table

    model = _load(args, warmup=False)
    contenders = tuple(args.contenders.split(",")) if args.contenders else CONTENDERS
    spec = spec_for(
        model, args.model, revision=args.revision, gguf_file=args.gguf_file, cache_dir=args.cache_dir,
        local_files_only=args.offline, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        runs=args.runs, gguf=args.gguf, llama_bench=args.llama_bench, threads=args.threads, contenders=contenders,
    )
    with tqdm(total=len(contenders), desc="bench", unit="contender", disable=None, leave=False) as bar:
        started: list[str] = []

        def step(name: str) -> None:
            bar.update(1 if started else 0)
            started.append(name)
            bar.set_postfix_str(name)

        results = compare(spec, progress=step)
    if args.json:
        print(json.dumps({"spec": dataclasses.asdict(spec), "results": [r.as_dict() for r in results]}, indent=2))
        return 0
    print(f"{args.model} ({model.pte_path}): prompt {spec.prompt_tokens} tokens, {spec.new_tokens} new tokens, "
          f"greedy, median of {spec.runs} warm runs, each contender in its own process")
    print(bench_table(results))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List, remove or prune exported models in the cache."""
    from .cache import ArtifactCache
    from .cli_output import cache_table, mib

    cache = ArtifactCache(Path(args.cache_dir) / "et_transformers" if args.cache_dir else None)
    if args.cache_command == "ls":
        entries = cache.entries()
        if args.json:
            print(json.dumps([{"key": e.key, "path": str(e.path), "source": e.manifest.source,
                               "export_config": e.manifest.export_config, "size": e.size,
                               "last_used": e.last_used} for e in entries], indent=2))
        elif entries:
            print(cache_table(entries))
            print(f"{len(entries)} entries, {mib(sum(e.size for e in entries))} in {cache.models_dir}")
        else:
            print(f"the cache at {cache.models_dir} is empty")
        return 0
    if args.cache_command == "rm":
        if not args.keys and not args.all:
            raise ETTransformersError("give the keys (or key prefixes) to remove, or --all.")
        keys = [e.key for e in cache.entries()] if args.all else args.keys
        removed = []
        for key in keys:
            gone = cache.remove(key)
            if not gone:
                raise ETTransformersError(f"no cache entry has a key starting with {key!r} (see 'cache ls').")
            removed += gone
    else:
        if args.max_size is None and args.older_than is None:
            raise ETTransformersError("prune needs --max-size SIZE and/or --older-than AGE.")
        removed = cache.prune(max_size_bytes=args.max_size, older_than_seconds=args.older_than)
    print(f"removed {len(removed)} entries" + "".join(f"\n  {k[:12]}" for k in removed))
    return 0
