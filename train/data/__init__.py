"""Training data: the built-in ShapesVQA generator, a LLaVA-format loader and the tokenizer builder.

Tokenizer building needs sentencepiece/transformers; import it from ``edgevlm.train.data.tokenizer``.
"""
from edgevlm.train.data.llava import LlavaDataset, VQARecord, load_llava_records, load_record_image
from edgevlm.train.data.shapes import generate_shapes_vqa, render_scene, shapes_text_corpus

__all__ = [
    "LlavaDataset",
    "VQARecord",
    "generate_shapes_vqa",
    "load_llava_records",
    "load_record_image",
    "render_scene",
    "shapes_text_corpus",
]
