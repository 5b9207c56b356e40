"""GGUF export of tiny random models of every architecture, loaded by llama.cpp itself (llama-cpp-python): its
logits against the HF model's, its tokenizer against the HF tokenizer, the metadata types llama.cpp insists on,
and the per-tensor types of each quantization mix against llama-quantize's own choice (and bytes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the export writes through gguf-py

from swiftlora.export.gguf import METHODS, resolve_methods, save_pretrained_gguf  # noqa: E402
from tests.export.tiny_models import ARCHS, TEXT, fit_to_text, tiny_model, tokenizer_for  # noqa: E402
from tests.llama_cpp_oracle import llama_logits, require_llama_cpp  # noqa: E402


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _export(tmp_path, arch, methods, fit=False, **model_overrides):
    tok = tokenizer_for(arch)
    model = tiny_model(arch, len(tok), seed=int(torch.randint(1 << 20, ())), **model_overrides)
    if fit:
        fit_to_text(model, tok)
    paths = save_pretrained_gguf(model, tmp_path, tok, methods, progress=False)
    return model, tok, paths


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_match_hf(tmp_path, arch):
    """Logits of a fresh tiny model (random init, then 40 steps on the text so its top-1 has real margins) in
    llama.cpp vs HF: relative error <= 1e-2 for F32/F16/BF16, top-1 agreement >= 97% for Q8_0."""
    require_llama_cpp()
    model, tok, paths = _export(tmp_path, arch, ["f32", "f16", "bf16", "q8_0"], fit=True)
    ids = tok(TEXT * 4).input_ids
    ref = _hf_logits(model, ids)
    for path in paths:
        got = llama_logits(path, ids)
        assert got.shape == ref.shape, f"{path.name}: {got.shape} vs {ref.shape}"
        if "Q8_0" in path.name:
            agree = (got.argmax(-1) == ref.argmax(-1)).mean()
            assert agree >= 0.97, f"{arch} {path.name}: top-1 agreement {agree:.3f} < 0.97"
        else:
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err <= 1e-2, f"{arch} {path.name}: relative logits error {err:.2e} > 1e-2"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_llama_cpp_tokenizes_like_the_source_tokenizer(tmp_path, arch):
    """Byte-level BPE: llama.cpp == the HF tokenizer. SentencePiece: llama.cpp == the SentencePiece model itself
    (transformers 5's Metaspace pre-tokenizer drops the dummy prefix before a leading space; SentencePiece and
    llama.cpp keep it)."""
    llama_cpp = require_llama_cpp()
    _, tok, (path,) = _export(tmp_path, arch, "f16")
    sp = None
    if getattr(tok, "vocab_file", None):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=tok.vocab_file)
    bos = tok("a").input_ids[:1] if tok("a").input_ids[:1] == [tok.bos_token_id] else []
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, " leading space", "Tabs\tand\nnew\n\nlines  end ", "<|im_start|>user\nHi<|im_end|>",
                     "<start_of_turn>model\nok<end_of_turn>", "naïve café 日本語 42"):
            ours = llm.tokenize(text.encode(), add_bos=True, special=True)
            want = tok(text).input_ids if sp is None else bos + sp.encode(text)
            assert ours == want, f"{arch}: {text!r}: llama.cpp {ours} vs {want}"
    finally:
        llm.close()


def test_metadata_types_and_tensor_layout(tmp_path):
    _, tok, (path,) = _export(tmp_path, "llama", "q4_k_m")
    reader = gguf.GGUFReader(path)
    types = {k: f.types[0] for k, f in reader.fields.items()}
    V = gguf.GGUFValueType
    for key in ("llama.context_length", "llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.feed_forward_length", "general.file_type",
                "tokenizer.ggml.eos_token_id", "general.quantization_version"):
        assert types[key] == V.UINT32, f"{key}: {types[key]}"
    assert types["llama.attention.layer_norm_rms_epsilon"] == V.FLOAT32
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    names = [t.name for t in reader.tensors]
    assert "output.weight" in names and names[0] == "token_embd.weight"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary file left behind"
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./model.Q4_K_M.gguf") or \
        "model.Q4_K_M.gguf" in (tmp_path / "Modelfile").read_text()


MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q4_0", "q4_1",
         "q5_0", "q5_1", "q8_0"]


@pytest.fixture(scope="module")
def all_mixes(tmp_path_factory):
    """One tiny 8-layer Llama (intermediate 320: ffn_down rows are not multiples of 256, so the fallbacks apply)
    exported as F32 and as every mix."""
    folder = tmp_path_factory.mktemp("mixes")
    tok = tokenizer_for("llama")
    model = tiny_model("llama", len(tok), num_hidden_layers=8, intermediate_size=320)
    paths = save_pretrained_gguf(model, folder, tok, ["f32"] + MIXES, progress=False, modelfile=False)
    return paths[0], dict(zip(MIXES, paths[1:]))


@pytest.mark.parametrize("method", MIXES)
def test_mixes_equal_llama_quantize(all_mixes, method):
    """Our file vs llama-quantize run on our F32 file: same tensor types (incl. the use_more_bits layers and the
    fallbacks) and the same bytes."""
    llama_cpp = require_llama_cpp()
    f32, ours = all_mixes[0], all_mixes[1][method]
    theirs = ours.with_name(f"llama-quantize.{method}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(METHODS[method][0])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    tb = {t.name: t for t in b.tensors}
    assert sorted(t.name for t in a.tensors) == sorted(tb)  # (llama-quantize orders by layer, then by name)
    for t in a.tensors:
        assert t.tensor_type == tb[t.name].tensor_type, \
            f"{method} {t.name}: ours {t.tensor_type.name}, llama-quantize {tb[t.name].tensor_type.name}"
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)), \
            f"{method} {t.name} ({t.tensor_type.name}): bytes differ"


def test_unknown_method_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'q7_k'.*q4_k_m.*quantized \(= q4_k_m\)"):
        save_pretrained_gguf(torch.nn.Linear(2, 2), tmp_path, None, "q7_k")
    assert resolve_methods(["quantized", "q4_k_m", "not_quantized", "fast_quantized"]) == ["q4_k_m", "f16", "q8_0"]


def test_failed_export_keeps_previous_file(tmp_path, monkeypatch):
    model, tok, (path,) = _export(tmp_path, "qwen2", "q8_0")
    before = path.read_bytes()
    import swiftlora.export.gguf.writer as writer

    def boom(w, qtype):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(writer, "encode_tensor", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        save_pretrained_gguf(model, tmp_path, tok, "q8_0", progress=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", path.name]
