"""Loads the compiled core and reports how it was built."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before _C, which links against it)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "swiftlora's compiled extension (swiftlora._C) is missing or does not match the installed torch. "
        "Build it against your torch with: pip install --no-build-isolation . (from the source tree)"
    ) from exc


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a CUDA GPU is visible."""
    return bool(_C.cuda_built) and torch.cuda.is_available()


def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into this build (whether or not a GPU is visible)."""
    return bool(_C.cuda_built)


def compiled_arches() -> list[str]:
    """The CUDA arches this build holds machine code for, e.g. ['80', '90a']; [] in a CPU-only build."""
    return [a for a in str(_C.cuda_archs).split(",") if a]


def build_info() -> dict:
    """How this build was made: CUDA kernels, arches, nvcc and torch versions."""
    return {
        "cuda_built": cuda_built(),
        "sm90a_built": bool(_C.sm90a_built),
        "cuda_archs": compiled_arches(),
        "nvcc": str(_C.nvcc_version) or None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
