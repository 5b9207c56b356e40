"""``swiftlora export``: a saved model (Hugging Face directory or hub id, LoRA adapter directory, or .gguf file) ->
GGUF files for llama.cpp / Ollama (see :func:`swiftlora.export.gguf.save_pretrained_gguf`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from .gguf import ALIASES, METHODS

    p = subparsers.add_parser(
        "export", help="write GGUF files (llama.cpp, LM Studio, Ollama) from a saved model or LoRA adapter",
        description="Load a model (merging a LoRA adapter in float32), then write <out>/<stem>.<METHOD>.gguf per "
                    "method and an Ollama Modelfile.")
    p.add_argument("model", help="model directory or hub id, LoRA adapter directory, or .gguf file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", "-q", action="append", dest="methods", metavar="METHOD",
                   help=f"repeatable; one of {', '.join(METHODS)} or {', '.join(ALIASES)} (default: q8_0)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--stem", default="model", help="file name prefix (default: model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the files to this Hugging Face repo")
    p.add_argument("--token", help="Hugging Face token for --push-to-hub")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false")
    p.set_defaults(func=run)


def load_model(source: str, device: str | None, tokenizer: str | None = None):
    """(model, tokenizer) from a HF directory/hub id, a PEFT adapter directory, or a GGUF file, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(source)
    kwargs = dict(dtype=torch.float32)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(tokenizer or path.parent, gguf_file=None if tokenizer else path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    elif (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(tokenizer or source)
    return model.to(device).eval(), tok


def run(args: argparse.Namespace) -> int:
    from .gguf import save_pretrained_gguf

    methods = args.methods or ["q8_0"]
    model, tok = load_model(args.model, args.device, args.tokenizer)
    if args.push_to_hub:
        from .hub import push_to_hub_gguf

        paths = push_to_hub_gguf(model, args.push_to_hub, tok, methods, token=args.token, save_directory=args.out,
                                 file_stem=args.stem, modelfile=args.modelfile)
    else:
        paths = save_pretrained_gguf(model, args.out, tok, methods, file_stem=args.stem, modelfile=args.modelfile)
    for p in paths:
        print(p)
    return 0
