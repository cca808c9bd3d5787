"""Official MobileVLM / MobileVLM V2 checkpoint directories, built here in exactly their layout."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from edgevlm import load_model
from edgevlm.runtime.errors import EdgeVLMError

from conftest import SMALL

LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta")


def official_state(model, with_vision: bool) -> dict[str, torch.Tensor]:
    """edgevlm names -> the names MobileVLM's released checkpoints use."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision_tower."):
            if with_vision:
                out["model." + k] = v.clone()
        elif k.startswith("integrator."):
            out["model.mm_projector." + k[len("integrator."):]] = v.clone()
        elif k.startswith("llm.model."):
            out[k[len("llm."):]] = v.clone()
        elif k.startswith("llm.lm_head."):
            out[k[len("llm."):]] = v.clone()
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these
    return out


def write_official(model, path, projector_type, with_vision, clip_dir=None, bin_format=False, adapter=True):
    """The released layout: config.json, sharded weights with Hugging Face's index file, the
    SentencePiece tokenizer without tokenizer.json, and (``adapter``) a LoRA adapter_model.safetensors
    beside them that must not be read as model weights."""
    path.mkdir(parents=True)
    state = official_state(model, with_vision)
    cfg = {k: getattr(model.llm.config, k) for k in LLAMA_KEYS}
    cfg.update(architectures=["MobileLlamaForCausalLM"], model_type="mobilevlm", bos_token_id=1,
               eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, mm_projector_type=projector_type,
               mm_hidden_size=model.cfg.vision.hidden_size, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", image_aspect_ratio="pad",
               mm_vision_tower=str(clip_dir) if clip_dir else "openai/clip-vit-large-patch14-336")
    (path / "config.json").write_text(json.dumps(cfg))
    keys = sorted(state)
    stem, ext, index_name = (("pytorch_model", "bin", "pytorch_model.bin.index.json") if bin_format
                             else ("model", "safetensors", "model.safetensors.index.json"))
    shards = {f"{stem}-00001-of-00002.{ext}": keys[: len(keys) // 2],
              f"{stem}-00002-of-00002.{ext}": keys[len(keys) // 2:]}
    index = {}
    for name, ks in shards.items():
        if bin_format:
            torch.save({k: state[k] for k in ks}, path / name)
        else:
            save_file({k: state[k].contiguous() for k in ks}, str(path / name))
        index.update({k: name for k in ks})
    (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": index}))
    if adapter:
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
                  str(path / "adapter_model.safetensors"))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model.tokenizer_dir / f, path / f)  # no tokenizer.json: like the releases
    return state


def local_clip(model, path):
    """A local CLIP directory as save_pretrained writes it (config.json + model.safetensors)."""
    model.vision_tower.vision_tower.save_pretrained(path)
    return path


def _assert_same_model(a, b):
    px = torch.randn(1, 3, 336, 336)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(a.encode_images(px), b.encode_images(px))
        torch.testing.assert_close(a.llm(ids).logits, b.llm(ids).logits)


def test_load_mobilevlm_v2_layout(tmp_path):
    """Tower weights inside, an adapter file beside them, and a tower whose head width is 32: the
    head count, activation and epsilon come from the local CLIP config mm_vision_tower names."""
    src = load_model("tiny", integrator="ldpv2", vision__hidden_act="gelu", vision__layer_norm_eps=1e-6, **SMALL)
    assert src.cfg.vision.hidden_size // src.cfg.vision.num_attention_heads != 64
    clip = local_clip(src, tmp_path / "clip-local")
    state = write_official(src, tmp_path / "MobileVLM_V2-tiny", "ldpnetv2", with_vision=True, clip_dir=clip)
    assert "model.mm_projector.mlp.mlp.0.weight" in state
    assert "model.mm_projector.peg.peg.0.weight" in state
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in state)
    m = load_model(tmp_path / "MobileVLM_V2-tiny")
    assert m.cfg.integrator.name == "ldpv2" and m.cfg.preprocess.pad_to_square
    v = m.cfg.vision
    assert (v.num_hidden_layers, v.num_attention_heads, v.hidden_act, v.layer_norm_eps) == (
        src.cfg.vision.num_hidden_layers, src.cfg.vision.num_attention_heads, "gelu", 1e-6)
    _assert_same_model(src, m)
    ids = m.tokenizer.encode("What colour is the circle?")
    assert ids == src.tokenizer.encode("What colour is the circle?")


def test_load_mobilevlm_v1_layout_with_local_clip(tmp_path):
    src = load_model("tiny", integrator="ldp", **SMALL)
    clip = local_clip(src, tmp_path / "clip-local")
    state = write_official(src, tmp_path / "MobileVLM-tiny", "ldpnet", with_vision=False, clip_dir=clip,
                           bin_format=True)
    assert "model.mm_projector.model.mb_block.1.block.0.0.weight" in state
    m = load_model(tmp_path / "MobileVLM-tiny")
    assert m.cfg.integrator.name == "ldp"
    _assert_same_model(src, m)


def test_v1_without_local_clip_says_what_to_do(tmp_path):
    src = load_model("tiny", integrator="ldp", **SMALL)
    write_official(src, tmp_path / "v1", "ldpnet", with_vision=False)
    with pytest.raises(EdgeVLMError, match="mm_vision_tower"):
        load_model(tmp_path / "v1")


def test_official_mismatch_lists_keys(tmp_path):
    src = load_model("tiny", integrator="ldpv2", **SMALL)
    write_official(src, tmp_path / "v2", "ldpnetv2", with_vision=True, clip_dir=local_clip(src, tmp_path / "clip"))
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    cfg["mm_projector_type"] = "ldpnet"  # weights are ldpv2
    (tmp_path / "v2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeVLMError, match=r"missing: integrator\.model\.mlp"):
        load_model(tmp_path / "v2")


def test_unsupported_projector_type(tmp_path):
    src = load_model("tiny", **SMALL)
    write_official(src, tmp_path / "x", "qformer-xl", with_vision=True)
    with pytest.raises(EdgeVLMError, match="ldpnetv2"):
        load_model(tmp_path / "x")


def test_v2_tower_without_a_stated_config_is_refused_unless_clip_l(tmp_path):
    """Without a local CLIP config the head count cannot be read from shapes: refused, except for
    CLIP ViT-L/14's shapes (16 heads of 64), which every released MobileVLM uses."""
    src = load_model("tiny", integrator="ldpv2", **SMALL)
    write_official(src, tmp_path / "v2", "ldpnetv2", with_vision=True)
    with pytest.raises(EdgeVLMError, match="not CLIP ViT-L/14.*mm_vision_tower"):
        load_model(tmp_path / "v2")
    clip_l = dict(vision__hidden_size=1024, vision__intermediate_size=4096, vision__num_attention_heads=16,
                  vision__num_hidden_layers=2, llm__num_hidden_layers=1)
    big = load_model("tiny", integrator="ldpv2", **clip_l)
    write_official(big, tmp_path / "v2-clip-l", "ldpnetv2", with_vision=True)
    m = load_model(tmp_path / "v2-clip-l")
    assert (m.cfg.vision.hidden_size, m.cfg.vision.num_attention_heads) == (1024, 16)
    _assert_same_model(big, m)


def test_weight_files_are_what_hugging_face_reads(tmp_path):
    from edgevlm.model.weights import read_weights, weight_files

    save_file({"a": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(EdgeVLMError, match="adapter_model.safetensors is not model weights"):
        weight_files(tmp_path)
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"] and set(read_weights(tmp_path)) == {"b"}
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": "gone.safetensors"}}))
    with pytest.raises(EdgeVLMError, match="missing: gone.safetensors"):
        weight_files(tmp_path)
