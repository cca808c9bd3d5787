"""SentencePiece BPE tokenizer builder: exact vocab size, determinism, slow/fast agreement, EOS."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from edgevlm.runtime.chat import VICUNA_SYSTEM  # noqa: E402
from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402
from edgevlm.train.data.shapes import shapes_text_corpus  # noqa: E402
from edgevlm.train.data.tokenizer import build_tokenizer, default_tokenizer  # noqa: E402

SMALL_VOCAB, BIG_VOCAB = 400, 32000
SAMPLES = [
    VICUNA_SYSTEM + " USER: \nWhat colour is the circle? ASSISTANT: red",
    "USER: How many shapes are there? ASSISTANT: 3",
    "Is the purple star left of the orange square?",
    "a large red circle at the top left and a small blue square at the bottom right.",
    'What text is written in the image? "k7"',
    "Numbers 12345 and unseen words: zebra, Ünïcödé, 日本語!",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return shapes_text_corpus(n=300, seed=0)


@pytest.fixture(scope="module")
def small_dirs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    a = build_tokenizer(str(tmp_path_factory.mktemp("tok_a")), corpus, SMALL_VOCAB, seed=0)
    b = build_tokenizer(str(tmp_path_factory.mktemp("tok_b")), corpus, SMALL_VOCAB, seed=0)
    return Path(a), Path(b)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> Path:
    return Path(default_tokenizer(str(tmp_path_factory.mktemp("tok_big")), BIG_VOCAB, seed=0))


def _dir(which: str, small_dirs, big_dir) -> Path:
    return small_dirs[0] if which == "small" else big_dir


def _both(path: Path):
    slow = transformers.LlamaTokenizer.from_pretrained(str(path))
    fast = transformers.AutoTokenizer.from_pretrained(str(path))
    assert isinstance(fast, transformers.LlamaTokenizerFast)
    return slow, fast


def _unused_ids(fast) -> set[int]:
    return {i for t, i in fast.get_vocab().items() if t.startswith("<unused")}


@pytest.mark.parametrize("which", ["small", "big"])
def test_exact_vocab_size(which, small_dirs, big_dir):
    import sentencepiece as spm

    path, vocab = (small_dirs[0], SMALL_VOCAB) if which == "small" else (big_dir, BIG_VOCAB)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(
        p.name for p in path.iterdir())
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    slow, fast = _both(path)
    assert sp.get_piece_size() == len(slow) == len(fast) == vocab
    assert fast.backend_tokenizer.get_vocab_size(with_added_tokens=True) == vocab
    assert (slow.unk_token_id, slow.bos_token_id, slow.eos_token_id) == (0, 1, 2)
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    assert fast.pad_token is None and sp.pad_id() == -1
    if which == "big":  # a small corpus cannot fill 32000: padded with <unused{i}> at the end
        unused = _unused_ids(fast)
        assert len(unused) > BIG_VOCAB // 2 and max(unused) == BIG_VOCAB - 1
        assert fast.convert_ids_to_tokens(min(unused)) == "<unused0>"


def test_deterministic(small_dirs, tmp_path):
    a, b = small_dirs
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = Path(default_tokenizer(str(tmp_path), 1000, seed=0))
    d = Path(default_tokenizer(str(tmp_path / "again"), 1000, seed=0))
    assert (c / "tokenizer.model").read_bytes() == (d / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("which", ["small", "big"])
def test_slow_and_fast_agree(which, small_dirs, big_dir, corpus):
    slow, fast = _both(_dir(which, small_dirs, big_dir))
    for text in SAMPLES + corpus[:50]:
        ids = fast.encode(text)
        assert ids == slow.encode(text), text
        assert ids[0] == fast.bos_token_id and ids[-1] != fast.eos_token_id
        assert fast.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("which", ["small", "big"])
def test_backend_round_trip_and_no_unused(which, small_dirs, big_dir, corpus):
    _, fast = _both(_dir(which, small_dirs, big_dir))
    backend = fast.backend_tokenizer
    unused = _unused_ids(fast)
    texts = corpus + SAMPLES + shapes_text_corpus(n=100, seed=7)
    for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False)):
        assert not unused & set(enc.ids), text
        assert 0 not in enc.ids  # byte fallback: never <unk>
        assert backend.decode(enc.ids) == text


def test_eos_inside_text_is_special(small_dirs, big_dir):
    for path in (small_dirs[0], big_dir):
        _, fast = _both(path)
        ids = fast.backend_tokenizer.encode("red</s>", add_special_tokens=False).ids
        assert ids[-1] == 2 and ids.count(2) == 1
        assert fast.encode("yes</s>", add_special_tokens=False)[-1] == 2
        assert fast.decode(ids, skip_special_tokens=True) == "red"


def test_bad_vocab_size(corpus, tmp_path):
    with pytest.raises(EdgeVLMError, match="vocab_size"):
        build_tokenizer(str(tmp_path), corpus, 100)
    with pytest.raises(EdgeVLMError, match="vocab_size=270"):  # too few for the corpus' characters
        build_tokenizer(str(tmp_path), corpus, 270)
    with pytest.raises(EdgeVLMError, match="empty"):
        build_tokenizer(str(tmp_path), [], 400)


@pytest.mark.parametrize("which", ["small", "big"])
def test_answer_ids_are_those_of_the_whole_conversation(which, small_dirs, big_dir):
    """``encode_turns`` encodes each answer apart, as " answer". Its ids must be the ids the answer
    has inside the whole rendered conversation (how LLaVA-style training tokenises a record), which
    are also what the model emits after "ASSISTANT:". The slow tokenizer, encoding " red" alone,
    prepends one more "▁" piece; the runtime backend must not."""
    from edgevlm.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(_dir(which, small_dirs, big_dir))
    slow, _ = _both(_dir(which, small_dirs, big_dir))
    prefix = VICUNA_SYSTEM + " USER: \nWhat colour is the circle? ASSISTANT:"
    for answer in ("red", "3", "yes", "k7", "top left", "Ünï"):
        alone = tok.encode(" " + answer)
        assert tok.encode(prefix + " " + answer) == tok.encode(prefix) + alone, answer
        assert slow.encode(" " + answer, add_special_tokens=False)[1:] == alone, answer
