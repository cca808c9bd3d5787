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


def write_official(model, path, projector_type, with_vision, clip_dir=None, bin_format=False):
    path.mkdir(parents=True)
    state = official_state(model, with_vision)
    cfg = {k: getattr(model.llm.config, k) for k in LLAMA_KEYS}
    cfg.update(architectures=["MobileLlamaForCausalLM"], model_type="mobilevlm", bos_token_id=1,
               eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, mm_projector_type=projector_type,
               mm_hidden_size=model.cfg.vision.hidden_size, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", image_aspect_ratio="pad",
               mm_vision_tower=str(clip_dir) if clip_dir else "openai/clip-vit-large-patch14-336",
               mm_vision_num_heads=model.cfg.vision.num_attention_heads)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = sorted(state)
    shards = {"model-00001-of-00002": keys[: len(keys) // 2], "model-00002-of-00002": keys[len(keys) // 2:]}
    index = {}
    for name, ks in shards.items():
        if bin_format:
            torch.save({k: state[k] for k in ks}, path / f"pytorch_{name}.bin")
        else:
            save_file({k: state[k].contiguous() for k in ks}, str(path / f"{name}.safetensors"))
        index.update({k: name for k in ks})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model.tokenizer_dir / f, path / f)  # no tokenizer.json: like the releases
    return state


def _assert_same_model(a, b):
    px = torch.randn(1, 3, 336, 336)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(a.encode_images(px), b.encode_images(px))
        torch.testing.assert_close(a.llm(ids).logits, b.llm(ids).logits)


def test_load_mobilevlm_v2_layout(tmp_path):
    src = load_model("tiny", integrator="ldpv2", **SMALL)
    state = write_official(src, tmp_path / "MobileVLM_V2-tiny", "ldpnetv2", with_vision=True)
    assert "model.mm_projector.mlp.mlp.0.weight" in state
    assert "model.mm_projector.peg.peg.0.weight" in state
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in state)
    m = load_model(tmp_path / "MobileVLM_V2-tiny")
    assert m.cfg.integrator.name == "ldpv2" and m.cfg.preprocess.pad_to_square
    assert m.cfg.vision.num_hidden_layers == src.cfg.vision.num_hidden_layers
    _assert_same_model(src, m)
    ids = m.tokenizer.encode("What colour is the circle?")
    assert ids == src.tokenizer.encode("What colour is the circle?")


def test_load_mobilevlm_v1_layout_with_local_clip(tmp_path):
    src = load_model("tiny", integrator="ldp", **SMALL)
    clip = tmp_path / "clip-local"
    src.vision_tower.vision_tower.save_pretrained(clip)
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
    write_official(src, tmp_path / "v2", "ldpnetv2", with_vision=True)
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
