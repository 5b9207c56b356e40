"""Quantization methods (Unsloth's names) and the per-tensor type each one gives, following llama.cpp's
``llama-quantize`` rules (src/llama-quant.cpp, non-MoE models) so that our file has the same tensor types as
``llama-quantize model-f32.gguf out.gguf Q4_K_M`` would write (tests/export check it against llama.cpp itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

# method -> (general.file_type, base tensor type)
METHODS: dict[str, tuple[F, T]] = {
    "f32": (F.ALL_F32, T.F32), "f16": (F.MOSTLY_F16, T.F16), "bf16": (F.MOSTLY_BF16, T.BF16),
    "q8_0": (F.MOSTLY_Q8_0, T.Q8_0), "q4_0": (F.MOSTLY_Q4_0, T.Q4_0), "q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "q5_0": (F.MOSTLY_Q5_0, T.Q5_0), "q5_1": (F.MOSTLY_Q5_1, T.Q5_1), "q2_k": (F.MOSTLY_Q2_K, T.Q2_K),
    "q3_k_s": (F.MOSTLY_Q3_K_S, T.Q3_K), "q3_k_m": (F.MOSTLY_Q3_K_M, T.Q3_K), "q3_k_l": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "q4_k_s": (F.MOSTLY_Q4_K_S, T.Q4_K), "q4_k_m": (F.MOSTLY_Q4_K_M, T.Q4_K), "q5_k_s": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "q5_k_m": (F.MOSTLY_Q5_K_M, T.Q5_K), "q6_k": (F.MOSTLY_Q6_K, T.Q6_K),
}
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}

# A row length that is not a multiple of the block: llama.cpp's replacement types, then F16.
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_BLOCK = {T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q2_K: 256, T.Q3_K: 256, T.Q4_K: 256,
          T.Q5_K: 256, T.Q6_K: 256}


def resolve_methods(quantization_method: str | list[str] | tuple[str, ...]) -> list[str]:
    """Canonical method names for a name or a list of names (aliases resolved, duplicates dropped).

    Raises ValueError naming the valid methods for an unknown one."""
    names = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not names:
        raise ValueError("quantization_method: give at least one method")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"quantization_method: expected a string or a list of strings, got {name!r}")
        key = ALIASES.get(name.lower(), name.lower())
        if key not in METHODS:
            valid = ", ".join(list(METHODS) + [f"{a} (= {b})" for a, b in ALIASES.items()])
            raise ValueError(f"quantization_method: unknown method {name!r}; valid methods: {valid}")
        if key not in out:
            out.append(key)
    return out


def is_quantized(t: T) -> bool:
    return t in _BLOCK


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class QuantPolicy:
    """Chooses each tensor's type for one method, as llama-quantize does. Feed tensors in file order (layers
    ascending): like llama.cpp it counts attn_v / ffn_down tensors to know the layer.

    n_layer, n_head, n_head_kv: from the model config; n_attn_v: number of attn_v tensors in the file;
    has_output: whether an ``output.weight`` is written (False when embeddings are tied); large_llama: a 70B
    Llama (80 layers with grouped-query attention), for which llama.cpp gives attn_v more bits.
    """

    method: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_attn_v: int
    has_output: bool
    large_llama: bool = False
    _i_attn_v: int = field(default=0, init=False)
    _i_ffn_down: int = field(default=0, init=False)

    @property
    def file_type(self) -> F:
        return METHODS[self.method][0]

    def tensor_type(self, name: str, shape: tuple[int, ...]) -> T:
        """Type of GGUF tensor ``name`` with torch shape ``shape`` ([rows, cols]; cols = ggml's ne[0])."""
        base = METHODS[self.method][1]
        if not self._quantizable(name, shape):
            return T.F32
        if not is_quantized(base):
            return base
        t = self._mix_type(name, shape[-1], base)
        if is_quantized(t) and shape[-1] % _BLOCK[t]:
            t = _FALLBACK.get(t, t)
            if shape[-1] % _BLOCK[t]:
                t = T.F16
        return t

    @staticmethod
    def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
        # llama.cpp: 2-D tensors whose name ends in "weight", except norms (and a few kinds we never write).
        return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name

    def _mix_type(self, name: str, ncols: int, t: T) -> T:
        m = self.method
        if name == "output.weight" or (name == "token_embd.weight" and not self.has_output):
            if ncols % _BLOCK[t]:
                return T.Q8_0
            return t if t == T.Q8_0 else T.Q6_K
        if name == "token_embd.weight":
            return t
        gqa = self.n_head // max(1, self.n_head_kv)
        if "attn_v.weight" in name:
            i, n = self._i_attn_v, self.n_attn_v
            self._i_attn_v += 1
            if m == "q2_k":
                t = T.Q4_K if gqa >= 4 else T.Q3_K
            elif m == "q3_k_m":
                t = T.Q5_K if i < 2 else T.Q4_K
            elif m == "q3_k_l":
                t = T.Q5_K
            elif m in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
                t = T.Q6_K
            elif m == "q4_k_s" and i < 4:
                t = T.Q5_K
            if self.large_llama and t in (T.Q3_K, T.Q4_K):
                t = T.Q5_K
            return t
        if "ffn_down" in name:
            i, n = self._i_ffn_down, self.n_layer
            self._i_ffn_down += 1
            if m == "q2_k":
                return T.Q3_K
            if m == "q3_k_m":
                return T.Q5_K if i < n // 16 else T.Q4_K
            if m == "q3_k_l":
                return T.Q5_K
            if m in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
                return T.Q6_K
            if m == "q4_k_s" and i < n // 8:
                return T.Q5_K
            return t
        if "attn_output.weight" in name:
            return {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(m, t)
        return t
