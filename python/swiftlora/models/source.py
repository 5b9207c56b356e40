"""Where a model comes from: a Hub id, a local directory (a transformers checkpoint or a PEFT adapter over one), or
a GGUF file; and reading it into a transformers model.

Hub ids work when the Hub answers or the model is in the local HF cache; otherwise the error names the model and
says what to pass instead. GGUF files load through transformers' GGUF reader (dequantized to float32, then cast),
minus the stale quantizer it leaves behind. The directory holding a 16-bit checkpoint's safetensors is recorded
(:attr:`ModelSource.weights_dir`) so a merged save can re-read the original 16-bit weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _compat

HUB_ERROR = ("swiftlora: cannot load {name!r}: it is neither a local directory nor a file, and the Hugging Face Hub "
             "could not provide it ({err}). Offline, pass a local checkpoint directory or a .gguf file, or a Hub id "
             "already in the local Hugging Face cache.")


@dataclass
class ModelSource:
    """A resolved ``model_name``."""

    name: str                        # as the caller gave it
    path: str                        # local directory or Hub id to load from
    gguf_file: str | None = None     # file name inside ``path`` for GGUF models
    adapter_dir: str | None = None   # a PEFT adapter to load on top (model_name was an adapter directory)
    weights_dir: str | None = None   # local directory of the 16-bit safetensors (None: not 16-bit / unknown)

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve(model_name, token=None, revision=None, trust_remote_code=False, **hub_kwargs) -> tuple[ModelSource, object]:
    """``model_name`` -> (ModelSource, transformers config, or None for a GGUF file: parsing its metadata costs as
    much as loading it, so the config comes with the model). Raises ValueError for a local path that holds no
    model, OSError (naming the model) when a Hub id cannot be fetched."""
    from transformers import AutoConfig

    if not isinstance(model_name, (str, Path)) or not str(model_name):
        raise ValueError(f"model_name must be a Hub id, a directory or a .gguf file, got {model_name!r}")
    path = Path(model_name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model_name {str(model_name)!r} is a file but not a .gguf file")
        return ModelSource(str(model_name), str(path.parent), gguf_file=path.name), None
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            source, config = resolve(base, token, revision, trust_remote_code, **hub_kwargs)
            source.adapter_dir, source.name = str(path), str(model_name)
            return source, config
        if (path / "config.json").is_file():
            source = ModelSource(str(model_name), str(path), weights_dir=str(path))
            return source, AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve(ggufs[0], token, revision, trust_remote_code, **hub_kwargs)
        raise ValueError(f"model_name {str(model_name)!r}: the directory has no config.json, adapter_config.json or "
                         f"single .gguf file")
    try:
        config = AutoConfig.from_pretrained(str(model_name), token=token, revision=revision,
                                            trust_remote_code=trust_remote_code, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise OSError(HUB_ERROR.format(name=str(model_name), err=str(err).splitlines()[0])) from err
    return ModelSource(str(model_name), str(model_name)), config


def hub_snapshot_dir(source: ModelSource, token=None, revision=None) -> str | None:
    """The local cache directory of a Hub checkpoint after it was loaded (where its safetensors are)."""
    from transformers.utils import cached_file

    try:
        return str(Path(cached_file(source.path, "config.json", token=token, revision=revision)).parent)
    except (OSError, ValueError):
        return None


def is_16bit_checkpoint(directory: str | None) -> bool:
    """Whether ``directory`` holds unquantized floating-point safetensors (what a 16-bit merge can re-read)."""
    if directory is None:
        return False
    config = Path(directory) / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return False
    return any(Path(directory).glob("*.safetensors"))


def load_gguf(source: ModelSource, dtype: torch.dtype, device, attn_implementation: str):
    """A causal LM from a GGUF file: dequantized by transformers' reader, then cast to ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    _compat.drop_gguf_quantizer(model)
    return model.to(device=device, dtype=dtype)


def gguf_to_checkpoint(gguf_path, directory, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a GGUF file once into a transformers checkpoint directory (safetensors in ``dtype`` + tokenizer with
    its chat template), written atomically; later loads of the directory skip the slow GGUF parsing and
    dequantization. Returns the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.atomic import atomic_dir

    gguf_path = Path(gguf_path)
    with atomic_dir(directory) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        _compat.drop_gguf_quantizer(model)
        model.to(dtype).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
    return Path(directory)


def load_tokenizer(source: ModelSource, token=None, revision=None, trust_remote_code=False, **hub_kwargs):
    from transformers import AutoTokenizer

    if source.is_gguf:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(source.path, token=token, revision=revision,
                                         trust_remote_code=trust_remote_code, **hub_kwargs)
