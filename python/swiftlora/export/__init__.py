"""Export: merged checkpoints (save_pretrained_merged, push_to_hub_merged, atomic writes), GGUF files for llama.cpp
and the Ollama Modelfile beside them.

``MODEL_METHODS`` lists the saving methods :func:`swiftlora.models.peft.attach_methods` binds to a model returned by
``get_peft_model`` / ``from_pretrained`` (other exporters, e.g. GGUF, add theirs here).
"""
from .save import push_to_hub_merged, save_pretrained, save_pretrained_merged


def save_pretrained_gguf(model, save_directory, tokenizer=None, quantization_method="fast_quantized", **kwargs):
    """``model.save_pretrained_gguf``: see :func:`swiftlora.export.gguf.save_pretrained_gguf` (imported on use, so
    the ``gguf`` package is needed only by those who export)."""
    from .gguf import save_pretrained_gguf as export

    return export(model, save_directory, tokenizer, quantization_method, **kwargs)


def push_to_hub_gguf(model, repo_id, tokenizer=None, **kwargs):
    """``model.push_to_hub_gguf``: see :func:`swiftlora.export.hub.push_to_hub_gguf`."""
    from .hub import push_to_hub_gguf as push

    return push(model, repo_id, tokenizer, **kwargs)


MODEL_METHODS = {
    "save_pretrained": save_pretrained,
    "save_pretrained_merged": save_pretrained_merged,
    "push_to_hub_merged": push_to_hub_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_gguf": push_to_hub_gguf,
}

__all__ = ["MODEL_METHODS", "push_to_hub_gguf", "push_to_hub_merged", "save_pretrained", "save_pretrained_gguf",
           "save_pretrained_merged"]
