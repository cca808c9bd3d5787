"""Streaming and stop strings in the shared generation loop (runtime.generate): pieces join to the
text, stop strings never leak, text held back for a possible stop or an incomplete byte run is
released exactly once. The numpy test doubles and the tiny tokenizer are test_generate.py's."""

from __future__ import annotations

import pytest

from edgevlm.runtime.generate import GenerationConfig, generate, held_back_length, stream

from test_generate import FakeBackend, image, scripted, tok, vqa_prompt  # noqa: F401  (tok: a fixture)


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_strings(tok, streaming):
    be = scripted(tok, "a red circle\nUSER: how many shapes are there?")
    cfg = GenerationConfig(max_new_tokens=40, stop=("USER:", "ASSISTANT:"))
    if streaming:
        s = stream(be, tok, [5], None, cfg)
        pieces = list(s)
        res = s.result
        assert "".join(pieces) == res.text
        assert not any("U" in p for p in pieces)  # the stop string's start was held back
    else:
        res = generate(be, tok, [5], None, cfg)
    assert res.finish_reason == "stop" and res.text == "a red circle\n"
    assert tok.decode(res.token_ids).startswith("a red circle\nUSER:")


def test_held_back_text_is_released_when_no_stop_follows(tok):
    text = "a red circle\nUSE no"
    s = stream(
        scripted(tok, text), tok, [5], None, GenerationConfig(max_new_tokens=40, stop="\nUSER")
    )
    pieces = list(s)
    assert "".join(pieces) == s.result.text == text and s.result.finish_reason == "eos"
    assert held_back_length("circle\nUS", ["\nUSER"]) == 3
    assert held_back_length("circle", ["\nUSER", "le!"]) == 2


@pytest.mark.parametrize("text", ["there are two shapes 🙂 é", "yes", "no🙂"])
def test_stream_concatenation_equals_text(tok, text):
    s = stream(scripted(tok, text), tok, [5], None, GenerationConfig(max_new_tokens=40))
    assert s.result is None
    pieces = list(s)
    assert "".join(pieces) == s.result.text == text
    assert all(p and "\ufffd" not in p for p in pieces)
    # and with a real-looking model, cut by length
    s = stream(
        FakeBackend(tok.vocab_size),
        tok,
        vqa_prompt(tok),
        image(),
        GenerationConfig(max_new_tokens=9),
    )
    assert "".join(s) == s.result.text == tok.decode(s.result.token_ids)


def test_streaming_invariants_over_random_runs(tok):
    """Sampled runs with stop strings: pieces join to the text, which is a stop-free prefix of
    the decoded ids."""
    prompt, stops = vqa_prompt(tok), ("ir", "e ", "\n")
    for seed in range(25):
        cfg = GenerationConfig(
            max_new_tokens=20, do_sample=True, temperature=3.0, seed=seed, stop=stops
        )
        s = stream(FakeBackend(tok.vocab_size, seed=seed % 3), tok, prompt, image(), cfg)
        pieces = list(s)
        res = s.result
        assert "".join(pieces) == res.text and not any(x in res.text for x in stops)
        assert tok.decode(res.token_ids).startswith(res.text)
        assert (res.finish_reason == "stop") == any(x in tok.decode(res.token_ids) for x in stops)


def test_invalid_byte_run_is_held_until_final(tok):
    """ByteFallback turns a whole invalid byte run into U+FFFD, including an ASCII byte that
    looked complete on its own; the stream must not have emitted it."""
    raw = tok.tokenizer
    ids = [raw.token_to_id(t) for t in ("<0x46>", "<0xC3>", "<0x28>")] + tok.encode("red")
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids)
    assert pieces[0] == "" and tok.decode(ids[:1]) == "F"


def test_stop_string_in_held_back_tail_at_the_end(tok):
    # "\n" is a byte-fallback token, held back until final; EOS comes next
    res = generate(scripted(tok, "yes\n"), tok, [5], None, GenerationConfig(stop="\n"))
    assert res.finish_reason == "stop" and res.text == "yes"
    s = stream(scripted(tok, "yes\n"), tok, [5], None, GenerationConfig(stop="\n"))
    assert "".join(s) == "yes" and s.result.finish_reason == "stop"
