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


def addmm_fp32_(acc, a, b) -> None:
    """``acc += a @ b`` with ``acc`` float32 and ``a``, ``b`` possibly 16-bit, accumulating in float32.

    CUDA with torch's ``addmm(out_dtype=float32)`` (sm80+, torch >= 2.8) does it in one GEMM without a temporary;
    otherwise the operands are upcast (a temporary of each operand's size, not of ``acc``'s).
    """
    import torch

    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and a.dtype == b.dtype and _addmm_out_dtype_ok(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


_ADDMM_OUT_DTYPE: dict = {}


def _addmm_out_dtype_ok(device) -> bool:
    import torch

    key = (device.type, device.index)
    if key not in _ADDMM_OUT_DTYPE:
        has_overload = hasattr(torch.ops.aten.addmm, "dtype_out")
        _ADDMM_OUT_DTYPE[key] = has_overload and torch.cuda.get_device_capability(device)[0] >= 8
    return _ADDMM_OUT_DTYPE[key]


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
