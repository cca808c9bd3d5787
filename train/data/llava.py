"""Read LLaVA-format datasets (LLaVA-Pretrain-558K, LLaVA-Instruct-665K, ShapesVQA) from disk.

A file is a JSON list of records::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

"image" is optional (text-only records) and relative to ``image_root`` (default: the JSON's
folder). ShapesVQA records also carry "qa_meta" (one dict per QA pair). Structural problems and
missing image files are found when loading; undecodable images when ``load_record_image`` runs
(with the runtime's decoder, ``edgevlm.runtime.preprocess.load_image``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from edgevlm.runtime.chat import IMAGE_TOKEN
from edgevlm.runtime.processor import image_question
from edgevlm.runtime.errors import EdgeVLMError, ImageError
from edgevlm.runtime.preprocess import load_image


@dataclass
class VQARecord:
    id: str  # the record's "id" as a string, or "#<index>" when it has none
    image_path: Optional[str]  # absolute or image_root-joined path; None for text-only records
    turns: list[tuple[str, str]]  # (question, answer); the first question holds "<image>"
    qa_meta: list[dict] = field(default_factory=list)  # one dict per turn ({} when absent)


@dataclass
class LlavaDataset:
    json_path: str
    image_root: str
    records: list[VQARecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VQARecord:
        return self.records[i]

    def __iter__(self) -> Iterator[VQARecord]:
        return iter(self.records)


class _BadRecord(Exception):
    """One record is malformed; becomes an EdgeVLMError or a skip."""


def _read_json(json_path: str):
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EdgeVLMError(f"{json_path}: dataset file not found") from None
    except json.JSONDecodeError as e:
        raise EdgeVLMError(f"{json_path}: not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise EdgeVLMError(f"{json_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EdgeVLMError(f"{json_path}: cannot read dataset file: {e.strerror}") from None


def _parse_turns(conv) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise _BadRecord('missing or empty "conversations" (a non-empty list is required)')
    if len(conv) % 2:
        raise _BadRecord(f'"conversations" has an odd number of turns ({len(conv)}); '
                         "human/gpt turns must come in pairs")
    values = []
    for j, turn in enumerate(conv):
        want = "human" if j % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise _BadRecord(f"turn {j} should be from {want!r}, got {got!r} "
                             "(turns must alternate human, gpt)")
        if not isinstance(turn.get("value"), str):
            raise _BadRecord(f'turn {j} has no string "value"')
        values.append(turn["value"])
    return list(zip(values[0::2], values[1::2]))


def _check_image_tokens(turns: list[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
    n_q = sum(q.count(IMAGE_TOKEN) for q, _ in turns)
    if any(IMAGE_TOKEN in a for _, a in turns):
        raise _BadRecord(f"an answer contains {IMAGE_TOKEN}")
    if not has_image:
        if n_q:
            raise _BadRecord(f"text-only record (no \"image\") contains {IMAGE_TOKEN}")
        return turns
    if n_q > 1:
        raise _BadRecord(f"{IMAGE_TOKEN} appears {n_q} times; one image per record is supported")
    if n_q == 0:  # LLaVA's convention: the image goes before the first question
        turns = [(image_question(turns[0][0]), turns[0][1])] + turns[1:]
    elif IMAGE_TOKEN not in turns[0][0]:
        raise _BadRecord(f"{IMAGE_TOKEN} must be in the first question")
    return turns


def _parse_record(rec, index: int, image_root: str) -> VQARecord:
    if not isinstance(rec, dict):
        raise _BadRecord(f"record is a {type(rec).__name__}, not a JSON object")
    turns = _parse_turns(rec.get("conversations"))
    image = rec.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str) or not image:
            raise _BadRecord(f'"image" must be a non-empty string, got {image!r}')
        image_path = os.path.join(image_root, image)
        if not os.path.exists(image_path):
            raise _BadRecord(f"image file not found: {image_path}")
    turns = _check_image_tokens(turns, image_path is not None)
    meta = rec.get("qa_meta")
    if meta is None:
        meta = [{} for _ in turns]
    elif not (isinstance(meta, list) and len(meta) == len(turns)
              and all(isinstance(m, dict) for m in meta)):
        raise _BadRecord(f'"qa_meta" must be a list of {len(turns)} objects (one per QA pair)')
    rid = rec.get("id")
    return VQARecord(id=str(rid) if rid is not None else f"#{index}", image_path=image_path,
                     turns=turns, qa_meta=meta)


def _record_name(rec, index: int) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"record {index} (id {rid!r})" if rid is not None else f"record {index} (no id)"


def load_llava_records(json_path: str, image_root: Optional[str] = None,
                       skip_bad_records: bool = False) -> LlavaDataset:
    """Parse and validate a LLaVA-format JSON file.

    A bad record raises EdgeVLMError naming the file and the record, or, with
    ``skip_bad_records``, is left out and listed in ``result.skipped``. A file that is not valid
    JSON, or not a list, is always an error.
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(json_path))
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise EdgeVLMError(f"{json_path}: top level must be a JSON list of records, "
                           f"got a {type(data).__name__}")
    records: list[VQARecord] = []
    skipped: list[tuple[str, str]] = []
    for i, rec in enumerate(data):
        try:
            records.append(_parse_record(rec, i, root))
        except _BadRecord as e:
            if not skip_bad_records:
                raise EdgeVLMError(f"{json_path}: {_record_name(rec, i)}: {e} "
                                   "(fix it, or pass skip_bad_records=True)") from None
            rid = rec.get("id") if isinstance(rec, dict) else None
            skipped.append((str(rid) if rid is not None else f"#{i}", str(e)))
    return LlavaDataset(json_path=json_path, image_root=root, records=records, skipped=skipped)


def load_record_image(record: VQARecord):
    """The record's image as an upright RGB ``PIL.Image``, decoded by the runtime's ``load_image``
    (EXIF orientation, 16-bit greyscale, pixel limit), so training sees what a device sees.
    ImageError names the file and the record."""
    if record.image_path is None:
        raise ImageError(f"record {record.id!r} has no image")
    try:
        return load_image(record.image_path)
    except ImageError as e:
        raise ImageError(f"{e} (record {record.id!r})") from None
