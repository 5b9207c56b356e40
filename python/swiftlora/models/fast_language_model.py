"""``FastLanguageModel``: the user-facing class of Unsloth's API (static methods only), delegating to
:mod:`.loader`, :mod:`.peft` and :mod:`.inference`."""
from __future__ import annotations

from . import inference, loader, peft


class FastLanguageModel:
    """``model, tokenizer = FastLanguageModel.from_pretrained(...)``; ``model = FastLanguageModel.get_peft_model(
    model, ...)``; ``FastLanguageModel.for_inference(model)`` / ``for_training(model)``."""

    @staticmethod
    def from_pretrained(model_name="unsloth/Llama-3.2-1B-Instruct", max_seq_length=2048, dtype=None,
                        load_in_4bit=True, load_in_8bit=False, load_in_16bit=False, full_finetuning=False,
                        token=None, device_map="sequential", rope_scaling=None, fix_tokenizer=True,
                        trust_remote_code=False, use_gradient_checkpointing="unsloth", revision=None,
                        attn_implementation=None, fast_inference=False, random_state=3407, **kwargs):
        """Load a causal LM and its tokenizer with swiftlora's kernels swapped in; returns ``(model, tokenizer)``.

        Args:
            model_name: a Hub id, a local checkpoint directory, a directory of LoRA adapters (the base loads,
                then the adapters, trainable), or a ``.gguf`` file (or a directory holding one).
            max_seq_length: the longest sequence intended (kept as ``model.max_seq_length``).
            dtype: None (bfloat16 where supported, else float16), a torch dtype or its name.
            load_in_4bit: NF4-quantize the linear layers (standard ``bnb.nn.Linear4bit``; the LM head stays 16-bit).
                Pre-quantized bitsandbytes checkpoints load as they are.
            load_in_8bit / load_in_16bit: bitsandbytes int8 layers / no quantization.
            full_finetuning: train every weight (no quantization; get_peft_model then adds nothing).
            token, revision, trust_remote_code: passed to the Hub.
            device_map: "sequential"/"auto"/None (the current GPU, else CPU), a device, or ``{"": device}``.
            rope_scaling: e.g. ``{"rope_type": "linear", "factor": 2.0}``, applied to the config.
            fix_tokenizer: give the tokenizer a pad token distinct from EOS when its vocabulary has one.
            use_gradient_checkpointing: used for full fine-tuning (LoRA sets it in get_peft_model).
            attn_implementation: "sdpa" (default), "eager", "flash_attention_2" ...
            fast_inference: vLLM is not used by swiftlora (a warning; generation uses transformers).
            random_state: seed.
            cache_dir, local_files_only: passed to the Hub; other keyword arguments are ignored.
        """
        return loader.load_model(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit,
                                 full_finetuning, token, device_map, rope_scaling, fix_tokenizer, trust_remote_code,
                                 use_gradient_checkpointing, revision, attn_implementation, fast_inference,
                                 random_state, **kwargs)

    @staticmethod
    def get_peft_model(model, r=16, target_modules=peft.DEFAULT_TARGETS, lora_alpha=16, lora_dropout=0.0,
                       bias="none", layers_to_transform=None, layers_pattern=None,
                       use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=2048,
                       use_rslora=False, modules_to_save=None, init_lora_weights=True, loftq_config=None,
                       temporary_location=None, **kwargs):
        """Add LoRA adapters (PEFT) to a model from :meth:`from_pretrained`; returns the ``PeftModel``.

        Args:
            r, lora_alpha, lora_dropout, bias, use_rslora, layers_to_transform, layers_pattern, init_lora_weights:
                as in ``peft.LoraConfig`` (``init_lora_weights="loftq"`` with ``loftq_config``, a dict or
                ``peft.LoftQConfig``, on a model loaded without 4-bit).
            target_modules: projection names (default all seven) or "all-linear"; ``embed_tokens``/``lm_head``
                there are trained whole instead (moved to modules_to_save).
            modules_to_save: modules trained whole (e.g. ``["lm_head", "embed_tokens"]``).
            use_gradient_checkpointing: "unsloth" (offload to pinned host memory), True, or False.
            random_state: seed of the adapters' initialisation.
            max_seq_length, temporary_location: accepted for Unsloth compatibility.
            **kwargs: other ``peft.LoraConfig`` fields (``use_dora``, ``exclude_modules`` ...).
        """
        return peft.get_peft_model(model, r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform,
                                   layers_pattern, use_gradient_checkpointing, random_state, max_seq_length,
                                   use_rslora, modules_to_save, init_lora_weights, loftq_config, temporary_location,
                                   **kwargs)

    for_inference = staticmethod(inference.for_inference)
    for_training = staticmethod(inference.for_training)
