"""GGUF export (export/to_gguf.py and its libraries) and the torch-free GGUF checks
(runtime/gguf_check.py): file layout, metadata llama.cpp reads, tokenizer and chat template,
quantisation, refusals. Files are loaded by real llama.cpp through llama-cpp-python."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'edgevlm[export]')")
pytest.importorskip("llama_cpp", reason="GGUF tests need llama-cpp-python (pip install 'edgevlm[export]')")

from conftest import REPO  # noqa: E402

from edgevlm.runtime.errors import BundleError, EdgeVLMError  # noqa: E402

ALL_QUANTS = ["f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"]


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    from edgevlm.export.to_gguf import export_gguf

    return export_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "b", ALL_QUANTS, progress=False)


def _fields(path):
    from edgevlm.runtime.gguf_check import read_gguf

    return read_gguf(path)


# --- bundle and manifest --------------------------------------------------------------------------


def test_bundle_manifest_lists_every_file_with_hashes(bundle):
    from edgevlm.runtime.manifest import read_manifest

    m = read_manifest(bundle)  # verifies sizes and sha256
    info = m.target_info
    assert m.target == "gguf" and type(info).__name__ == "GgufInfo"
    assert info.quant_types == ALL_QUANTS and info.default_quant == "f16"
    assert sorted(f.path for f in m.files_with_role("llm")) == sorted(info.llm.values())
    assert m.file("mmproj").path == info.mmproj == "mmproj-f16.gguf"
    assert m.file("tokenizer").path == "tokenizer.json"
    assert set(info.llama_cpp) == {"llama_cpp_python", "llama_cpp"}
    assert info.projector_type == "ldpv2" and info.mm_embd == m.model.hidden_size
    assert set(info.tensor_types) == set(ALL_QUANTS) and info.llama_cpp_usage.cli.startswith("llama-mtmd-cli")
    assert set(info.token_check) == set(ALL_QUANTS)  # the token check ran for every quant type
    assert not list(bundle.parent.glob(".*partial*"))  # staged in a temp dir, renamed


def test_mmproj_has_the_tensors_and_keys_llama_cpp_reads(bundle, tiny_model):
    info = _fields(bundle / "mmproj-f16.gguf")
    v, n = tiny_model.cfg.vision, tiny_model.vision_tower.layers_used
    assert info.arch == "clip" and info.get("clip.projector_type") == "ldpv2"
    assert info.get("clip.has_vision_encoder") and info.get("clip.has_llava_projector")
    assert info.get("clip.vision.block_count") == n == v.num_hidden_layers - 1
    assert info.get("clip.use_gelu") is False  # CLIP's quick_gelu
    assert info.get("clip.vision.image_size") == 336 and info.get("clip.vision.patch_size") == 14
    blocks = {f"v.blk.{i}.{t}.{p}" for i in range(n) for p in ("weight", "bias")
              for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")}
    proj = {f"mm.model.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    proj |= {"mm.model.peg.0.weight", "mm.model.peg.0.bias"}
    stem = {"v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias"}
    assert set(info.tensors) == blocks | proj | stem  # no post_ln, no class_embd ("omit")
    assert info.tensors["v.position_embd.weight"] == (v.hidden_size, v.num_patches)
    assert info.tensors["mm.model.peg.0.weight"] == (3, 3, tiny_model.cfg.llm.hidden_size)


def test_mmproj_feature_layer_is_the_torch_select_layer(bundle, tiny_model):
    """llama.cpp's llava graph runs max(feature_layer) blocks when the key is set (else
    block_count - 1): the key is what makes it run the blocks the torch tower runs."""
    from gguf import GGUFReader

    field = GGUFReader(str(bundle / "mmproj-f16.gguf")).fields["clip.vision.feature_layer"]
    assert [int(x) for x in field.contents()] == [tiny_model.vision_tower.layers_used]


def test_llm_metadata_and_tensor_names(bundle, tiny_model):
    c = tiny_model.cfg.llm
    info = _fields(bundle / "llm-f16.gguf")
    assert info.arch == "llama"
    assert info.get("llama.embedding_length") == c.hidden_size
    assert info.get("llama.block_count") == c.num_hidden_layers
    assert info.get("llama.attention.head_count_kv") == c.num_key_value_heads
    assert info.get("tokenizer.ggml.model") == "llama"
    assert info.get("tokenizer.ggml.bos_token_id") == 1 and info.get("tokenizer.ggml.eos_token_id") == 2
    assert info.get("tokenizer.ggml.add_bos_token") is True
    names = set(info.tensors)
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight"} <= names
    assert len(names) == 3 + 9 * c.num_hidden_layers


def test_token_types_come_from_the_sentencepiece_model(bundle):
    from gguf import GGUFReader, TokenType

    r = GGUFReader(str(bundle / "llm-f16.gguf"))
    types = [int(x) for x in r.fields["tokenizer.ggml.token_type"].contents()]
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert types[0] == TokenType.UNKNOWN and types[1] == types[2] == TokenType.CONTROL
    assert tokens[3] == "<0x00>" and types[3] == TokenType.BYTE
    unused = [i for i, t in enumerate(tokens) if t.startswith("<unused")]
    assert unused and all(types[i] == TokenType.USER_DEFINED for i in unused)


def test_llama_cpp_tokenizes_like_sentencepiece_and_the_runtime(bundle, tiny_model):
    """llama.cpp == the SentencePiece model for every text; == the runtime's tokenizer.json except
    for text that starts with a space (SentencePiece adds its dummy-prefix "▁" there, the HF fast
    tokenizer does not; the llamacpp backend takes ids from the runtime tokenizer)."""
    spm = pytest.importorskip("sentencepiece")
    from llama_cpp import Llama

    llm = Llama(str(bundle / "llm-q4_0.gguf"), vocab_only=True, verbose=False)
    sp = spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    tok = tiny_model.tokenizer
    for text in ["What colour is the circle?", "two\nshapes 1234", "naïve ☃ 東京",
                 "USER: ok", "\nWhat is left of it? ASSISTANT:", " ASSISTANT: red"]:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == sp.encode(text), text
        if not text.startswith(" "):
            assert ids == tok.encode(text), text
        assert llm.detokenize(ids).decode().lstrip() == tok.decode(ids).lstrip()  # dummy prefix
    assert llm.tokenize(b"hi", add_bos=True, special=False)[0] == 1


TURNS = [("<image>\nWhat colour is it?", "red"), ("How many?", None)]


def _messages(t, turns, system: str | None = None) -> list[dict]:
    """OpenAI-style messages as llama.cpp's tools build them (image placeholder where the template
    puts it: llama-mtmd-cli and llama-server put their marker before the question)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        msgs.append({"role": "user", "content": t.question_text(q)})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def _llama_cpp_builtin(template: str, messages: list[dict]) -> str | None:
    """What llama.cpp renders without --jinja (llama_chat_apply_template detects a built-in
    template from the GGUF's Jinja text); None where it refuses the template."""
    import ctypes

    import llama_cpp

    raw = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(raw))(*[llama_cpp.llama_chat_message(r, c) for r, c in raw])
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(raw), True, buf, len(buf))
    return None if n < 0 else buf.raw[:n].decode()


@pytest.mark.parametrize("name", ["vicuna_v1", "llamacpp_vicuna", "plain"])
def test_chat_template_renders_like_runtime_chat(name):
    jinja2 = pytest.importorskip("jinja2")
    from edgevlm.export.gguf_llm import chat_template_jinja
    from edgevlm.runtime.chat import TEMPLATES

    t = TEMPLATES[name]
    jinja = jinja2.Environment().from_string(chat_template_jinja(t))
    out = jinja.render(messages=_messages(t, TURNS), eos_token="</s>", add_generation_prompt=True)
    assert out == t.render(TURNS)
    sys_out = jinja.render(messages=_messages(t, TURNS[:1], "Be brief."), eos_token="</s>", add_generation_prompt=False)
    assert sys_out == replace(t, system="Be brief.").render(TURNS[:1])


def test_vicuna_v1_system_prompt_and_image_placement():
    from edgevlm.runtime.chat import TEMPLATES, VICUNA_SYSTEM

    t = TEMPLATES["vicuna_v1"]
    assert t.render([("What colour is it? <image>", None)]) == \
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT:"
    assert TEMPLATES["llamacpp_vicuna"].render(TURNS) == \
        "USER: <image>What colour is it?\nASSISTANT: red</s>\nUSER: How many?\nASSISTANT:"


@pytest.mark.parametrize("name", ["vicuna_v1", "llamacpp_vicuna", "plain"])
def test_llama_cpp_without_jinja_renders_the_template_or_refuses_it(name):
    """llama-mtmd-cli's default (no --jinja): llama.cpp's built-in twin renders byte for byte what the
    runtime tokenises, a system message included; a template without a twin is refused (llama.cpp
    then says to use --jinja) instead of being prompted in another format."""
    from edgevlm.export.gguf_llm import chat_template_jinja
    from edgevlm.runtime.chat import TEMPLATES

    t = TEMPLATES[name]
    jinja = chat_template_jinja(t)
    if not t.llama_cpp:
        assert _llama_cpp_builtin(jinja, _messages(t, TURNS)) is None
        return
    assert _llama_cpp_builtin(jinja, _messages(t, TURNS)) == t.render(TURNS)
    assert _llama_cpp_builtin(t.llama_cpp, _messages(t, TURNS)) == t.render(TURNS)  # the twin by name
    assert (_llama_cpp_builtin(jinja, _messages(t, TURNS, "Be brief.")) ==
            replace(t, system="Be brief.").render(TURNS))


def test_runtime_prompt_ids_are_llama_cpps_tokens_of_the_builtin_rendering(bundle, tiny_model):
    """llama-mtmd-cli's prompt, tokenised as mtmd does (BOS, then each text piece between media markers
    on its own, special tokens parsed), is the runtime's prompt ids with the image where the marker is."""
    from llama_cpp import Llama

    from edgevlm.runtime.chat import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from edgevlm.runtime.manifest import read_manifest
    from edgevlm.runtime.processor import Processor
    from edgevlm.runtime.tokenizer import TextTokenizer

    m = read_manifest(bundle, verify=False)
    t = m.chat_template  # the template's pieces, stored in the manifest
    assert t.llama_cpp, "new models default to a template llama.cpp renders without --jinja"
    llm = Llama(str(bundle / "llm-f16.gguf"), vocab_only=True, verbose=False)
    tok = TextTokenizer.from_dir(bundle)
    template = llm.metadata["tokenizer.chat_template"]
    for turns in ([("What colour is the circle?", None)], [("Is there a red square?", "no"), ("How many?", None)]):
        turns = [(f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1]), *turns[1:]]
        text = _llama_cpp_builtin(template, _messages(t, turns))
        pieces = text.split(IMAGE_TOKEN)
        want = [m.tokens.bos_id]
        for i, piece in enumerate(pieces):
            want += ([IMAGE_TOKEN_INDEX] if i else []) + llm.tokenize(piece.encode(), add_bos=False, special=True)
        assert Processor.create(tok, t, m.preprocess).chat_ids(turns) == want, text


# --- quantisation ---------------------------------------------------------------------------------


def test_every_quant_type_is_written_and_loads(bundle):
    from llama_cpp import Llama

    from edgevlm.export.gguf_quant import tensor_types

    sizes = {q: (bundle / f"llm-{q}.gguf").stat().st_size for q in ALL_QUANTS}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    assert "Q4_K" in tensor_types(bundle / "llm-q4_k_m.gguf")
    for q in ALL_QUANTS:
        llm = Llama(str(bundle / f"llm-{q}.gguf"), n_ctx=64, n_threads=1, verbose=False)
        assert len(llm.tokenize(b"a red circle")) > 1
        llm.close()


def test_every_llm_matrix_is_quantised(bundle):
    """Rows must be a multiple of 32 (q4_0/q8_0) or 256 (k-quants) to quantise; the tiny preset's
    widths (256, 768) are, so no 2-D LLM weight is left in f16 (llama.cpp would silently keep it)."""
    from gguf import GGUFReader

    for q in ("q8_0", "q4_k_m", "q4_0"):
        for t in GGUFReader(str(bundle / f"llm-{q}.gguf")).tensors:
            if len(t.shape) == 2:
                assert int(t.shape[0]) % 256 == 0, t.name
                assert t.tensor_type.name not in ("F16", "F32"), (q, t.name)


# --- refusals -------------------------------------------------------------------------------------


def test_integrators_llama_cpp_cannot_run_are_refused_with_the_capable_list():
    from types import SimpleNamespace

    from edgevlm.export.gguf_mmproj import gguf_projectors, projector_type
    from edgevlm.model.config import preset_config

    assert {"linear": "mlp", "mlp2x_gelu": "mlp", "ldp": "ldp", "ldpv2": "ldpv2"}.items() <= gguf_projectors().items()
    with pytest.raises(EdgeVLMError, match=r"'c_abstractor' cannot run in llama.cpp.*ldpv2"):
        projector_type(SimpleNamespace(cfg=preset_config("tiny", integrator="c_abstractor")))
    for name in ("ldp", "ldpv2"):
        small = SimpleNamespace(cfg=preset_config("tiny", integrator=name, vision__image_size=224))
        with pytest.raises(EdgeVLMError, match="16x16 patch grid.*hard-codes 24x24"):
            projector_type(small)
    wide = SimpleNamespace(cfg=preset_config("tiny", integrator="mlp2x_gelu", vision__image_size=224))
    assert projector_type(wide) == "mlp"  # the mlp graph has no fixed grid
    cls = SimpleNamespace(cfg=preset_config("tiny", vision__select_feature="cls_patch"))
    with pytest.raises(EdgeVLMError, match="CLS"):
        projector_type(cls)


def test_refused_export_writes_nothing(tmp_path):
    from types import SimpleNamespace

    from edgevlm.export.to_gguf import export_gguf
    from edgevlm.model.config import preset_config

    refused = SimpleNamespace(cfg=preset_config("tiny", integrator="c_abstractor"))
    with pytest.raises(EdgeVLMError, match="'c_abstractor' cannot be exported to gguf: llama.cpp has no C-Abstractor projector"):
        export_gguf(refused, tmp_path / "out", ["q4_0"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_quant_type_is_refused():
    from edgevlm.export.gguf_quant import check_quant_types

    assert check_quant_types(["Q4_K_M", "f16", "q4_k_m"]) == ["q4_k_m", "f16"]
    with pytest.raises(EdgeVLMError, match="unknown quant type 'q3_k'.*q4_k_m"):
        check_quant_types(["q3_k"])


def test_truncated_and_foreign_files_are_refused(bundle, tmp_path):
    from edgevlm.runtime.gguf_check import check_llm, check_mmproj

    data = (bundle / "llm-q4_0.gguf").read_bytes()
    for n in (3, 200, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(BundleError, match="truncated|corrupt|not a GGUF"):
            check_llm(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x89PNG\r\n" + bytes(100))
    with pytest.raises(BundleError, match="not a GGUF file"):
        check_llm(junk)
    with pytest.raises(BundleError, match="architecture is 'clip', expected 'llama'"):
        check_llm(bundle / "mmproj-f16.gguf")
    with pytest.raises(BundleError, match="architecture is 'llama', expected 'clip'"):
        check_mmproj(bundle / "llm-f16.gguf")


def test_cli_exports_a_preset_and_refuses_bad_quant(tmp_path):
    script = str(REPO / "export" / "to_gguf.py")
    bad = subprocess.run([sys.executable, script, "--model", "tiny", "--out", str(tmp_path / "x"),
                          "--quant", "q3_k"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown quant type" in bad.stderr
    assert not (tmp_path / "x").exists()
    ok = subprocess.run([sys.executable, script, "--model", "tiny", "--out", str(tmp_path / "b"),
                         "--quant", "q4_0"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "llm-q4_0.gguf" in ok.stdout and (tmp_path / "b" / "manifest.json").is_file()
