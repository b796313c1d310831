"""Our own ExecuTorch kernels: their C++ sources, the build that compiles them for this runtime, and
their PyTorch definitions.

ExecuTorch runs an operator it has no kernel for only if a library registers one into its kernel
registry (``libexecutorch.so``) before the program loads. This package holds such a library's
sources (``*.cpp``), compiles them on first use with the system's C++ compiler against the headers
and libraries the installed ExecuTorch wheel ships (into our cache folder, keyed by the sources,
the flags and the ExecuTorch version, so it is built once per environment), and loads the result.
The matching PyTorch operators, used when exporting and in eager evaluation, are in :mod:`.ops`;
their Python reference implementations compute bit for bit what the C++ kernels compute.
The 4-bit GEMM takes an AVX-512 VNNI path where the CPU has one (chosen when the library loads;
``ET_TRANSFORMERS_NO_AVX512=1`` forces the AVX2 paths; the GEMM gives the same bits on both), and the kernels'
parallel loops run on a pool of our own sized like ExecuTorch's (``kernel_common.h``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = ("q4_linear.cpp", "sdpa.cpp", "layer_ops.cpp")
#: Headers the sources include (part of the build's identity).
HEADERS = ("kernel_common.h",)
#: Operators the library registers (what a program needs it for).
OPERATORS = (
    "et_transformers::q4_linear.out",
    "et_transformers::q4_linear_per_token.out",
    "et_transformers::sdpa.out",
    "et_transformers::rms_norm.out",
    "et_transformers::rope.out",
    "et_transformers::silu_mul.out",
)
#: Version of the operators' contract (weight layout included) the library implements; programs
#: record the one they were built for (``get_et_transformers_kernels_abi``) and refuse to run on
#: another. 2: q4 weights as [N/8, K/32, 128] lane-interleaved blocks; rms_norm, rope, silu_mul.
#: 3: adds q4_linear_per_token (the same layout); a library of version 3 runs version-2 programs.
ABI = 3
#: Program versions this library runs (each later version only adds operators).
COMPATIBLE_ABIS = (2, 3)
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-std=c++17", "-fPIC", "-shared", "-DC10_USING_CUSTOM_GENERATED_MACROS",
          "-DET_EVENT_TRACER_ENABLED")  # the two definitions the wheel's libraries are built with (its cmake config)

_lock = threading.Lock()
_loaded: Path | None = None


class KernelBuildError(RuntimeError):
    """Our kernel library could not be built or loaded here (no compiler, no AVX2, missing headers)."""


def _executorch_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise KernelBuildError("executorch is not installed.")
    return Path(list(spec.submodule_search_locations)[0])


def _cache_dir() -> Path:
    from ..cache import default_cache_dir

    return default_cache_dir() / "kernels"


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels (x86-64 with AVX2, FMA and F16C)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def available() -> bool:
    """Whether the kernels can be built and run here (Linux, an AVX2/FMA/F16C CPU, a C++ compiler,
    ExecuTorch's headers); cheap: nothing is compiled."""
    if not sys.platform.startswith("linux") or not cpu_supported() or _compiler() is None:
        return False
    try:
        root = _executorch_root()
    except KernelBuildError:
        return False
    return (root / "include" / "executorch" / "runtime" / "kernel" / "operator_registry.h").is_file()


def library_path() -> Path:
    """The compiled kernel library for this environment, building it first if needed.

    Raises:
        KernelBuildError: no C++ compiler, a CPU without AVX2/FMA/F16C, or the build failed (the
            message carries the compiler's output).
    """
    if not sys.platform.startswith("linux") or not cpu_supported():
        raise KernelBuildError("et_transformers' kernels need Linux on an x86-64 CPU with AVX2, FMA and F16C.")
    root = _executorch_root()
    include, libdir = root / "include", root / "lib"
    if not (include / "executorch" / "runtime" / "kernel" / "operator_registry.h").is_file():
        raise KernelBuildError(f"ExecuTorch's C++ headers are missing from {include}; reinstall executorch.")
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((here / name).read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(metadata.version("executorch").encode())
    digest.update(str(root).encode())
    target = _cache_dir() / f"libet_transformers_kernels-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = _compiler()
    if not compiler:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX) to build et_transformers' kernels.")
    target.parent.mkdir(parents=True, exist_ok=True)
    c10 = include / "executorch" / "runtime" / "core" / "portable_type" / "c10"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, f"-I{include}", f"-I{c10}", *(str(here / s) for s in SOURCES),
               f"-L{libdir}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{libdir}", "-o", str(out)]
        logger.info("Building et_transformers' kernels (once per environment): %s", target.name)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"building et_transformers' kernels failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(out, target)  # atomic: a concurrent builder's identical result may win
    return target


def load() -> Path:
    """Build if needed and load the kernel library into this process (idempotent, thread-safe).

    ExecuTorch must already be loaded (its runtime owns the registry the library registers into).

    Raises:
        KernelBuildError: see :func:`library_path`.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            path = library_path()
        except OSError as exc:  # the cache folder cannot be written, the compiler cannot run, ...
            raise KernelBuildError(f"building et_transformers' kernels failed: {exc}") from exc
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise KernelBuildError(f"loading {path} failed: {exc}") from exc
        _loaded = path
        logger.debug("Loaded %s", path)
        return path
