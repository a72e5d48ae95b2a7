"""Writing a merged Llama-family model as one GGUF file (llama.cpp, Ollama, LM Studio), with the `gguf`
package (the GGUF reader/writer maintained beside llama.cpp; llama.cpp itself is not needed).

    write_gguf(model, tokenizer, "out/model-q8_0.gguf", quantization="q8_0")

What goes in: the `llama` architecture's hyper-parameters, the byte-level BPE tokenizer (tokens, their
types, merges, special ids, the chat template) and every tensor under its GGUF name. Two layout facts:

- GGUF's Llama graph applies rotary embeddings to *adjacent* pairs of a head's dimensions, while
  transformers' Llama rotates the two *halves* of the head against each other. The query and key
  projections are therefore reordered row-wise per head (half-split -> interleaved) as they are written;
  readers of GGUF Llama files (llama.cpp, transformers' GGUF loader) expect exactly that.
- 1-D tensors (norm weights) stay float32; matrices take the chosen type. Block quantisations need
  rows whose length is a multiple of 32, which every Llama size satisfies.

Types offered (the ones the gguf package can quantise itself): f32, f16, bf16, q8_0, q5_1, q5_0, q4_1,
q4_0. k-quants (q4_k_m ...) need llama.cpp's `llama-quantize`, which can take our f16 file as input.

Supported: models whose config is LlamaForCausalLM (Llama 2/3, SmolLM, TinyLlama, Mistral-style without
sliding windows) with a byte-level BPE tokenizer (`tokenizer.json`). Anything else is refused with the
reason before any file is written. No Ray here.
"""

from __future__ import annotations

import json
import os

import numpy as np

from raytune_app.export.merge import ExportError

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by this name; names of the
# tokenizers we can recognise from the model's files, else "default" (see `_pre_tokenizer`).
KNOWN_PRE_TOKENIZERS = {"smollm": "smollm", "llama-3": "llama-bpe", "qwen2": "qwen2"}


def _gguf():
    import gguf

    return gguf


def _check_supported(model, tokenizer) -> dict:
    config = model.config
    if config.model_type not in ("llama", "mistral") or getattr(config, "sliding_window", None):
        raise ExportError(
            f"GGUF export writes Llama-family models; this one is {config.model_type!r} "
            f"({config.architectures}). Export --format merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if spec is None or spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (tokenizer.json with a BPE model and a ByteLevel "
            "pre-tokenizer); this model's tokenizer is not one. Export --format merged and convert with llama.cpp"
        )
    return spec


def _rotary_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query / key projection reordered per head from halves [a0..a(d/2-1), b0..b(d/2-1)]
    to pairs [a0, b0, a1, b1, ...] (see the module docstring)."""
    rows, cols = weight.shape
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _pre_tokenizer(tokenizer) -> str:
    hint = (getattr(tokenizer, "name_or_path", "") or "").lower()
    for marker, name in KNOWN_PRE_TOKENIZERS.items():
        if marker in hint:
            return name
    return "default"


def _tokenizer_fields(writer, tokenizer, spec: dict) -> str:
    """Tokens, types, merges, special ids, chat template; returns the pre-tokenizer name written."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.NORMAL
    for added in tokenizer.added_tokens_decoder.values():
        index = vocab[added.content]
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = spec["model"]["merges"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in merges]
    pre = _pre_tokenizer(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setter(value)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def write_gguf(model, tokenizer, path: str, quantization: str = "f16", name: str = "raytune-app export") -> dict:
    """Write `model` (a dense LlamaForCausalLM, e.g. from `merged_model`) to `path`; returns what was written."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    spec = _check_supported(model, tokenizer)
    gguf = _gguf()
    config = model.config
    arch = gguf.MODEL_ARCH.LLAMA
    layers = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = gguf.GGMLQuantizationType[quantization.upper()]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quantization]

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    pre = _tokenizer_fields(writer, tokenizer, spec)

    names = gguf.get_tensor_name_map(arch, layers)
    written = 0
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the output layer reads the token embeddings (as the model itself does)
        if "rotary_emb" in hf_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; this model has layers GGUF Llama does not know")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _rotary_interleave(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _rotary_interleave(data, kv_heads)
        if data.ndim == 1 or quantization == "f32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif quantization == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)  # a killed export never leaves a file that looks complete
    return {
        "file": path,
        "quantization": quantization,
        "tensors": written,
        "pre_tokenizer": pre,
        "bytes": os.path.getsize(path),
    }
