"""Every transformers/peft/trl version difference swiftlora depends on, and only here."""
from __future__ import annotations

from typing import Any


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The model's RoPE settings as one flat dict with ``rope_type`` and ``rope_theta`` always present.

    transformers >= 5 keeps them in ``config.rope_parameters`` (with ``rope_theta`` and ``partial_rotary_factor``
    inside); 4.x had ``config.rope_theta`` beside an optional ``config.rope_scaling`` whose type key was once
    ``type``. Models with one setting per attention type (Gemma 3: ``{"full_attention": {...},
    "sliding_attention": {...}}``) need ``layer_type``.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:
        if layer_type not in nested:
            raise ValueError(f"{type(config).__name__} has one RoPE setting per layer type {nested}: "
                             f"pass layer_type=<one of them>, got {layer_type!r}")
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None)
    if not params and isinstance(scaling, dict):
        params = dict(scaling)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    if "rope_theta" not in params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise ValueError(f"{type(config).__name__} has no rope_theta (neither in rope_parameters nor on the config)")
        params["rope_theta"] = theta
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def head_dim(config: Any) -> int:
    """``config.head_dim`` when set (Gemma, Qwen3 differ from hidden/heads), else hidden_size // heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def below_autograd():
    """Context in which torch.ops.swiftlora.* calls skip the Autograd dispatch key and go straight to the kernel.

    The ops' Python entry points (swiftlora.ops.*) carry their own torch.autograd.Function, because the generic
    autograd of torch.library.register_autograd costs ~70 µs of Python per call on torch 2.11-2.14, more than
    many of our kernels take. The guard is private torch API (stable since 1.x), hence here.
    """
    import torch

    return torch._C._AutoDispatchBelowAutograd()


def bump_version(t) -> None:
    """Marks ``t`` as modified in place for autograd (its version counter), after a torch.ops.swiftlora op wrote into
    it below autograd: an earlier op that saved ``t`` then fails loudly in its backward instead of using the new
    values. torch.autograd.graph.increment_version exists since torch 2.1."""
    import torch

    torch.autograd.graph.increment_version(t)


def addmm_fp32_(acc, a, b, beta: float = 1.0) -> None:
    """``acc = beta·acc + a @ b`` with ``acc`` float32 and ``a``, ``b`` possibly 16-bit, accumulating in float32
    (beta = 0: acc's old contents are not read, NaN in them included, as addmm documents).

    CUDA with torch's ``addmm(out_dtype=float32)`` (sm80+, torch >= 2.8) does it in one GEMM without a temporary;
    otherwise the operands are upcast (a temporary of each operand's size, not of ``acc``'s).
    """
    import torch

    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.is_cuda and a.dtype == b.dtype and _addmm_out_dtype_ok(acc.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


_ADDMM_OUT_DTYPE: dict = {}


def _addmm_out_dtype_ok(device) -> bool:
    import torch

    key = (device.type, device.index)
    if key not in _ADDMM_OUT_DTYPE:
        has_overload = hasattr(torch.ops.aten.addmm, "dtype_out")
        _ADDMM_OUT_DTYPE[key] = has_overload and torch.cuda.get_device_capability(device)[0] >= 8
    return _ADDMM_OUT_DTYPE[key]


# ---------------------------------------------------------------------------------------------------------------
# transformers: attention backends, KV cache, GGUF loading, RoPE settings


def attention_function(config: Any, eager):
    """The attention backend transformers selected for ``config`` (``config._attn_implementation``: "sdpa",
    "flash_attention_2", "flex_attention", ...), or ``eager`` for "eager"/unset. transformers >= 4.48 keeps them in
    ``ALL_ATTENTION_FUNCTIONS``; 5.x adds ``get_interface`` (which also validates the name)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager"):
        return eager
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl]


def cache_update(cache, key, value, layer_idx: int, kwargs: dict):
    """``cache.update`` for one layer's new keys/values ``[B, Hkv, S, D]``; returns the full keys and values.
    transformers 5 passes the forward's kwargs (cache_position, ...) as ``kwargs=``; 4.x took a ``cache_kwargs``
    dict positionally."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx, {"cache_position": kwargs.get("cache_position")})


def drop_gguf_quantizer(model) -> None:
    """transformers (5.24) leaves a ``GgufHfQuantizer`` on a model loaded from a GGUF file although its weights are
    now plain dequantized tensors: ``save_pretrained`` then refuses ("not serializable") and the Trainer thinks the
    model untrainable. Drop it (offline-assets.md §1)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def set_rope_scaling(config: Any, rope_scaling: dict) -> None:
    """Apply a user ``rope_scaling`` dict (``{"type"|"rope_type": "linear"|"dynamic"|..., "factor": ...}``) to a config:
    transformers 5 reads ``config.rope_parameters`` (theta inside), 4.x ``config.rope_scaling``."""
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if isinstance(getattr(config, "rope_parameters", None), dict):
        params = dict(config.rope_parameters)
        if any(isinstance(v, dict) for v in params.values()):  # one setting per layer type: scale them all
            config.rope_parameters = {k: {**v, **scaling} if isinstance(v, dict) else v for k, v in params.items()}
        else:
            config.rope_parameters = {**params, **scaling}
    else:
        config.rope_scaling = scaling


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes


def bnb_4bit_weight(module):
    """``(packed_weight, quant_state)`` of a ``bnb.nn.Linear4bit`` in the standard layout. bitsandbytes >= 0.48 repacks
    a CPU weight for AVX512-BF16 inference on its first eval forward (``quant_state.packing_format_for_cpu``); that
    layout is converted back here (as its own ``_save_to_state_dict`` does) without touching the module."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        import copy

        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
    return weight.data, state


def fix_bnb_cpu_dequantize() -> bool:
    """Makes bitsandbytes' CPU ``dequantize_4bit`` correct where its native kernel is not; returns whether it did.

    bitsandbytes 0.50's CPU kernel walks the weight row by row, and on AVX512 machines (seen on an AMD EPYC with
    AVX512-BF16, 2026-11-27) its blocks go wrong when a quantization block crosses a row: [48, 256] at blocksize
    512 or 1024 and [40, 96] at blocksize 64 came back with other blocks' scales, while its own generic
    implementation (the fallback it already takes at blocksize >= 2048 "for accuracy issues") and swiftlora's
    kernels agree. A [2, 96] probe at blocksize 64 tells which kernel this machine has; only a kernel that fails it
    is replaced, by that generic implementation. Checked once per process; a no-op without bitsandbytes."""
    global _BNB_CPU_DEQUANT_FIXED
    if _BNB_CPU_DEQUANT_FIXED is not None:
        return _BNB_CPU_DEQUANT_FIXED
    _BNB_CPU_DEQUANT_FIXED = False
    import warnings

    import torch
    try:
        import bitsandbytes  # noqa: F401  (registers its ops)
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except Exception:  # not installed, or another layout of its backends: leave it alone
        return False

    def generic(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                                        blocksize, shape, dtype)

    packed = torch.arange(96, dtype=torch.uint8).reshape(96, 1)  # 192 codes: 3 blocks of 64 over 2 rows of 96
    absmax = torch.tensor([1.0, 2.0, 3.0])
    try:
        native = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", [2, 96], torch.float32)
    except Exception:
        return False
    if torch.equal(native, generic(packed, absmax, 64, "nf4", (2, 96), torch.float32)):
        return False
    with warnings.catch_warnings():  # torch warns that a registered kernel is being overridden: that is the point
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", generic)
    _BNB_CPU_DEQUANT_FIXED = True
    return True


_BNB_CPU_DEQUANT_FIXED: bool | None = None


def keep_bnb_standard_layout(module) -> None:
    """Stops a ``bnb.nn.Linear4bit`` from repacking its CPU weight into bitsandbytes' AVX512-BF16 layout on its next
    eval forward (bitsandbytes >= 0.48, on CPUs with AVX512-BF16): swiftlora's kernels read the standard layout, and
    a repacked module would send every later decode step past them (and needs the ``kernels`` package)."""
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------------------------------------------------------
# TRL


def trl_fused_head_request(value) -> dict | None:
    """If ``value`` is the forward wrapper TRL >= 1.16's ``add_fused_lm_head`` assigns to ``model.forward`` (its
    trainers then call ``model(..., fused_lm_head=True)`` and expect per-token log-probs), the options it was made
    with: ``{"temperature", "outputs", "cast_lm_head_to_fp32"}``; else None. The wrapper is recognised by its code
    object (``functools.wraps`` copies the name of the forward it wraps) and its options read from its closure."""
    fn = getattr(value, "__func__", value)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or "fused_lm_head" not in code.co_varnames:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))
    return {
        "temperature": float(cells.get("temperature", 1.0)),
        "outputs": tuple(cells.get("outputs", ("log_probs", "entropy", "is_top1"))),
        "cast_lm_head_to_fp32": bool(cells.get("cast_lm_head_to_fp32", False)),
    }


def fused_causal_lm_output(**fields):
    """TRL's ``FusedCausalLMOutput`` (what its trainers read after ``model(..., fused_lm_head=True)``), or a
    ``ModelOutput`` with the same fields when TRL is not installed."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput as output_class
    except ImportError:
        output_class = _fused_output_fallback()
    return output_class(**fields)


def _fused_output_fallback():
    import dataclasses

    import torch
    from transformers.modeling_outputs import ModelOutput

    names = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask", "aux_loss")
    cls = dataclasses.make_dataclass("FusedCausalLMOutput", [(n, torch.Tensor | None, None) for n in names],
                                     bases=(ModelOutput,))
    return cls


# ---------------------------------------------------------------------------------------------------------------
# torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without it torch emulates bf16 GEMMs
    through float32 conversions (measured ~4x slower than float32 on an AVX2 EPYC). The probes are private torch
    helpers (torch >= 2.3); when absent, assume no."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p is not None and p() for p in probes)


def rename_token(tokenizer, token_id: int, new_text: str):
    """A copy of a fast tokenizer in which token ``token_id`` reads ``new_text`` (same id, so the model's embedding
    of that token is kept). Used by ``get_chat_template(map_eos_token=True)`` to make a chat template's end-of-turn
    word the tokenizer's EOS without growing the vocabulary.

    transformers keeps no copy of the vocabulary beside the Rust backend (``tokenizer._tokenizer``, the same
    attribute in 4.x ``PreTrainedTokenizerFast`` and 5.x ``TokenizersBackend``), so rebuilding the backend from
    its JSON with the token renamed — in ``added_tokens``, the model vocabulary and the post-processor — and
    swapping it in is the whole change.
    """
    import copy
    import json

    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"renaming a token needs a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
    old_text = tokenizer.convert_ids_to_tokens(token_id)
    state = json.loads(backend.to_str())
    for entry in state.get("added_tokens", []):
        if entry["id"] == token_id:
            entry["content"] = new_text
    model = state.get("model") or {}
    vocab = model.get("vocab")
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    if any(old_text in (a, b, a + b) for a, b in merges):
        raise ValueError(f"cannot rename token {old_text!r}: the tokenizer's BPE merges use its text")
    if isinstance(vocab, dict) and vocab.get(old_text) == token_id:
        vocab[new_text] = vocab.pop(old_text)
    elif isinstance(vocab, list) and token_id < len(vocab) and vocab[token_id][0] == old_text:
        vocab[token_id][0] = new_text  # unigram: [piece, score] rows in id order

    def rename(node):
        if isinstance(node, dict):
            return {(new_text if k == old_text else k): rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return new_text if node == old_text else node

    if state.get("post_processor") is not None:
        state["post_processor"] = rename(state["post_processor"])
    renamed = copy.deepcopy(tokenizer)
    renamed._tokenizer = Tokenizer.from_str(json.dumps(state))
    if renamed.convert_tokens_to_ids(new_text) != token_id or len(renamed) != len(tokenizer):
        raise ValueError(f"renaming token {old_text!r} to {new_text!r} did not keep its id {token_id}")
    return renamed


def trainer_tokenizer(trainer):
    """The tokenizer a transformers/TRL trainer holds: ``processing_class`` since transformers 4.46 (``tokenizer``
    before); a multimodal processor's ``.tokenizer``."""
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tok is None:
        raise ValueError("the trainer holds no tokenizer (processing_class); pass tokenizer=")
    return getattr(tok, "tokenizer", None) or tok



def mm_fp32(a, b):
    """``a @ b`` as float32 for 16-bit ``a``, ``b`` (e.g. LoRA factor gradients kept in float32): one GEMM with a
    float32 output where torch has ``mm(out_dtype=)`` on that device (CUDA sm80+, torch >= 2.8), else upcast
    operands."""
    import torch

    if a.is_cuda and a.dtype == b.dtype and _addmm_out_dtype_ok(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard), without importing torch.distributed where it is absent."""
    return type(t).__name__ == "DTensor"


def unsharded(t):
    """``t`` whole when it is an FSDP2/DTensor shard (an all-gather, differentiable: the gradient goes back to the
    shards), else ``t``. Our fused LM head reads ``lm_head.weight`` without calling the module, so FSDP2's pre-forward
    hook that would gather it never runs when accelerate shards the head in its own unit."""
    if t is None or not is_dtensor(t):
        return t
    return t.full_tensor()
