"""The LLM GGUF: ``llama`` architecture hyperparameters, tensors and the model's own SentencePiece
tokenizer, plus the chat template as Jinja (what llama.cpp's ``--jinja`` / llama-server render).

Written in f16 (vectors f32), the base that ``gguf_quant`` quantises with llama.cpp's quantiser.
Hugging Face Llama checkpoints rotate half-split query/key pairs while llama.cpp's ``llama``
graph rotates adjacent pairs, so q/k rows are permuted per head (as llama.cpp's converter does).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from edgevlm.runtime.chat import ChatTemplate, get_template
from edgevlm.runtime.errors import EdgeVLMError

from .gguf_io import to_numpy, write_gguf


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """[n_head * head_dim, in] rows from half-split (HF) to interleaved (llama.cpp) rotary pairs."""
    out_dim = w.shape[0]
    half = out_dim // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llm_tensors(llm, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """(gguf name, array) for a HF LlamaForCausalLM; matrices f16, norms f32."""
    m = llm.model
    f16 = lambda t: to_numpy(t).astype(np.float16)  # noqa: E731
    f32 = lambda t: to_numpy(t).astype(np.float32)  # noqa: E731
    yield "token_embd.weight", f16(m.embed_tokens.weight)  # [V, D]
    for i, layer in enumerate(m.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"blk.{i}"
        yield f"{p}.attn_norm.weight", f32(layer.input_layernorm.weight)
        yield f"{p}.attn_q.weight", rope_permute(f16(a.q_proj.weight), cfg.num_attention_heads)
        yield f"{p}.attn_k.weight", rope_permute(f16(a.k_proj.weight), cfg.num_key_value_heads)
        yield f"{p}.attn_v.weight", f16(a.v_proj.weight)
        yield f"{p}.attn_output.weight", f16(a.o_proj.weight)
        yield f"{p}.ffn_norm.weight", f32(layer.post_attention_layernorm.weight)
        yield f"{p}.ffn_gate.weight", f16(mlp.gate_proj.weight)
        yield f"{p}.ffn_up.weight", f16(mlp.up_proj.weight)
        yield f"{p}.ffn_down.weight", f16(mlp.down_proj.weight)
    yield "output_norm.weight", f32(m.norm.weight)
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        yield "output.weight", f16(llm.lm_head.weight)


# --- tokenizer ----------------------------------------------------------------------------------


def sentencepiece_vocab(tokenizer_dir: str | Path, vocab_size: int):
    """(tokens, scores, token types, add_dummy_prefix) from ``tokenizer.model``; padded with
    UNUSED pieces up to the LLM's ``vocab_size``."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(tokenizer_dir) / "tokenizer.model"
    if not path.is_file():
        raise EdgeVLMError(f"{tokenizer_dir}: no tokenizer.model (GGUF export needs the "
                           "SentencePiece model of a Llama tokenizer)")
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise EdgeVLMError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} "
                           "is not BPE/unigram")
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's numbering == gguf.TokenType
    if len(tokens) > vocab_size:
        raise EdgeVLMError(f"{path}: {len(tokens)} pieces but the LLM has only {vocab_size} "
                           "embedding rows")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def add_tokenizer(w, model) -> None:
    cfg = model.cfg
    tokens, scores, types, space_prefix = sentencepiece_vocab(model.tokenizer_dir, cfg.llm.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.tokens.bos_id)
    w.add_eos_token_id(cfg.tokens.eos_id)
    w.add_unk_token_id(cfg.tokens.unk_id)
    w.add_pad_token_id(cfg.tokens.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(space_prefix)
    w.add_chat_template(chat_template_jinja(get_template(cfg.chat_template)))


def chat_template_jinja(t: ChatTemplate) -> str:
    """Jinja that renders ``messages`` exactly as ``ChatTemplate.render`` does (BOS is added by the
    tokenizer, ``add_bos_token``); a leading system message replaces the default system prompt.

    Without ``--jinja`` (llama-mtmd-cli's default) llama.cpp does not run this text: it picks a
    built-in template by substrings of it (``llm_chat_detect_template``), "USER: " and
    "ASSISTANT: " meaning its "vicuna". So the assistant header is one literal only for a template
    that built-in renders byte for byte (``t.llama_cpp``); any other keeps it split, and llama.cpp
    asks for ``--jinja`` instead of silently using another format.
    """
    q = json.dumps  # a valid Jinja string literal for these ASCII texts
    header = q(t.assistant + t.answer_prefix) if t.llama_cpp else f"{q(t.assistant)} + {q(t.answer_prefix)}"
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {q(t.system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        f"{{%- if system -%}}{{{{ system + {q(t.system_end)} }}}}{{%- endif -%}}"
        "{%- for m in turns -%}"
        f"{{%- if m['role'] == 'user' -%}}{{{{ {q(t.user)} + m['content'] + {q(t.user_end)} }}}}"
        f"{{%- elif m['role'] == 'assistant' -%}}{{{{ {header} + m['content'] + eos_token + {q(t.turn_end)} }}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(t.assistant)} }}}}{{%- endif -%}}"
    )


# --- the file -----------------------------------------------------------------------------------


def add_hparams(w, model) -> None:
    import gguf

    cfg, c = model.cfg, model.cfg.llm
    w.add_name(f"{cfg.preset or 'edgevlm'} LLM")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)


def write_llm(model, path) -> dict:
    """Write the f16 LLM GGUF at ``path``; returns a summary for the manifest."""
    c = model.cfg.llm
    if c.hidden_size % c.num_attention_heads or (c.hidden_size // c.num_attention_heads) % 2:
        raise EdgeVLMError(f"llm head size {c.hidden_size}/{c.num_attention_heads} must be an "
                           "even integer for rotary embeddings")

    def metadata(w) -> None:
        add_hparams(w, model)
        add_tokenizer(w, model)

    n = write_gguf(path, "llama", metadata, llm_tensors(model.llm, c))
    return {"n_tensors": n, "embedding_length": c.hidden_size}
