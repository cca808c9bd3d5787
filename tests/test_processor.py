"""The one processor (runtime/processor.py): the sequence rules, and every layer building the same
inputs through it (runtime from a manifest, the PyTorch model, training samples)."""
import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.chat import IMAGE_TOKEN_INDEX as IMG
from edgevlm.runtime.processor import (Processor, count_images, expand_at_images, image_question,
                                       spliced_length, split_at_images)


@pytest.mark.parametrize("question, n, want", [
    ("What colour?", 1, "<image>\nWhat colour?"),
    ("What colour?", 2, "<image>\n<image>\nWhat colour?"),
    ("What colour?", 0, "What colour?"),
    ("What <image> colour?", 1, "What <image> colour?"),  # placed by the user: left to the template
    ("", 1, "<image>\n"),
])
def test_image_question(question, n, want):
    assert image_question(question, n) == want


def test_splice_rules():
    ids = [1, 5, IMG, 7, 8, IMG, IMG, 9]
    assert count_images(ids) == 3
    assert split_at_images(ids) == [[1, 5], 0, [7, 8], 1, 2, [9]]
    assert split_at_images([IMG]) == [0] and split_at_images([]) == []
    assert spliced_length(ids, 4) == 5 + 3 * 4
    assert spliced_length(ids, 0) == 5  # integrators that condition the LLM give no visual tokens
    labels = expand_at_images(ids, list("abcdefgh"), 2, "-")
    assert labels == ["a", "b", "-", "-", "d", "e", "-", "-", "-", "-", "h"]
    assert len(labels) == spliced_length(ids, 2)


def test_runtime_model_and_training_share_the_processor(tiny_model, tmp_path):
    """A bundle's Runtime builds its processor from the manifest; the model and training from the
    model config. Same ids, same pixels, and a training sample's prompt is the runtime's prompt."""
    from edgevlm.model.summary import base_manifest
    from edgevlm.runtime.processor import image_pixels
    from edgevlm.train.batches import VQADataset
    from edgevlm.train.data.llava import VQARecord

    manifest = base_manifest(tiny_model, "torch", [], "test")
    runtime = Processor.create(tiny_model.tokenizer, manifest.chat_template, manifest.preprocess)
    model = tiny_model.processor
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    image.save(tmp_path / "red.png")
    for q in ("What colour is the circle?", "How many <image> shapes?"):
        assert runtime.prompt_ids(q, True) == model.prompt_ids(q, True) == tiny_model.prompt_ids(q, True)
        assert count_images(runtime.prompt_ids(q, True)) == 1
    assert count_images(runtime.prompt_ids("What colour is the circle?", False)) == 0
    ids, pixels = runtime(str(tmp_path / "red.png"), "What colour is the circle?")
    assert pixels.shape == (1, 3, manifest.preprocess.image_size, manifest.preprocess.image_size)
    np.testing.assert_array_equal(pixels, tiny_model.preprocess(image).numpy())
    np.testing.assert_array_equal(pixels, image_pixels(image, tiny_model.cfg.preprocess))

    rec = VQARecord(id="r", image_path=str(tmp_path / "red.png"),
                    turns=[(image_question("What colour is the circle?"), "red")])
    sample = VQADataset([rec], model, 10_000, tiny_model.n_visual_tokens)[0]
    assert sample.input_ids.tolist()[: len(ids)] == ids
    np.testing.assert_array_equal(sample.pixel_values.numpy(), pixels[0])
    targets = [t for t, label in zip(sample.input_ids.tolist(), sample.labels.tolist()) if label != -100]
    assert targets == sample.input_ids.tolist()[len(ids):]  # the answer and its EOS
    assert targets[-1] == tiny_model.tokenizer.eos_id


def test_system_prompt_replaces_the_templates(tiny_model):
    p = tiny_model.processor
    default = p.chat_ids([("hi", None)])
    custom = p.chat_ids([("hi", None)], system="Answer in one word.")
    assert custom != default
    tok = tiny_model.tokenizer
    assert tok.decode(custom).startswith("Answer in one word.")
