"""ShapesVQA generator and LLaVA-format loader: determinism, schema, balance, and error messages."""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from edgevlm.runtime.chat import IMAGE_TOKEN, VICUNA_SYSTEM
from edgevlm.runtime.errors import EdgeVLMError, ImageError
from edgevlm.train.data.llava import load_llava_records, load_record_image
from edgevlm.train.data.shapes import (
    SPLITS, generate_shapes_vqa, make_item, sample_scene, shapes_text_corpus,
)
from edgevlm.train.data.shapes_questions import (
    ANSWER_SETS, ASKERS, QA_TYPES, TEXT_ALPHABET, caption,
)

N = dict(n_train=30, n_val=12, n_test=36)


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes_a")
    return out, generate_shapes_vqa(str(out), seed=3, progress=False, **N)


def _records(root: Path, name: str) -> list[dict]:
    return json.loads((root / f"{name}.json").read_text())


def _pairs(rec: dict) -> list[tuple[str, str]]:
    conv = rec["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]


# ---------------------------------------------------------------- generator


def test_return_value_and_files(gen):
    root, info = gen
    assert info["counts"] == {"train": 30, "val": 12, "test": 36, "captions": 30}
    for name in (*SPLITS, "captions"):
        assert Path(info["paths"][name]).is_file()
    assert len(list((root / "images").glob("*.png"))) == 30 + 12 + 36
    assert not list(root.glob("*.tmp*"))


def test_deterministic_and_worker_independent(gen, tmp_path):
    root, _ = gen
    generate_shapes_vqa(str(tmp_path / "b"), seed=3, progress=False, workers=2, **N)
    for name in (*SPLITS, "captions"):
        assert (root / f"{name}.json").read_bytes() == (tmp_path / "b" / f"{name}.json").read_bytes()
    for img in ("train_000000", "train_000029", "val_000005", "test_000035"):
        a = (root / "images" / f"{img}.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / f"{img}.png").read_bytes()
    generate_shapes_vqa(str(tmp_path / "c"), seed=4, progress=False, n_train=3, n_val=0, n_test=0)
    assert _records(tmp_path / "c", "train") != _records(root, "train")[:3]


def _check_answer(qtype: str, answer: str) -> None:
    assert answer == answer.lower() and answer.strip() == answer
    if ANSWER_SETS[qtype] is None:  # text: the rendered string
        assert 1 <= len(answer) <= 2 and set(answer) <= set(TEXT_ALPHABET)
    else:
        assert answer in ANSWER_SETS[qtype], (qtype, answer)


@pytest.mark.parametrize("split", SPLITS)
def test_record_schema(gen, split):
    root, _ = gen
    records = _records(root, split)
    assert [r["id"] for r in records] == [f"{split}_{i:06d}" for i in range(len(records))]
    for rec in records:
        assert set(rec) == {"id", "image", "conversations", "qa_meta"}
        assert rec["image"] == f"images/{rec['id']}.png"
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        pairs = _pairs(rec)
        assert len(rec["qa_meta"]) == len(pairs)
        assert (2 <= len(pairs) <= 8) if split == "train" else len(pairs) == 1
        assert pairs[0][0].startswith(IMAGE_TOKEN + "\n")
        assert all(IMAGE_TOKEN not in q for q, _ in pairs[1:])
        assert len({q for q, _ in pairs}) == len(pairs)
        for (q, a), meta in zip(pairs, rec["qa_meta"]):
            assert set(meta) == {"type", "small"} and isinstance(meta["small"], bool)
            assert meta["type"] in QA_TYPES
            assert q.endswith("?")
            _check_answer(meta["type"], a)


def test_test_split_covers_types_equally(gen):
    root, _ = gen
    types = Counter(r["qa_meta"][0]["type"] for r in _records(root, "test"))
    assert types == {t: 36 // len(QA_TYPES) for t in QA_TYPES}


def test_captions(gen):
    root, _ = gen
    caps = _records(root, "captions")
    assert [c["image"] for c in caps] == [r["image"] for r in _records(root, "train")]
    for c in caps:
        assert c["conversations"][0] == {"from": "human", "value": IMAGE_TOKEN + "\n"}
        text = c["conversations"][1]["value"]
        assert text.startswith("a ") and text.endswith(".")
        assert c["qa_meta"][0]["type"] == "caption"


def test_images_are_rgb_png(gen):
    root, _ = gen
    for path in sorted((root / "images").glob("*.png"))[::7]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (336, 336))


def test_image_size_argument(tmp_path):
    generate_shapes_vqa(str(tmp_path), n_train=2, n_val=0, n_test=0, image_size=128, progress=False)
    with Image.open(tmp_path / "images" / "train_000001.png") as im:
        assert im.size == (128, 128)


@pytest.mark.parametrize("kwargs", [dict(n_train=-1), dict(image_size=16), dict(workers=0)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(EdgeVLMError):
        generate_shapes_vqa(str(tmp_path), progress=False, **{**N, **kwargs})


def _answer_stats(n: int = 2500) -> dict[str, Counter]:
    """Answer counts per type over many train items (scenes only, no rendering)."""
    stats: dict[str, Counter] = {t: Counter() for t in QA_TYPES}
    for idx in range(n):
        for _, a, meta in make_item(0, "train", idx)[1]:
            stats[meta["type"]][a] += 1
    return stats


def test_answers_are_balanced():
    stats = _answer_stats()
    for qtype, counts in stats.items():
        total = sum(counts.values())
        assert total > 150, qtype
        if qtype != "text":
            limit = max(0.4, 1 / len(ANSWER_SETS[qtype]) + 0.05)  # majority baseline stays weak
            assert max(counts.values()) / total < limit, (qtype, counts)
            assert set(counts) == set(ANSWER_SETS[qtype]), (qtype, counts)
    yes_no = stats["existence"]
    assert 0.45 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.55
    rel = stats["position"]
    assert 0.4 < rel["yes"] / (rel["yes"] + rel["no"]) < 0.6


def test_questions_are_unambiguous():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 1 <= len(scene.shapes) <= 4
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        for qtype, ask in ASKERS.items():
            qa = ask(scene, rng)
            if qtype == "colour" and qa:  # "the <kind>" names exactly one shape
                kind = qa[0].rstrip("?").split()[-1]
                assert sum(s.kind == kind for s in scene.shapes) == 1
        assert caption(scene).count(" at the ") == len(scene.shapes)


def test_text_corpus():
    corpus = shapes_text_corpus(n=40, seed=0)
    assert corpus == shapes_text_corpus(n=40, seed=0)
    assert corpus != shapes_text_corpus(n=40, seed=1)
    joined = "\n".join(corpus)
    assert VICUNA_SYSTEM in joined and "USER: " in joined and "ASSISTANT: " in joined
    assert IMAGE_TOKEN not in joined and "</s>" not in joined


# ---------------------------------------------------------------- loader


def test_loader_round_trip(gen):
    root, _ = gen
    for split in SPLITS:
        raw = _records(root, split)
        ds = load_llava_records(str(root / f"{split}.json"))
        assert len(ds) == len(raw) and ds.n_skipped == 0
        for rec, r in zip(ds, raw):
            assert rec.id == r["id"] and rec.turns == _pairs(r) and rec.qa_meta == r["qa_meta"]
            assert Path(rec.image_path).is_file()
    im = load_record_image(ds[0])
    assert im.mode == "RGB" and im.size == (336, 336)


def _write(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def _good(rid: str, image: str | None = "img.png") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": "Describe it."},
                                        {"from": "gpt", "value": "A red circle."}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture
def folder(gen, tmp_path) -> Path:
    shutil.copy(gen[0] / "images" / "train_000000.png", tmp_path / "img.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    return tmp_path


def test_loader_llava_conventions(folder):
    ds = load_llava_records(str(_write(folder, [_good("a"), _good("b", image=None)])))
    assert ds[0].turns[0][0] == IMAGE_TOKEN + "\nDescribe it."  # placeholder prepended
    assert ds[1].image_path is None and ds[1].turns[0][0] == "Describe it."  # text-only
    assert ds[0].qa_meta == [{}]
    other = folder / "sub"
    other.mkdir()
    shutil.copy(folder / "img.png", other / "img.png")
    ds = load_llava_records(str(_write(folder, [_good("a")])), image_root=str(other))
    assert ds[0].image_path == str(other / "img.png")


def _bad_records() -> dict[str, dict]:
    odd = _good("odd")
    odd["conversations"].append({"from": "human", "value": "And?"})
    swapped = _good("swapped")
    swapped["conversations"].reverse()
    two_images = _good("two")
    two_images["conversations"][0]["value"] = "<image>\n<image>\nHi"
    return {
        "missing conversations": {"id": "noconv", "image": "img.png"},
        "empty conversations": {**_good("empty"), "conversations": []},
        "odd turns": odd,
        "not alternating": swapped,
        "missing image": _good("noimg", image="nope/missing.png"),
        "image token without image": {**_good("txt", image=None), "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
        "two image tokens": two_images,
        "bad qa_meta": {**_good("meta"), "qa_meta": [{}, {}]},
    }


@pytest.mark.parametrize("case", sorted(_bad_records()))
def test_loader_bad_record_names_file_and_id(folder, case):
    rec = _bad_records()[case]
    path = _write(folder, [_good("fine"), rec])
    with pytest.raises(EdgeVLMError) as err:
        load_llava_records(str(path))
    msg = str(err.value)
    assert str(path) in msg and f"'{rec['id']}'" in msg and "record 1" in msg


def test_loader_record_not_a_dict(folder):
    path = _write(folder, [_good("fine"), ["not", "a", "dict"]])
    with pytest.raises(EdgeVLMError, match=r"record 1 \(no id\).*not a JSON object"):
        load_llava_records(str(path))


@pytest.mark.parametrize("text,match", [
    ('[{"id": "a", "conversations": [}]', r"not valid JSON: .* line 1 column"),
    ('{"id": "a"}', r"top level must be a JSON list"),
])
def test_loader_bad_file(folder, text, match):
    path = _write(folder, text)
    for skip in (False, True):  # never skippable
        with pytest.raises(EdgeVLMError, match=match) as err:
            load_llava_records(str(path), skip_bad_records=skip)
        assert str(path) in str(err.value)


def test_loader_missing_file(tmp_path):
    with pytest.raises(EdgeVLMError, match="not found"):
        load_llava_records(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_undecodable_image_fails_lazily(folder, content):
    if content == "truncated":
        content = (folder / "img.png").read_bytes()[:2000]
    (folder / "bad.png").write_bytes(content)
    ds = load_llava_records(str(_write(folder, [_good("broken", image="bad.png")])))
    with pytest.raises(ImageError) as err:
        load_record_image(ds[0])
    assert str(folder / "bad.png") in str(err.value) and "'broken'" in str(err.value)
    assert isinstance(err.value, EdgeVLMError)


def test_skip_bad_records(folder):
    bad = _bad_records()
    records = [_good("g1"), *bad.values(), "junk", _good("g2", image=None)]
    ds = load_llava_records(str(_write(folder, records)), skip_bad_records=True)
    assert [r.id for r in ds] == ["g1", "g2"]
    assert ds.n_skipped == len(bad) + 1
    assert [rid for rid, _ in ds.skipped] == [r["id"] for r in bad.values()] + [f"#{len(bad) + 1}"]
    assert all(reason for _, reason in ds.skipped)


def _exif_rotated_jpeg(path: Path) -> None:
    """A 40x24 gradient stored sideways: EXIF orientation 6 says "rotate 90 degrees to display"."""
    import numpy as np

    x = np.linspace(0, 255, 40, dtype=np.uint8)
    rgb = np.dstack([np.tile(x, (24, 1)), np.tile(x[:24, None], (1, 40)), np.full((24, 40), 90, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(path, "JPEG", exif=exif.tobytes(), quality=95)


def _png16(path: Path) -> None:
    """A 16-bit greyscale PNG whose values PIL's convert("RGB") would clip to 255."""
    import numpy as np

    Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).save(path)


def test_training_and_runtime_decode_identically(tmp_path, tiny_model):
    """One decoder: a training sample's pixels equal the runtime's for an EXIF-rotated JPEG and a
    16-bit PNG (both upright and scaled, not as stored)."""
    import numpy as np

    from edgevlm.runtime.processor import Processor
    from edgevlm.train.batches import VQADataset

    _exif_rotated_jpeg(tmp_path / "rot.jpg")
    _png16(tmp_path / "deep.png")
    ds = load_llava_records(str(_write(tmp_path, [_good("rot", "rot.jpg"), _good("deep", "deep.png")])))
    assert load_record_image(ds[0]).size == (24, 40)  # upright: the stored 40x24 turned
    with Image.open(tmp_path / "deep.png") as im:
        want = (np.asarray(im).astype(np.int64) >> 8).astype(np.uint8)  # [H, W], not clipped at 255
    assert np.array_equal(np.asarray(load_record_image(ds[1]))[..., 0], want)
    cfg = tiny_model.cfg.preprocess
    processor = Processor.create(tiny_model.tokenizer, "vicuna_v1", cfg)  # what Runtime.pixel_values uses
    train = VQADataset(ds, processor, 1000, tiny_model.n_visual_tokens)
    for i, rec in enumerate(ds):
        device = processor.pixel_values(rec.image_path)  # [1, 3, S, S] float32, from the file
        assert np.array_equal(train[i].pixel_values.numpy(), device[0]), rec.id


def test_corrupt_image_same_error_in_training_and_runtime(folder):
    from edgevlm.runtime.preprocess import load_image

    with pytest.raises(ImageError) as device:
        load_image(folder / "junk.png")
    ds = load_llava_records(str(_write(folder, [_good("bad", image="junk.png")])))
    with pytest.raises(ImageError) as train:
        load_record_image(ds[0])
    assert isinstance(train.value, EdgeVLMError)
    assert str(train.value) == f"{device.value} (record 'bad')"
