"""Export: merged checkpoints (save_pretrained_merged, push_to_hub_merged, atomic writes), GGUF files for llama.cpp
and the Ollama Modelfile beside them.

``MODEL_METHODS`` lists the saving methods :func:`swiftlora.models.peft.attach_methods` binds to a model returned by
``get_peft_model`` / ``from_pretrained`` (other exporters, e.g. GGUF, add theirs here).
"""
from .save import push_to_hub_merged, save_pretrained, save_pretrained_merged

MODEL_METHODS = {
    "save_pretrained": save_pretrained,
    "save_pretrained_merged": save_pretrained_merged,
    "push_to_hub_merged": push_to_hub_merged,
}

__all__ = ["MODEL_METHODS", "push_to_hub_merged", "save_pretrained", "save_pretrained_merged"]
