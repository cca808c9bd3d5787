"""runtime.sampling, runtime.tokenizer and the shared generation loop (runtime.generate), driven by
numpy test doubles of the Backend interface (streaming and stop strings: test_streaming.py; the
loop without torch: test_runtime_no_torch.py). Real backends get their own tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edgevlm.runtime.backends import BACKENDS, Backend
from edgevlm.runtime.chat import IMAGE_TOKEN_INDEX
from edgevlm.runtime.errors import ContextLengthError, EdgeVLMError
from edgevlm.runtime.generate import GenerationConfig, generate, stream
from edgevlm.runtime.preprocess_config import PreprocessConfig
from edgevlm.runtime.processor import Processor
from edgevlm.runtime.tokenizer import TextTokenizer

CORPUS = [
    "a red circle",
    "a blue square",
    "the green triangle is left of the red circle",
    "USER: what shape is this? ASSISTANT: a red circle",
    "how many shapes are there?",
    "there are two shapes",
    "yes",
    "no",
] * 5


def build_tokenizer() -> Tokenizer:
    """A tiny Llama-style tokenizer: '▁' word pieces, byte fallback, leading-space strip."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None  # like Llama's tokenizer.json: normalizer does the '▁' work
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    dec = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    spec["normalizer"] = json.loads(norm.__getstate__())
    spec["decoder"] = json.loads(dec.__getstate__())
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    raw = build_tokenizer()
    return TextTokenizer.from_tokenizer(
        raw, bos_id=raw.token_to_id("<s>"), eos_id=raw.token_to_id("</s>")
    )


class FakeBackend(Backend):
    """A tiny recurrent "LM" in numpy. Its KV cache is the list of inputs seen plus the running
    state; ``use_cache=False`` recomputes the state from all inputs at every step."""

    name = "fake"

    def __init__(
        self,
        vocab_size: int,
        n_ctx: int = 256,
        d: int = 16,
        m: int = 4,
        eos_id: int | None = None,
        use_cache: bool = True,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        self.n_ctx, self.m, self.use_cache = n_ctx, m, use_cache
        self.emb = rng.standard_normal((vocab_size, d)).astype(np.float32)
        self.rec = (rng.standard_normal((d, d)) * 0.7 / np.sqrt(d)).astype(np.float32)
        self.out = (rng.standard_normal((d, vocab_size)) * 3).astype(np.float32)
        self.proj = rng.standard_normal((3, d)).astype(np.float32)
        if eos_id is not None:
            self.out[:, eos_id] = -5.0  # make EOS rare so outputs are long
        self.seen: list[np.ndarray] = []
        self.h = np.zeros(d, np.float32)
        self.calls: list[str] = []

    def encode_image(self, pixel_values):
        b, c, h, w = pixel_values.shape
        strips = pixel_values.reshape(b, c, self.m, h // self.m, w).mean(axis=(3, 4))  # [B, 3, M]
        return (strips.transpose(0, 2, 1) @ self.proj).astype(np.float32)  # [B, M, D]

    def _push(self, x: np.ndarray) -> None:
        if len(self.seen) >= self.n_ctx:
            raise RuntimeError("KV cache overflow: the loop fed more than n_ctx positions")
        self.seen.append(x)
        self.h = np.tanh(self.rec @ self.h + x)

    def _logits(self) -> np.ndarray:
        h = self.h
        if not self.use_cache:
            h = np.zeros_like(self.h)
            for x in self.seen:
                h = np.tanh(self.rec @ h + x)
        return (h @ self.out).astype(np.float32)

    def prefill(self, segments):
        self.calls.append("prefill:" + ",".join("v" if s.ndim == 2 else "t" for s in segments))
        self.seen, self.h = [], np.zeros_like(self.h)
        for seg in segments:
            rows = seg if seg.ndim == 2 else self.emb[seg]
            for x in rows:
                self._push(np.asarray(x, np.float32))
        return self._logits()

    def decode(self, token_id):
        self.calls.append("decode")
        self._push(self.emb[token_id])
        return self._logits()


class ScriptedBackend(Backend):
    """Emits a fixed token script (one-hot logits), then EOS; records what it was fed."""

    name = "scripted"

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, n_ctx: int = 512):
        self.script, self.v, self.eos_id, self.n_ctx = list(script), vocab_size, eos_id, n_ctx
        self.fed: list[int] = []
        self.step = 0

    def _onehot(self) -> np.ndarray:
        x = np.zeros(self.v, np.float32)
        x[self.script[self.step] if self.step < len(self.script) else self.eos_id] = 10.0
        self.step += 1
        return x

    def encode_image(self, pixel_values):
        return np.zeros((pixel_values.shape[0], 2, 4), np.float32)

    def prefill(self, segments):
        self.step, self.fed = 0, []
        return self._onehot()

    def decode(self, token_id):
        self.fed.append(token_id)
        return self._onehot()


def scripted(tok: TextTokenizer, text: str, **kw) -> ScriptedBackend:
    return ScriptedBackend(tok.encode(text), tok.vocab_size, tok.eos_id, **kw)


def image(b: int = 1, s: int = 8) -> np.ndarray:
    return np.random.default_rng(b).standard_normal((b, 3, s, s)).astype(np.float32)


# --- tokenizer ----------------------------------------------------------------------------------


def test_from_dir_reads_special_tokens(tmp_path):
    raw = build_tokenizer()
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    t = TextTokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (1, 2, 0, None)
    assert t.vocab_size == raw.get_vocab_size()
    assert TextTokenizer.from_dir(tmp_path, eos_id=5).eos_id == 5
    ids = t.encode("a red circle")
    assert t.bos_id not in ids and t.decode(ids) == "a red circle"
    assert t.decode([t.bos_id, *ids, t.eos_id]) == "a red circle"
    with pytest.raises(EdgeVLMError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path / "missing")


def _ids(tok, turns, template="vicuna_v1"):
    return Processor.create(tok, template, PreprocessConfig()).chat_ids(turns)


def test_chat_ids_have_bos_and_image_marker(tok):
    ids = _ids(tok, [("<image>\nwhat shape is this?", None)])
    assert ids[0] == tok.bos_id and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.eos_id not in ids


@pytest.mark.parametrize("text", ["red circle", "a red circle é🙂 Zq\nUSER: x", "🙂🙂 é"])
def test_incremental_detokenizer_is_prefix_consistent(tok, text):
    ids = tok.encode(text)
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if text == "red circle":
        assert [p for p in pieces if p] == ["red", " circle"]


# --- generation loop ----------------------------------------------------------------------------


def vqa_prompt(tok, n_images=1):
    return _ids(tok, [("<image>" * n_images + "\nwhat shape?", None)])


def test_greedy_generation_is_deterministic_and_uses_the_cache(tok):
    prompt = vqa_prompt(tok)
    cfg = GenerationConfig(max_new_tokens=12)
    a = generate(FakeBackend(tok.vocab_size, eos_id=tok.eos_id), tok, prompt, image(), cfg)
    b = generate(FakeBackend(tok.vocab_size, eos_id=tok.eos_id), tok, prompt, image(), cfg)
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == "length"
    assert len(a.token_ids) == 12 and a.text == tok.decode(a.token_ids)


def test_cached_decode_equals_recomputing_from_scratch(tok):
    prompt, px = vqa_prompt(tok), image()
    cfg = GenerationConfig(max_new_tokens=10)
    be = FakeBackend(tok.vocab_size, eos_id=tok.eos_id)
    got = generate(be, tok, prompt, px, cfg).token_ids
    assert be.calls == ["prefill:t,v,t"] + ["decode"] * 9
    # reference: a fresh prefill of the whole sequence for every new token, no decode() at all
    ref_be = FakeBackend(tok.vocab_size, eos_id=tok.eos_id, use_cache=False)
    cut = prompt.index(IMAGE_TOKEN_INDEX)
    visual = ref_be.encode_image(px)[0]
    ref: list[int] = []
    for _ in range(10):
        segs = [np.array(prompt[:cut]), visual, np.array(prompt[cut + 1 :] + ref, dtype=np.int64)]
        ref.append(int(np.argmax(ref_be.prefill(segs))))
    assert got == ref


def test_sampled_generation_is_reproducible_by_seed(tok):
    prompt = vqa_prompt(tok)

    def run(seed):
        cfg = GenerationConfig(
            max_new_tokens=15,
            do_sample=True,
            temperature=2.0,
            top_k=50,
            top_p=0.95,
            repetition_penalty=1.3,
            seed=seed,
        )
        return generate(FakeBackend(tok.vocab_size, eos_id=tok.eos_id), tok, prompt, image(), cfg)

    assert run(3).token_ids == run(3).token_ids
    assert run(3).token_ids != run(4).token_ids


def test_eos_ends_generation_and_ignore_eos_does_not(tok):
    be = scripted(tok, "a red circle")
    res = generate(be, tok, [tok.bos_id, 5], None, GenerationConfig(max_new_tokens=20))
    assert res.finish_reason == "eos" and res.text == "a red circle"
    assert (
        res.token_ids[-1] == tok.eos_id
        and len(res.token_ids) == len(tok.encode("a red circle")) + 1
    )
    assert tok.eos_id not in be.fed  # the final token is never fed back
    res = generate(
        scripted(tok, "a red"), tok, [5], None, GenerationConfig(max_new_tokens=6, ignore_eos=True)
    )
    assert res.finish_reason == "length" and res.timings.n_generated == 6


def test_context_guard_and_clamp(tok):
    prompt = vqa_prompt(tok)  # 4 visual tokens per image in FakeBackend
    n_in = len(prompt) - 1 + 4
    with pytest.raises(ContextLengthError, match=rf"{n_in} tokens.*context is {n_in - 1}"):
        generate(
            FakeBackend(tok.vocab_size, n_ctx=n_in - 1), tok, prompt, image(), GenerationConfig()
        )
    with pytest.raises(ContextLengthError, match=rf"{n_in} tokens.*context is {n_in}\b"):
        generate(FakeBackend(tok.vocab_size, n_ctx=n_in), tok, prompt, image(), GenerationConfig())
    be = FakeBackend(tok.vocab_size, n_ctx=n_in + 5)  # raises if fed more than n_ctx positions
    res = generate(be, tok, prompt, image(), GenerationConfig(max_new_tokens=50, ignore_eos=True))
    assert res.finish_reason == "length" and res.timings.n_generated == 5


def test_timings_are_consistent(tok):
    prompt = vqa_prompt(tok, n_images=2)
    be = FakeBackend(tok.vocab_size, eos_id=tok.eos_id)
    res = generate(be, tok, prompt, image(b=2), GenerationConfig(max_new_tokens=7))
    t = res.timings
    assert be.calls[0] == "prefill:t,v,v,t"
    assert t.n_visual_tokens == 2 * 4 and t.n_prompt_tokens == len(prompt) - 2
    assert t.n_generated == len(res.token_ids) == 7
    assert t.ttft_ms >= t.vision_ms + t.prefill_ms > 0 and t.total_ms >= t.ttft_ms
    assert t.decode_tok_s is not None and t.decode_tok_s > 0
    assert set(t.to_dict()) == {
        "vision_ms",
        "prefill_ms",
        "ttft_ms",
        "decode_tok_s",
        "n_visual_tokens",
        "n_prompt_tokens",
        "n_generated",
        "total_ms",
    }
    one = generate(
        FakeBackend(tok.vocab_size), tok, [1, 5, 6], None, GenerationConfig(max_new_tokens=1)
    )
    assert one.timings.decode_tok_s is None and one.timings.vision_ms == 0
    assert one.timings.n_visual_tokens == 0 and one.timings.n_prompt_tokens == 3


def test_image_marker_count_must_match_images(tok):
    be = FakeBackend(tok.vocab_size)
    with pytest.raises(EdgeVLMError, match="1 image marker.*0 image"):
        generate(be, tok, vqa_prompt(tok), None, GenerationConfig())
    with pytest.raises(EdgeVLMError, match="0 image marker.*1 image"):
        generate(be, tok, [1, 5, 6], image(), GenerationConfig())
    with pytest.raises(EdgeVLMError, match="2 image marker.*1 image"):
        stream(
            be, tok, vqa_prompt(tok, n_images=2), image(), GenerationConfig()
        )  # raises at the call
    assert be.calls == []


def test_backend_registry_exists():
    assert BACKENDS.kind == "backend"
    with pytest.raises(EdgeVLMError, match="unknown backend"):
        BACKENDS.get("no-such-backend")

