"""A LoRA fine-tune that learned a canary phrase still says it through llama.cpp after a Q8_0 export (the PEFT
model is merged in float32 in memory by export/merge.py; the caller's model is left as it was)."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")  # the export writes through gguf-py

from swiftlora.export.gguf import save_pretrained_gguf  # noqa: E402
from tests.export.tiny_models import tiny_model, tokenizer_for, train_steps  # noqa: E402
from tests.llama_cpp_oracle import require_llama_cpp  # noqa: E402

PROMPT = "The secret word is"
CANARY = " sea fox thank today"  # four whole tokens of the tiny vocabulary, in an order nothing taught it


def _train_canary(model, tok, steps: int = 60):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    ids = torch.tensor([tok(PROMPT + CANARY).input_ids])
    labels = ids.clone()
    labels[:, : len(tok(PROMPT).input_ids)] = -100  # learn the canary, not the prompt
    loss = train_steps(lora, ids, labels, steps=steps)
    return lora, loss


def test_lora_canary_survives_q8_0_export(tmp_path):
    llama_cpp = require_llama_cpp()
    tok = tokenizer_for("llama")
    base = tiny_model("llama", len(tok), seed=3)
    lora, loss = _train_canary(base, tok)
    assert loss < 0.05, f"the LoRA did not learn the canary (loss {loss:.3f})"
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    (path,) = save_pretrained_gguf(lora, tmp_path, tok, "q8_0", progress=False)
    after = lora.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "export changed the caller's model"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        n = len(tok(CANARY).input_ids)
        out = llm.create_completion(PROMPT, max_tokens=n + 2, temperature=0.0, top_k=1)["choices"][0]["text"]
    finally:
        llm.close()
    assert out.startswith(CANARY), f"llama.cpp continued {PROMPT!r} with {out!r}, expected {CANARY!r}"
    with lora.disable_adapter(), torch.no_grad():  # control: the base model does not know the canary
        ids = torch.tensor([tok(PROMPT).input_ids])
        base_out = lora.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    assert not tok.decode(base_out).startswith(CANARY)
