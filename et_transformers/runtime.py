"""The only user of the ExecuTorch runtime: load a ``.pte``, read its metadata, run its methods.

:class:`Program` wraps ExecuTorch's Python bindings. It registers the runtime kernels our programs
use (``llama.custom_sdpa``/``update_cache`` and the quantized ops) by loading their shared
libraries directly, which takes milliseconds and, unlike importing ExecuTorch's Python packages,
pulls in neither ``executorch.exir`` nor transformers: a cached model loads without the export
stack. Inputs are checked here before they reach C++, so a bad call raises a ``ValueError`` that
names the limit, never an ExecuTorch error code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .delegates import prepare_delegates, read_flatbuffer
from .errors import ProgramError
from .threads import warn_if_contended

logger = logging.getLogger(__name__)

_KERNEL_LIBRARIES = (
    ("executorch.extension.llm.custom_ops", "libcustom_ops_aot_lib"),
    ("executorch.kernels.quantized", "libquantized_ops_aot_lib"),
)
_kernels_loaded = False


def load_kernel_libraries() -> None:
    """Register the custom-SDPA/KV-cache and quantized kernels with the runtime (idempotent)."""
    global _kernels_loaded
    if _kernels_loaded:
        return
    for package, stem in _KERNEL_LIBRARIES:
        spec = importlib.util.find_spec(package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        libs = [p for folder in folders for p in Path(folder).glob(f"{stem}.*") if p.suffix in (".so", ".dylib", ".dll")]
        if not libs:
            raise ProgramError(f"ExecuTorch kernel library {stem} not found in {package}; reinstall executorch.")
        torch.ops.load_library(str(libs[0]))
    _kernels_loaded = True


#: Operator-name prefix of our own kernels (:mod:`et_transformers.kernels`).
_OWN_OPERATOR_PREFIX = b"et_transformers::"


def needs_own_kernels(path: str | os.PathLike) -> bool:
    """Whether the ``.pte`` at ``path`` calls operators of our own kernel library.

    Reads only the program's flatbuffer (its operator table), not the weight segments after it.
    """
    return _OWN_OPERATOR_PREFIX in read_flatbuffer(path)


def load_own_kernels(path: str | os.PathLike) -> None:
    """Load our kernel library if the program at ``path`` needs it (built on first use).

    Raises:
        ProgramError: it needs them and they cannot be built or loaded here (the message says why
            and what to install).
    """
    if not needs_own_kernels(path):
        return
    from . import kernels

    _bindings()  # the runtime that owns the kernel registry, loaded first
    try:
        kernels.load()
    except kernels.KernelBuildError as e:
        raise ProgramError(
            f"{path} uses et_transformers' own kernels ({', '.join(kernels.OPERATORS)}: the 'q4_0' and '8da4w_own' schemes), "
            f"which could not be loaded here: {e}"
        ) from e


def start_runtime() -> int:
    """Load the kernel libraries and create ExecuTorch's thread pool now, not on the first run.

    Creating the pool makes the runtime probe the CPU, which logs a few lines from C++ straight to
    file descriptor 2 (``[cpuinfo_utils.cpp:...]``, no log-level switch in the Python bindings);
    the CLI calls this with that descriptor muted, so its output carries none of them.

    Returns:
        The thread pool's size.
    """
    load_kernel_libraries()
    return int(_bindings()._threadpool_get_thread_count())


def _bindings():
    from executorch.extension.pybindings import _C

    return _C


@dataclass(frozen=True)
class ProgramMetadata:
    """The constant methods an LLM program carries (the ones ExecuTorch's runner reads).

    Attributes:
        max_seq_len: most tokens one ``forward`` call may take.
        max_context_len: positions in the KV cache (prompt + generated tokens).
        vocab_size: size of the logits.
        bos_id: beginning-of-sequence token id (-1 when the model has none).
        eos_ids: end-of-sequence token ids.
        n_layers: decoder layers.
        use_kv_cache: whether ``forward`` takes cache positions.
        enable_dynamic_shape: whether ``forward`` accepts any prompt length up to ``max_seq_len``.
        verify_tokens: how many trailing positions' logits ``forward`` returns (``get_verify_tokens``;
            1 for programs that return the last position only): one call verifies
            ``verify_tokens - 1`` drafted tokens.
        all_logits: whether ``forward`` returns every position's logits (an evaluation program)
            rather than the last position's.
        cache_rebuild_len: when a sequence first grows past this many tokens, the KV cache must
            be rebuilt by running the whole sequence again from position 0 (Phi-3's longrope
            switches to its long factors for every position, as transformers does); None: never.
    """

    max_seq_len: int
    max_context_len: int
    vocab_size: int
    bos_id: int
    eos_ids: tuple[int, ...]
    n_layers: int
    use_kv_cache: bool
    enable_dynamic_shape: bool
    all_logits: bool = False
    verify_tokens: int = 1
    cache_rebuild_len: int | None = None


class ProgramLock:
    """Serializes the users of one program: its KV cache holds one sequence at a time.

    Whoever runs a sequence through the program (a ``generate()`` call, a stream for its whole
    iteration, a chat turn, ``forward``) holds it. Like ``threading.RLock`` it is reentrant for the
    thread that holds it (a chat turn runs the generation loop inside its own hold); unlike it, a
    hold may be released from another thread, because a stream's iteration may move between
    threads (a web server's thread pool calls ``next`` from any worker) or end when it is garbage
    collected elsewhere.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._paused_by: int | None = None  # the thread that last ran the paused stream holding us
        self._holds = 0

    def acquire(self) -> None:
        """Wait until no other thread holds the program, then hold it (again, if this thread does).

        Raises:
            RuntimeError: this thread paused a stream that holds the program (running the model
                now would overwrite the KV cache the stream resumes from; waiting would never end).
        """
        me = threading.get_ident()
        if self._owner == me:
            self._holds += 1
            return
        if self._paused_by == me:
            raise RuntimeError(
                "this model is held by a paused stream_generate() / ChatSession.stream() iteration of "
                "this thread: finish or close() that stream before running the model again, or load a "
                "second model object for parallel work."
            )
        self._lock.acquire()
        self._owner, self._holds = me, 1

    def pause(self) -> None:
        """A stream holding the program yields: until :meth:`resume`, its hold belongs to no thread,
        so whichever thread resumes it runs alone and every other caller waits."""
        self._paused_by, self._owner = self._owner, None

    def resume(self) -> None:
        """The paused stream runs again, on the calling thread."""
        self._owner, self._paused_by = threading.get_ident(), None

    def release(self) -> None:
        """Give back one hold; the program is free when every hold is given back.

        Raises:
            RuntimeError: nobody holds it.
        """
        if self._holds == 0:
            raise RuntimeError("release() of a ProgramLock that nobody holds.")
        self._holds -= 1
        if self._holds == 0:
            self._owner = self._paused_by = None
            self._lock.release()

    def __enter__(self) -> "ProgramLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Program:
    """A loaded ExecuTorch LLM program.

    Its decoder is the method :attr:`DECODER` (``forward``, the text programs' single entry point;
    :class:`MultimodalProgram` runs ``text_decoder`` on the embeddings of ``token_embedding``).

    Args:
        path: the ``.pte`` file.
        enable_etdump: record an ETDump (profiling events) of every execution; see
            :meth:`write_etdump`.

    Raises:
        ProgramError: the file is missing, is not an ExecuTorch program, lacks the LLM methods, or
            has delegates of a backend this runtime lacks (the message says what to install).
    """

    #: The method that takes ``(tokens, cache positions)`` and returns logits.
    DECODER = "forward"
    #: Methods the program must have.
    REQUIRED_METHODS: tuple[str, ...] = ("forward",)
    #: Whether ``forward(..., image_features=)`` may replace embeddings by image features.
    TAKES_IMAGES = False

    def __init__(self, path: str | os.PathLike, *, enable_etdump: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ProgramError(f"{self.path} does not exist.")
        with open(self.path, "rb") as f:
            header = f.read(8)
        if header[4:6] != b"ET":
            raise ProgramError(f"{self.path} is not an ExecuTorch program (no 'ET' file identifier).")
        load_kernel_libraries()
        load_own_kernels(self.path)
        #: Delegate ids the program uses (``XnnpackBackend``...), checked against this runtime first:
        #: a missing backend fails here with what to install, not as ExecuTorch's 0x20 on first run.
        self.delegate_ids = prepare_delegates(self.path)
        _C = _bindings()
        try:
            self._module = _C._load_for_executorch(str(self.path), enable_etdump=enable_etdump)
            self.method_names = tuple(sorted(self._module.method_names()))
        except RuntimeError as e:
            raise ProgramError(f"{self.path} is not a loadable ExecuTorch program ({e}).") from e
        missing = [m for m in self.REQUIRED_METHODS if m not in self.method_names]
        if missing and "text_decoder" in self.method_names and "forward" in missing:
            raise ProgramError(
                f"{self.path} is an image-text-to-text program (methods {list(self.method_names)}): load it "
                f"with ETModelForImageTextToText."
            )
        if missing:
            raise ProgramError(f"{self.path} has no {missing} method (methods: {list(self.method_names)}).")
        self._check_kernel_abi()
        self.metadata = self._read_metadata()
        #: ``forward`` executions so far: a caller that keeps state in the KV cache between calls
        #: (a chat session) compares it to know whether anyone else has run the program since.
        self.executions = 0
        #: Held by whoever runs a sequence through the program (see :class:`ProgramLock`); the
        #: methods here do not take it, so a caller holds it across all the calls of one sequence.
        self.lock = ProgramLock()
        # decode()'s inputs, refilled each step: token [1, 1] and cache position [1] (int64)
        self._step_inputs = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        warn_if_contended()

    def _check_kernel_abi(self) -> None:
        """A program built for another version of our kernels (their weight layout) must not run."""
        if not needs_own_kernels(self.path):
            return
        from . import kernels

        name = "get_et_transformers_kernels_abi"
        built_for = int(self._constant(name)) if name in self.method_names else 1  # before it was recorded
        if built_for not in kernels.COMPATIBLE_ABIS:
            raise ProgramError(
                f"{self.path} was built for version {built_for} of et_transformers' kernels, and this "
                f"installation's run versions {list(kernels.COMPATIBLE_ABIS)} (another weight layout or "
                f"operators): export it again "
                f"(from_pretrained(..., force_export=True), or a new cache folder)."
            )

    def _constant(self, name: str):
        outputs = self._module.run_method(name, ())
        return outputs if len(outputs) != 1 else outputs[0]

    def _read_metadata(self) -> ProgramMetadata:
        required = ("get_max_seq_len", "get_vocab_size", "get_eos_ids")
        missing = [m for m in required if m not in self.method_names]
        if missing:
            raise ProgramError(
                f"{self.path} is not an LLM program: it lacks the metadata methods {missing}."
            )

        def get(name: str, default):
            return self._constant(name) if name in self.method_names else default

        eos = get("get_eos_ids", ())
        eos = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        max_seq_len = int(get("get_max_seq_len", 128))
        verify_tokens = int(get("get_verify_tokens", 1))
        rank = len(self._module.method_meta(self.DECODER).output_tensor_meta(0).sizes())
        return ProgramMetadata(
            max_seq_len=max_seq_len,
            max_context_len=int(get("get_max_context_len", max_seq_len)),
            vocab_size=int(get("get_vocab_size", -1)),
            bos_id=int(get("get_bos_id", -1)),
            eos_ids=eos,
            n_layers=int(get("get_n_layers", -1)),
            use_kv_cache=bool(get("use_kv_cache", True)),
            enable_dynamic_shape=bool(get("enable_dynamic_shape", False)),
            all_logits=rank == 3 and "get_verify_tokens" not in self.method_names,
            verify_tokens=verify_tokens,
            cache_rebuild_len=(int(get("get_cache_rebuild_len", 0)) or None),
        )

    def _check(self, input_ids: torch.Tensor, start_pos: int) -> None:
        n = input_ids.shape[-1]
        meta = self.metadata
        if n < 1:
            raise ValueError("forward needs at least one token.")
        if n > meta.max_seq_len:
            raise ValueError(f"{n} tokens in one call exceed the program's max_seq_len={meta.max_seq_len}.")
        if start_pos < 0 or start_pos + n > meta.max_context_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + n - 1} do not fit the program's context of "
                f"{meta.max_context_len} tokens (max_context_len)."
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= meta.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {meta.vocab_size}).")

    def _run(self, input_ids: torch.Tensor, start_pos: int, image_features=None) -> torch.Tensor:
        self._check(input_ids, start_pos)
        if image_features is not None and not self.TAKES_IMAGES:
            raise ValueError(f"{self.path.name} is a text-only program: it takes no images.")
        n = input_ids.shape[-1]
        positions = torch.arange(start_pos, start_pos + n, dtype=torch.long)
        self.executions += 1
        try:
            return self._call(input_ids.reshape(1, n), positions, True, image_features)
        except RuntimeError as e:
            raise self._failed(e, n, start_pos) from e

    def _call(self, input_ids: torch.Tensor, positions: torch.Tensor, copy: bool, image_features=None) -> torch.Tensor:
        """Run the decoder on checked inputs; its first output (logits)."""
        return self._module.forward((input_ids, positions), copy)[0]

    def _failed(self, error: RuntimeError, n: int, start_pos: int) -> ProgramError:
        return ProgramError(
            f"{self.path} failed to run {self.DECODER} on {n} token(s) at position {start_pos} ({error}). The "
            f"inputs passed our checks, so the program itself cannot run here: re-export it with "
            f"another recipe, and please report it with its manifest.json."
        )

    def forward(self, input_ids: torch.Tensor, start_pos: int, *, image_features=None) -> torch.Tensor:
        """Run ``input_ids`` (``[1, S]`` int64) at cache positions ``start_pos .. start_pos+S-1``.

        Args:
            image_features: image-text-to-text programs only: ``(positions [n], features [n, hidden])``;
                the embeddings of those positions (absolute, in the sequence) are replaced by the
                features, as transformers puts image features in place of image tokens.

        Returns:
            float32 logits of the last position, ``[1, vocab]``.

        Raises:
            ValueError: empty input, too many tokens for one call, positions past the context, or
                token ids outside the vocabulary.
        """
        logits = self._run(input_ids, start_pos, image_features)  # [1, V], or [1, S, V] for evaluation programs
        return logits[:, -1] if logits.dim() == 3 else logits

    def decode(self, token_id: int, pos: int, *, copy: bool = True) -> torch.Tensor:
        """One generation step: the logits ``[1, vocab]`` after ``token_id`` at position ``pos``.

        The fast path of the decode loop: the caller guarantees ``token_id`` came from this
        program's logits and ``pos`` is inside the context, so nothing is re-checked.

        Args:
            copy: ``False`` returns a view of the program's own output memory instead of a new
                tensor, valid only until the program runs again. Copying the logits costs a fresh
                allocation per token (a 49k vocabulary: ~0.25 ms, 3% of a SmolLM2 decode step),
                which the generation loop skips whenever nothing can keep the tensor.

        The two input tensors are allocated once and refilled each step: two fresh tensors per
        token cost allocations and, through them, Python garbage collections (about 3% of a
        SmolLM2 decode step, measured in an interleaved bare loop). The program reads them only
        while it runs, and runs one call at a time (callers hold :attr:`lock`).
        """
        token, position = inputs = self._step_inputs
        token[0, 0] = token_id
        position[0] = pos
        self.executions += 1
        try:
            logits = self._call(token, position, copy)
        except RuntimeError as e:
            raise self._failed(e, 1, pos) from e
        return logits[:, -1] if logits.dim() == 3 else logits

    def verify(self, token_ids: list[int], pos: int) -> torch.Tensor:
        """Run ``token_ids`` at positions ``pos ..``; return the logits after each, ``[n, vocab]``.

        One call scores a draft of assisted generation: row ``i`` holds the logits for the
        position after ``token_ids[i]``. Positions the caller later rejects are simply written
        over by the next call, whose cache position decides what is valid.

        Raises:
            ValueError: more tokens than the program's ``verify_tokens`` (or its ``max_seq_len``),
                positions past the context, or ids outside the vocabulary.
        """
        k = self.metadata.verify_tokens
        if len(token_ids) > k:
            raise ValueError(
                f"{len(token_ids)} tokens to verify exceed the program's verify_tokens={k} (forward "
                f"returns the logits of its last {k} positions). Draft at most {k - 1} tokens, or "
                f"export with ExportConfig(verify_tokens=...) set higher."
            )
        logits = self._run(torch.tensor([token_ids], dtype=torch.long), pos)
        return logits[0, -len(token_ids) :] if logits.dim() == 3 else logits  # [n, V]; the rest is padding

    def forward_all(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Like :meth:`forward` but returns every position's logits ``[1, S, vocab]``.

        One call on an evaluation program (``logits="all"``); on a generation program, one call
        per token, each returning its own position's logits (exact, S times slower).

        Raises:
            ValueError: on a generation program, a sequence that passes its ``cache_rebuild_len``
                (one-token calls cannot reproduce those logits exactly).
        """
        if self.metadata.all_logits:
            return self._run(input_ids, start_pos)
        rebuild = self.metadata.cache_rebuild_len
        if rebuild is not None and start_pos + input_ids.shape[-1] > rebuild:
            raise ValueError(
                f"{input_ids.shape[-1]} tokens from position {start_pos} pass this program's "
                f"cache_rebuild_len={rebuild}: the model then uses other rotary factors for every "
                f"position, which one-token calls cannot reproduce. Export an evaluation program "
                f"(logits='all') for per-position logits of longer sequences."
            )
        rows = [self.forward(input_ids[:, i : i + 1], start_pos + i) for i in range(input_ids.shape[-1])]
        return torch.stack(rows, dim=1)

    def run_method(self, name: str, inputs: tuple = ()) -> list:
        """Run any method of the program by name and return its outputs."""
        if name not in self.method_names:
            raise ValueError(f"method {name!r} is not in {self.path.name} (methods: {list(self.method_names)}).")
        return self._module.run_method(name, inputs)

    def write_etdump(self, path: str | os.PathLike) -> Path:
        """Write the ETDump recorded so far (requires ``enable_etdump=True``)."""
        if not self._module.has_etdump():
            raise ProgramError("this program was loaded without enable_etdump=True; nothing was recorded.")
        self._module.write_etdump_result_to_file(str(path))
        return Path(path)


class MultimodalProgram(Program):
    """A loaded image-text-to-text program: the three methods ExecuTorch's ``MultimodalRunner`` runs.

    ``vision_encoder(pixel_values [1, 3, H, W]) -> image features [1, T, hidden]``,
    ``token_embedding(ids [1, S]) -> [1, S, hidden]`` and
    ``text_decoder(embeddings [1, S, hidden], cache_position [S]) -> logits``, the decoder holding
    the KV cache. Every :class:`Program` call (``forward``, ``decode``, ``verify``) embeds its
    tokens first, so the generation loop runs this program unchanged; ``forward(..., image_features=)``
    replaces the embeddings of the positions it lists by image features (a prompt's image tokens,
    as transformers' ``masked_scatter`` does).

    Raises:
        ProgramError: as :class:`Program`, or the file lacks the three methods.
    """

    DECODER = "text_decoder"
    REQUIRED_METHODS = ("vision_encoder", "token_embedding", "text_decoder")
    TAKES_IMAGES = True

    def __init__(self, path: str | os.PathLike, *, enable_etdump: bool = False):
        super().__init__(path, enable_etdump=enable_etdump)
        vision = self._module.method_meta("vision_encoder")
        #: The shape of one image the vision encoder takes (``[1, 3, H, W]``).
        self.image_shape = tuple(int(d) for d in vision.input_tensor_meta(0).sizes())
        #: Features (tokens) one image becomes.
        self.tokens_per_image = int(vision.output_tensor_meta(0).sizes()[1])
        name = "get_image_token_id"
        #: The placeholder token whose embeddings image features replace (-1: unknown).
        self.image_token_id = int(self._constant(name)) if name in self.method_names else -1

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image's features ``[tokens_per_image, hidden]``.

        Args:
            pixel_values: the processor's float tensor for one image, ``[3, H, W]`` or ``[1, 3, H, W]``.

        Raises:
            ValueError: another shape than the encoder was exported for (the message names both).
        """
        expected = self.image_shape
        pixels = pixel_values.reshape(1, *pixel_values.shape) if pixel_values.dim() == len(expected) - 1 else pixel_values
        if tuple(pixels.shape) != expected or not pixels.is_floating_point():
            raise ValueError(
                f"pixel_values of shape {list(pixel_values.shape)} ({pixel_values.dtype}) do not fit this "
                f"program's vision encoder, which takes one float image of shape {list(expected)}: use the "
                f"model's own processor (AutoProcessor from the model folder), which resizes images to "
                f"{expected[-2]}x{expected[-1]}."
            )
        try:  # not counted in ``executions``: the encoder leaves the KV cache as it was
            return self._module.run_method("vision_encoder", (pixels.float().contiguous(),))[0][0]
        except RuntimeError as e:
            raise ProgramError(f"{self.path} failed to run vision_encoder ({e}).") from e

    def _call(self, input_ids: torch.Tensor, positions: torch.Tensor, copy: bool, image_features=None) -> torch.Tensor:
        embeds = self._module.run_method("token_embedding", (input_ids,))[0]  # a fresh tensor: ours to write
        if image_features is not None:
            where, features = image_features
            start = int(positions[0])
            inside = (where >= start) & (where < start + positions.shape[0])
            if bool(inside.any()):
                embeds[0, where[inside] - start] = features[inside].to(embeds.dtype)
        return self._module.run_method("text_decoder", (embeds, positions), copy)[0]
