"""Thread settings that decide ExecuTorch's speed inside a Python process that also holds PyTorch.

In one process, ExecuTorch's ``llama::custom_sdpa`` kernel (from the executorch wheel) calls the BLAS
``sgemm_`` that PyTorch's ``libtorch_cpu`` exports (MKL, threaded with OpenMP) from inside
ExecuTorch's own thread pool, so two thread pools fight over the cores. Measured on a 2-core x86
machine with SmolLM2-135M 8da4w (ETDump, positions 128-192): ``custom_sdpa`` takes 8.3 ms per decode
step with PyTorch's default threading and 2.5 ms with ``OMP_NUM_THREADS=1`` (decode 65 -> 96 tok/s,
XNNPACK's GEMMs unchanged). The setting only works if it is in the environment before PyTorch is
imported (changing it later with ``torch.set_num_threads(1)`` makes things slower, not faster), so
this module owns two small things: :func:`prefer_single_threaded_blas`, which our own entry points
(the CLI, the benchmarks) call before importing torch, and :func:`warn_if_contended`, which tells a
library user once how to get the speed.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

_VARIABLE = "OMP_NUM_THREADS"
_warned = False


def prefer_single_threaded_blas() -> bool:
    """Set ``OMP_NUM_THREADS=1`` for this process if the user has not chosen and torch is not loaded.

    Returns True if the setting is (now) in effect. Call it before anything imports torch.
    """
    if _VARIABLE in os.environ:
        return os.environ[_VARIABLE] == "1"
    if "torch" in sys.modules:
        return False
    os.environ[_VARIABLE] = "1"
    return True


def warn_if_contended() -> None:
    """Log once (WARNING) when PyTorch's OpenMP threads will slow ExecuTorch's attention kernel."""
    global _warned
    if _warned or _VARIABLE in os.environ:
        return
    import torch

    if torch.get_num_threads() > 1:
        _warned = True
        logger.warning(
            "PyTorch uses %d OpenMP threads in this process, which slows ExecuTorch's attention kernel "
            "(about 1.5x slower decoding measured). For full speed set %s=1 in the environment before "
            "Python starts (ExecuTorch's own thread pool still uses every core).",
            torch.get_num_threads(),
            _VARIABLE,
        )
