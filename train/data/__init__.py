"""Training data: the built-in ShapesVQA generator, a LLaVA-format loader and the tokenizer builder.

Importing this package is light: sentencepiece and transformers load only when a tokenizer is built.
"""
from edgevlm.train.data.llava import LlavaDataset, VQARecord, load_llava_records, load_record_image
from edgevlm.train.data.shapes import generate_shapes_vqa, render_scene, shapes_text_corpus
from edgevlm.train.data.tokenizer import build_tokenizer, default_tokenizer

__all__ = [
    "LlavaDataset",
    "VQARecord",
    "build_tokenizer",
    "default_tokenizer",
    "generate_shapes_vqa",
    "load_llava_records",
    "load_record_image",
    "render_scene",
    "shapes_text_corpus",
]
