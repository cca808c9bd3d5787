"""Independent-QA packing (train/packing.py): each packed question is trained exactly as if it
were asked alone, as the runtime asks it."""
import pytest
import torch

from conftest import SMALL
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.processor import image_question
from edgevlm.train.batches import VQADataset, collate
from edgevlm.train.data.llava import load_llava_records
from edgevlm.train.packing import pack_independent


@pytest.fixture(scope="module")
def model():
    from edgevlm import load_model

    torch.manual_seed(0)
    return load_model("tiny", **SMALL).eval()


@pytest.fixture(scope="module")
def records(shapes_dir):
    recs = [r for r in load_llava_records(str(shapes_dir / "train.json")).records if len(r.turns) >= 5]
    return recs[:2]


def _single(model, question, answer):
    # model.processor: the default template for new models; packing is template-agnostic
    return model.processor.training_ids([(image_question(question), answer)])


def test_every_segment_is_the_runtime_single_turn_prompt(model, records):
    rec = records[0]
    ids, target, segs = pack_independent(model.processor, rec.turns, model.n_visual_tokens, 10_000)
    prefix = [t for t, s in zip(ids, segs) if s == 0]
    assert max(segs) == len(rec.turns)
    for k, (q, a) in enumerate(rec.turns, start=1):
        seg = [t for t, s in zip(ids, segs) if s == k]
        assert prefix + seg == _single(model, q, a)[0]
        # the prompt part is what generation feeds the model for this question
        prompt = model.prompt_ids(q.replace("<image>", "").strip(), with_image=True)
        assert (prefix + seg)[: len(prompt)] == prompt
    assert not any(t for t, s in zip(target, segs) if s == 0)


def test_packed_loss_equals_separate_single_turn_losses(model, records):
    ds = VQADataset(records, model.processor, 1000, model.n_visual_tokens, qa_mode="independent")
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        packed = model(batch["pixel_values"], batch["input_ids"], batch["labels"], batch["segments"]).loss
        total, n = 0.0, 0
        for rec, px in zip(records, batch["pixel_values"]):
            for q, a in rec.turns:
                ids, tgt = _single(model, q, a)
                labels = [t if m else -100 for t, m in zip(ids, tgt)]
                loss = model(px[None], [torch.tensor(ids)], [torch.tensor(labels)]).loss
                total += loss.item() * sum(tgt)
                n += sum(tgt)
    assert packed.item() == pytest.approx(total / n, rel=1e-5)


def test_segments_do_not_see_each_other(model, records):
    """Changing question 1's tokens leaves the logits of question 2 unchanged."""
    ds = VQADataset(records[:1], model.processor, 1000, model.n_visual_tokens, qa_mode="independent")
    s = ds[0]
    other = s.input_ids.clone()
    seg1 = (s.segments == 1).nonzero().flatten()
    other[seg1[1:-1]] = 5  # any other token id
    px = s.pixel_values[None]
    with torch.no_grad():
        a = model(px, [s.input_ids], None, [s.segments]).logits[0]
        b = model(px, [other], None, [s.segments]).logits[0]
    shift = model.n_visual_tokens - 1
    seg2 = (s.segments == 2).nonzero().flatten() + shift
    torch.testing.assert_close(a[seg2], b[seg2])
    assert not torch.allclose(a[seg1[-1] + shift], b[seg1[-1] + shift])


def test_long_records_drop_whole_questions(model, records):
    rec = records[0]
    full = pack_independent(model.processor, rec.turns, model.n_visual_tokens, 10_000)
    cut = len(full[0]) + model.n_visual_tokens - 1 - 3  # three positions short of the full pack
    ids, target, segs = pack_independent(model.processor, rec.turns, model.n_visual_tokens, cut)
    assert max(segs) == len(rec.turns) - 1
    assert ids == full[0][: len(ids)]
    assert len(ids) + model.n_visual_tokens - 1 <= cut


def test_single_turn_records_are_not_packed(model, records):
    assert pack_independent(model.processor, records[0].turns[:1], model.n_visual_tokens, 1000) is None


def test_recipe_rejects_unknown_qa_mode(tmp_path):
    from edgevlm.train.recipe import StageConfig, TrainConfig, validate

    cfg = TrainConfig(stages=[StageConfig(data="x.json", qa_mode="shuffled")])
    with pytest.raises(EdgeVLMError, match="qa_mode 'shuffled'"):
        validate(cfg)
