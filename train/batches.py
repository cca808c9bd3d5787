"""LLaVA records -> tokenised training samples -> padded batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.preprocess import preprocess_image
from edgevlm.runtime.processor import Processor, count_images
from edgevlm.train.data.llava import load_record_image
from edgevlm.train.packing import QA_MODES, pack_independent


@dataclass
class Sample:
    id: str
    input_ids: torch.Tensor  # [T], IMAGE_TOKEN_INDEX where the image goes
    labels: torch.Tensor  # [T], -100 where not a target
    pixel_values: torch.Tensor | None  # [3, S, S]
    segments: torch.Tensor | None = None  # [T] packed-QA segment ids (train/packing.py)


class VQADataset(torch.utils.data.Dataset):
    """Tokenises on access with the runtime's processor, so training ids equal inference ids.

    ``qa_mode``: ``conversation`` trains multi-turn records as conversations; ``independent``
    packs their turns as separate single-turn questions sharing one image (train/packing.py)."""

    def __init__(self, records, processor: Processor, max_length: int, n_visual_tokens: int,
                 qa_mode: str = "conversation"):
        if qa_mode not in QA_MODES:
            raise ValueError(f"qa_mode must be one of {QA_MODES}, got {qa_mode!r}")
        if n_visual_tokens + 16 > max_length:
            raise EdgeVLMError(f"max_length {max_length} leaves no room for text after the image's "
                               f"{n_visual_tokens} visual tokens; raise the stage's max_length")
        self.qa_mode = qa_mode
        self.records = list(records)
        self.processor = processor
        self.max_length = max_length
        self.n_visual = n_visual_tokens

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        packed, segments = None, None
        if self.qa_mode == "independent" and rec.image_path is not None:
            packed = pack_independent(self.processor, rec.turns, self.n_visual, self.max_length)
        if packed is not None:
            ids, target, segs = packed
            segments = torch.tensor(segs)
        else:
            ids, target = self.processor.training_ids(rec.turns)
            # the image expands to n_visual positions: truncate so the spliced length fits max_length
            budget = self.max_length - (self.n_visual - 1) * count_images(ids)
            ids, target = ids[:budget], target[:budget]
        labels = [t if m else -100 for t, m in zip(ids, target)]
        pixels = None
        if rec.image_path is not None:
            pixels = torch.from_numpy(preprocess_image(load_record_image(rec), self.processor.preprocess))[0]
        return Sample(rec.id, torch.tensor(ids), torch.tensor(labels), pixels, segments)


def collate(samples: list[Sample]) -> dict:
    """Images of the samples that have one, in order (text-only samples may be mixed in)."""
    imgs = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixels = torch.stack(imgs) if imgs else None  # [K, 3, S, S]
    segments = None
    if any(s.segments is not None for s in samples):  # unpacked samples: one segment (0)
        segments = [s.segments if s.segments is not None else torch.zeros_like(s.input_ids) for s in samples]
    return {"ids": [s.id for s in samples], "pixel_values": pixels, "input_ids": [s.input_ids for s in samples],
            "labels": [s.labels for s in samples], "segments": segments}
