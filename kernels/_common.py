"""What the kernels share: whether Triton is usable, and small launch helpers.

Triton is an optional dependency (the ``gpu`` extra). Everything here imports without it; the
kernel modules define their Triton kernels only when it imports.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

try:  # Triton is optional: the CPU build of difill never needs it.
    import triton  # noqa: F401

    TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising something else at import
    triton = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_available() -> bool:
    """True when ``import triton`` succeeded in this process."""
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (``TRITON_INTERPRET=1``), as the
    tests do on a machine without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_disabled_by_env() -> bool:
    """``DIFILL_KERNELS=0`` turns the Triton kernels off everywhere (a kill switch for users)."""
    return os.environ.get("DIFILL_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def use_triton(tensor: torch.Tensor) -> bool:
    """Dispatch rule: the Triton kernel for CUDA tensors when Triton imports and is not switched
    off; the PyTorch reference otherwise (CPU tensors, no Triton, ``DIFILL_KERNELS=0``).

    Under ``TRITON_INTERPRET=1`` CPU tensors take the kernels too, in Triton's interpreter: that
    is how the tests drive the dispatch and the engine hooks on a machine without a GPU."""
    if triton is None or kernels_disabled_by_env():
        return False
    return tensor.is_cuda or interpreting()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU (132 on an H100 SXM); split heuristics aim to give
    each a few programs. 1 elsewhere: in Triton's interpreter every program costs Python time
    (tests ask for several splits explicitly)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
