"""Delegate backends as the runtime sees them: which a program needs, and whether this runtime has them.

A ``.pte`` names the backend of each delegate by id (``XnnpackBackend``, ``OpenvinoBackend``...).
ExecuTorch's runtime fails such a program with an opaque ``0x20`` (NotFound) when the id is not
registered, or when a registered backend cannot load its native library, and for OpenVINO that
failure is permanent for the process (its library is opened once, under ``std::call_once``).
:func:`prepare_delegates` therefore runs before a program is loaded: it reads the ids from the
program's flatbuffer (a few fields, no ``flatc``, no torch), refuses an id this runtime lacks with
a :class:`~et_transformers.errors.ProgramError` that names the backend and what to install, and makes
the native libraries findable (:data:`DELEGATES`).

OpenVINO: the executorch wheel's runtime ``dlopen``\\ s ``libopenvino_c.so``, from the file named by
``OPENVINO_LIB_PATH`` (a file, not a folder: read in its ``OpenvinoBackend.cpp`` and checked here)
or else by that name on the library search path; the ``openvino`` pip package ships it versioned
(``openvino/libs/libopenvino_c.so.2541``), so :func:`locate_openvino` sets ``OPENVINO_LIB_PATH`` to
the file it finds, unless the user set it.

OpenVINO's CPU plugin runs float32 subgraphs in bfloat16 by default on CPUs with bfloat16 units
(AVX512_BF16, AMX), and the delegate imports its compiled subgraphs without properties, so an
``INFERENCE_PRECISION_HINT`` given at export is lost. :func:`pin_openvino_float32` (called before
OpenVINO compiles at export and before an OpenVINO program loads) caps oneDNN's instruction set
below bfloat16 through ``ONEDNN_MAX_CPU_ISA``, which the plugin's precision default follows, so our
float32 programs compute in float32 there too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ProgramError

logger = logging.getLogger(__name__)

#: The variable the OpenVINO delegate reads for its library's path (a file).
OPENVINO_LIB_VAR = "OPENVINO_LIB_PATH"
#: What installs the OpenVINO runtime our programs were verified with.
OPENVINO_INSTALL = 'pip install "et-transformers[openvino]"'


#: oneDNN's instruction-set cap, read once per process when its first kernel is chosen.
ONEDNN_ISA_VAR = "ONEDNN_MAX_CPU_ISA"
#: The cap per CPU flag that makes OpenVINO's CPU plugin default to bfloat16: the ISA just below it.
FLOAT32_ISA_CAPS = (("amx_bf16", "AVX512_CORE_VNNI"), ("avx512_bf16", "AVX512_CORE_VNNI"),
                    ("avx_ne_convert", "AVX2_VNNI"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def pin_openvino_float32() -> str | None:
    """Keep OpenVINO's CPU plugin in float32 on a CPU with bfloat16 units; return the cap set, if any.

    The plugin defaults to bfloat16 inference there, which would make our float32 OpenVINO programs
    differ from their float32 source; ExecuTorch's OpenVINO delegate imports subgraphs with no
    properties, so the only lever is oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA``, just
    below the bfloat16 instructions), which the plugin's default follows. It is set only when
    neither it nor ``DNNL_MAX_CPU_ISA`` is set already (a user's own cap wins: a warning says the
    programs may then compute in bfloat16), and it acts only if set before the process's first
    OpenVINO CPU compile (this package's exports and loads call this first). It also applies to
    PyTorch's own oneDNN kernels in this process if they have not run yet (float32 ones lose nothing).
    """
    given = os.environ.get(ONEDNN_ISA_VAR) or os.environ.get("DNNL_MAX_CPU_ISA")
    if given:
        if given.upper() not in {cap for _, cap in FLOAT32_ISA_CAPS} and _cpu_flags() & {f for f, _ in FLOAT32_ISA_CAPS}:
            logger.warning("oneDNN's ISA cap is %s as set by you: on this bfloat16-capable CPU OpenVINO may run "
                           "float32 programs in bfloat16 (unset it to keep them exact).", given)
        return None
    flags = _cpu_flags()
    cap = next((cap for flag, cap in FLOAT32_ISA_CAPS if flag in flags), None)
    if cap is not None:
        os.environ[ONEDNN_ISA_VAR] = cap
        logger.info("This CPU has bfloat16 units: %s=%s so OpenVINO computes our float32 programs in float32.",
                    ONEDNN_ISA_VAR, cap)
    return cap


def locate_openvino() -> Path | None:
    """Make the OpenVINO delegate's library findable; return the file it will load.

    ``OPENVINO_LIB_PATH`` when the user set it; else the ``libopenvino_c.so*`` of the installed
    ``openvino`` package (found without importing it), which is then put in ``OPENVINO_LIB_PATH``;
    else a ``libopenvino_c.so`` on ``LD_LIBRARY_PATH``; else ``None``.

    Also pins OpenVINO to float32 (:func:`pin_openvino_float32`).

    Raises:
        ProgramError: ``OPENVINO_LIB_PATH`` names no file.
    """
    pin_openvino_float32()
    given = os.environ.get(OPENVINO_LIB_VAR)
    if given:
        if not Path(given).is_file():
            raise ProgramError(
                f"{OPENVINO_LIB_VAR}={given!r} is not a file; it must name the OpenVINO C library itself "
                f"(libopenvino_c.so...), not a folder. Unset it to use the openvino package's ({OPENVINO_INSTALL})."
            )
        return Path(given)
    spec = importlib.util.find_spec("openvino")
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        libs = sorted(Path(folder, "libs").glob("libopenvino_c.so*"))
        if libs:
            os.environ[OPENVINO_LIB_VAR] = str(libs[0])
            logger.debug("OpenVINO delegate library: %s", libs[0])
            return libs[0]
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)):
        if Path(folder, "libopenvino_c.so").is_file():
            return Path(folder, "libopenvino_c.so")
    return None


@dataclass(frozen=True)
class DelegateRuntime:
    """What a delegate id needs at run time.

    Attributes:
        backend: our backend name (``ExportConfig.backend``).
        install: what gives a runtime this backend.
        locate: finds (and makes findable) the backend's native library; returns ``None`` when it
            is missing. ``None``: the backend is built into the runtime.
    """

    backend: str
    install: str
    locate: Callable[[], Path | None] | None = None


#: Delegate id -> what the runtime needs for it.
DELEGATES: dict[str, DelegateRuntime] = {
    "XnnpackBackend": DelegateRuntime("xnnpack", "pip install executorch (every wheel includes XNNPACK)"),
    "OpenvinoBackend": DelegateRuntime(
        "openvino", f"{OPENVINO_INSTALL} (an ExecuTorch runtime built with OpenVINO: the Linux x86-64 wheel)",
        locate_openvino,
    ),
    # No executorch pip wheel registers Vulkan: its programs run on an Android/desktop build with it.
    "VulkanBackend": DelegateRuntime(
        "vulkan", "run it with an ExecuTorch runtime built with Vulkan (EXECUTORCH_BUILD_VULKAN=ON, e.g. an "
                  "Android app); no executorch pip wheel includes it",
    ),
    # The Core ML delegate runs only on Apple OSes: no Linux executorch wheel registers it.
    "CoreMLBackend": DelegateRuntime(
        "coreml", "run it on an Apple device (iOS 18 / macOS 15 or later) with an ExecuTorch runtime built with "
                  "the Core ML backend (EXECUTORCH_BUILD_COREML=ON, e.g. the iOS frameworks' backend_coreml); no "
                  "Linux executorch pip wheel includes it",
    ),
}


def registered_backends() -> frozenset[str]:
    """The delegate ids this ExecuTorch runtime registers (its Python bindings' list)."""
    from executorch.extension.pybindings import _C

    return frozenset(_C._get_registered_backend_names())


# -- the program's delegate ids, read from its flatbuffer -------------------------------------
# Field numbers from executorch/exir/_serialize/program.fbs: Program.execution_plan is field 1,
# ExecutionPlan.delegates field 7, BackendDelegate.id field 0.
_PROGRAM_EXECUTION_PLAN, _PLAN_DELEGATES, _DELEGATE_ID = 1, 7, 0


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the table at ``table``, or ``None`` when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else None


def _deref(buf: bytes, pos: int) -> int:
    return pos + struct.unpack_from("<I", buf, pos)[0]


def _tables(buf: bytes, table: int, index: int) -> list[int]:
    """The tables of vector field ``index``."""
    pos = _field(buf, table, index)
    if pos is None:
        return []
    vector = _deref(buf, pos)
    n = struct.unpack_from("<I", buf, vector)[0]
    return [_deref(buf, vector + 4 + 4 * i) for i in range(n)]


def read_flatbuffer(path: str | os.PathLike) -> bytes:
    """The program flatbuffer of the ``.pte`` at ``path``: the bytes before its segments (weights,
    delegate blobs), whose end the extended header gives; the whole file when it has none."""
    with open(path, "rb") as f:
        head = f.read(24)
        size = int.from_bytes(head[16:24], "little") if head[8:12] == b"eh00" else None
        f.seek(0)
        return f.read(size if size else -1)


def program_delegate_ids(path: str | os.PathLike) -> tuple[str, ...]:
    """The delegate ids of every method of the ``.pte`` at ``path``, in order of first use.

    Raises:
        ProgramError: the file is not an ExecuTorch program or its flatbuffer is cut short.
    """
    buf = read_flatbuffer(path)
    if buf[4:6] != b"ET":
        raise ProgramError(f"{path} is not an ExecuTorch program (.pte): no 'ET' file identifier.")
    ids: dict[str, None] = {}
    try:
        root = _deref(buf, 0)
        for plan in _tables(buf, root, _PROGRAM_EXECUTION_PLAN):
            for delegate in _tables(buf, plan, _PLAN_DELEGATES):
                pos = _field(buf, delegate, _DELEGATE_ID)
                if pos is not None:
                    text = _deref(buf, pos)
                    n = struct.unpack_from("<I", buf, text)[0]
                    ids[buf[text + 4 : text + 4 + n].decode()] = None
    except (struct.error, UnicodeDecodeError) as e:
        raise ProgramError(f"{path}: its program flatbuffer is cut short or damaged ({e}).") from e
    return tuple(ids)


def _require(delegate_id: str, registered: frozenset[str], what: str) -> None:
    """Raise unless this runtime can run ``delegate_id`` delegates (``what`` names who needs them)."""
    known = DELEGATES.get(delegate_id)
    name = f"{delegate_id} (backend {known.backend!r})" if known else delegate_id
    if delegate_id not in registered:
        fix = (known.install if known
               else "use an ExecuTorch runtime built with that backend, or export the model again for one this runtime has")
        raise ProgramError(
            f"{what} has {name} delegates, which this ExecuTorch runtime does not include (it registers "
            f"{sorted(registered) or 'no delegate backends'}): {fix}."
        )
    if known and known.locate and known.locate() is None:
        raise ProgramError(
            f"{what} has {name} delegates, and this runtime's {delegate_id} needs its native library, which "
            f"is not installed: {known.install}."
        )


def prepare_delegates(path: str | os.PathLike, registered: frozenset[str] | None = None) -> tuple[str, ...]:
    """Check that this runtime has every delegate backend the program at ``path`` uses, and make
    their native libraries findable; call it before the program loads.

    Args:
        path: the ``.pte``.
        registered: the runtime's delegate ids; :func:`registered_backends` by default.

    Returns:
        The program's delegate ids.

    Raises:
        ProgramError: a delegate id this runtime does not register, or whose library is missing; the
            message names the backend and what to install.
    """
    ids = program_delegate_ids(path)
    if ids:
        registered = registered_backends() if registered is None else registered
        for delegate_id in ids:
            _require(delegate_id, registered, str(path))
    return ids


def check_runnable(backends: tuple[str, ...], registered: frozenset[str] | None = None) -> None:
    """Check, before an export meant to be loaded here, that this runtime can run ``backends``
    (``ExportConfig.backends``); exporting for another device needs no such check.

    Raises:
        ProgramError: a backend whose delegates this runtime lacks (the message says what to install).
    """
    registered = registered_backends() if registered is None else registered
    for delegate_id, runtime in DELEGATES.items():
        if runtime.backend in backends:
            what = (f"a program for backend={backends if len(backends) > 1 else backends[0]!r} (export_to_pte and "
                    f"`et-transformers export` build one for another device)")
            _require(delegate_id, registered, what)
