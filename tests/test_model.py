"""The torch model: vision features, splicing, KV-cache generation, save/load, presets."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgevlm import load_model
from edgevlm.runtime.errors import EdgeVLMError, ImageError
from edgevlm.runtime.preprocess import preprocess_image
from edgevlm.model.checkpoint import save_model

from conftest import SMALL


def test_vision_features_are_hidden_state_minus_2_without_cls(tiny_model):
    px = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ours = tiny_model.vision_tower(px)
        hf = tiny_model.vision_tower.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == (2, 576, tiny_model.cfg.vision.hidden_size)
    torch.testing.assert_close(ours, hf)


def test_encode_images_shape(tiny_model):
    with torch.no_grad():
        out = tiny_model.encode_images(torch.randn(3, 3, 336, 336))
    assert out.shape == (3, tiny_model.n_visual_tokens, tiny_model.cfg.llm.hidden_size)


def test_preprocess_is_the_runtime_function(tiny_model):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 301, 3), dtype=np.uint8))
    px = tiny_model.preprocess(img)
    assert px.shape == (1, 3, 336, 336)
    np.testing.assert_array_equal(px.numpy(), preprocess_image(img, tiny_model.cfg.preprocess))


def test_bad_image_is_a_clear_error(tiny_model, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="x.png"):
        tiny_model.preprocess(str(bad))


def _greedy_without_cache(model, ids, pixels, n):
    """Reference: recompute the whole sequence every step (no KV cache)."""
    with torch.no_grad():
        img = model.encode_images(torch.from_numpy(pixels))
        seq = torch.tensor(ids)
        out = []
        for _ in range(n):
            emb = model.embed_with_images(seq, img)[None]
            nxt = int(model.llm(inputs_embeds=emb).logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    return out


def test_kv_cache_generation_equals_recompute(tiny_model):
    img = Image.new("RGB", (336, 336), (200, 30, 30))
    r = tiny_model.generate(image=img, prompt="What colour is the circle?", max_new_tokens=6, ignore_eos=True)
    ids = tiny_model.prompt_ids("What colour is the circle?", with_image=True)
    ref = _greedy_without_cache(tiny_model, ids, tiny_model.preprocess(img).numpy(), 6)
    assert r.token_ids == ref
    assert r.timings.n_visual_tokens == tiny_model.n_visual_tokens
    assert r.timings.n_generated == 6


def test_stream_pieces_join_to_text(tiny_model):
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    s = tiny_model.stream(image=img, prompt="Is there a circle?", max_new_tokens=8, ignore_eos=True)
    pieces = list(s)
    assert "".join(pieces) == s.result.text
    assert s.result.text == tiny_model.generate(image=img, prompt="Is there a circle?", max_new_tokens=8,
                                                ignore_eos=True).text


def test_sampling_is_seeded(tiny_model):
    kw = dict(image=Image.new("RGB", (64, 64)), prompt="hi", max_new_tokens=8, do_sample=True,
              temperature=1.5, top_k=50, ignore_eos=True)
    a = tiny_model.generate(seed=1, **kw).token_ids
    assert a == tiny_model.generate(seed=1, **kw).token_ids


def test_save_load_round_trip(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".m.*"))
    loaded = load_model(out)
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    px = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.encode_images(px), loaded.encode_images(px))


def test_mismatched_weights_list_the_keys(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "m")
    with pytest.raises(EdgeVLMError, match="missing: .*llm.model.layers.2") as e:
        load_model(out, llm__num_hidden_layers=3)
    assert "weights do not match" in str(e.value)
    with pytest.raises(EdgeVLMError, match="shape mismatch"):
        load_model(out, llm__intermediate_size=100)


def test_truncated_weights_file_is_a_clear_error(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "m")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeVLMError, match="model.safetensors"):
        load_model(out)


def test_unknown_preset_lists_presets():
    with pytest.raises(EdgeVLMError, match="mobilevlm-1.7b"):
        load_model("no-such-preset")


def test_preset_override_integrator():
    m = load_model("tiny", integrator="mlp2x_gelu", **SMALL)
    assert m.cfg.integrator.name == "mlp2x_gelu" and m.n_visual_tokens == 576


def _fingerprint(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    h.update((model.tokenizer_dir / "tokenizer.json").read_bytes())
    return h.hexdigest()


def test_preset_random_init_is_deterministic_across_processes(tiny_model):
    code = ("from edgevlm import load_model; import sys; sys.path.insert(0, 'tests'); "
            "from test_model import _fingerprint; from conftest import SMALL; "
            "print(_fingerprint(load_model('tiny', **SMALL)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("conftest").REPO))
    assert out.stdout.strip().splitlines()[-1] == _fingerprint(tiny_model)


def test_no_pickle_loading_in_source():
    """Every torch.load in the project passes weights_only=True; nothing writes .bin pickles."""
    from conftest import REPO

    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or path.name.startswith("test_"):
            continue
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "torch.save(" not in line, f"{path}: {line.strip()}"
