"""Chat templates through the export, per family: the template embedded in the GGUF, rendered by llama.cpp's
Python frontend with the file's own BOS/EOS and tokenized by llama.cpp, gives the same token ids as the HF
tokenizer's apply_chat_template; and the Modelfile written beside the file has its TEMPLATE and stop words."""
from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")  # the export writes through gguf-py

from swiftlora.export.gguf import save_pretrained_gguf  # noqa: E402
from swiftlora.train.chat_templates import get_chat_template  # noqa: E402
from tests.export.tiny_models import tiny_model  # noqa: E402
from tests.llama_cpp_oracle import require_llama_cpp  # noqa: E402
from tests.train.tiny_tokenizers import tiny_tokenizer  # noqa: E402

FAMILIES = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "[INST]", "gemma": "<end_of_turn>",
            "qwen-2.5": "<|im_end|>", "phi-3": "<|end|>"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you today?"},
            {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "Tell me 3 facts."}]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_embedded_template_tokenizes_like_hf(tmp_path, family):
    llama_cpp = require_llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = get_chat_template(tiny_tokenizer("bytelevel"), family)
    model = tiny_model("llama", len(tok))
    (path,) = save_pretrained_gguf(model, tmp_path, tok, "f16", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == tok.chat_template
        text = lambda key: llm._model.token_get_text(int(meta[key])) if key in meta else ""  # noqa: E731
        # What llama-cpp-python's chat completion does with a GGUF's template: render, then tokenize, no extra BOS.
        formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=text("tokenizer.ggml.eos_token_id"),
                                        bos_token=text("tokenizer.ggml.bos_token_id"))
        prompt = formatter(messages=MESSAGES).prompt
        ours = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    want = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(want), f"{family}: llama.cpp {tok.decode(ours)!r}\n vs HF {tok.decode(want)!r}"
    modelfile = (tmp_path / "Modelfile").read_text()
    assert path.name in modelfile.splitlines()[0] and "TEMPLATE" in modelfile
    assert f'PARAMETER stop "{FAMILIES[family]}"' in modelfile, modelfile


def test_model_without_template_gets_a_modelfile_without_template(tmp_path):
    tok = tiny_tokenizer("bytelevel")
    assert not tok.chat_template
    with pytest.warns(UserWarning, match="no Ollama TEMPLATE"):
        save_pretrained_gguf(tiny_model("llama", len(tok)), tmp_path, tok, "q8_0", progress=False)
    text = (tmp_path / "Modelfile").read_text()
    assert "TEMPLATE" not in text and "model.Q8_0.gguf" in text
    reader = gguf.GGUFReader(tmp_path / "model.Q8_0.gguf")
    assert "tokenizer.chat_template" not in reader.fields
