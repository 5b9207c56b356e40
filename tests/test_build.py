"""The build: every op has CPU, CUDA (kernel or clear error) and fake implementations; build info is consistent."""
from __future__ import annotations

import pytest
import torch

import swiftlora


def _swiftlora_ops():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("swiftlora::")]
    assert names, "no swiftlora ops registered"
    return sorted(names)


def test_build_info_is_consistent():
    info = swiftlora.build_info()
    assert info["cuda_built"] == bool(info["cuda_archs"]) == swiftlora.cuda_built()
    assert info["torch"] == torch.__version__
    if info["sm90a_built"]:
        assert "90a" in info["cuda_archs"]
    if info["cuda_built"]:
        assert info["nvcc"], "a CUDA build records its nvcc version"


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel_for_each_backend(key):
    # In a CPU-only build the CUDA kernel is the explicit "built without CUDA" error (csrc/common/cuda_missing.cpp).
    missing = [n for n in _swiftlora_ops() if not torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
    assert not missing, f"ops without a {key} kernel: {missing}"


def test_every_op_has_a_fake_kernel():
    from torch._library.simple_registry import singleton

    missing = [n for n in _swiftlora_ops() if singleton.find(n).fake_impl.kernel is None]
    assert not missing, f"ops without register_fake: {missing}"


def test_cpu_only_build_rejects_cuda_tensors_with_rebuild_hint():
    if swiftlora.cuda_built() or not torch.cuda.is_available():
        pytest.skip("needs a CPU-only swiftlora build with a CUDA GPU visible")
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*SWIFTLORA_CUDA_ARCHS"):
        swiftlora.ops.rms_norm(x, torch.ones(8, device="cuda"))
