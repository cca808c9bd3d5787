"""Constrained decoding (runtime.constrain), logprobs (runtime.logprobs) and logit_bias/penalties in the
one generation loop, on real backends: the random-weight tiny model's ONNX bundle (ort) and its GGUF
bundle (llama.cpp). A random model's free output is never JSON, so valid output here is the mask's doing;
the damaged-mask tests show the validity checks catch a mask that lets a wrong token through."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgevlm.runtime import Runtime
from edgevlm.runtime import constrain
from edgevlm.runtime.constrain import Constraint, ConstraintViolation, compiled_count
from edgevlm.runtime.errors import ConstraintError, EdgeVLMError

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "colour": {"enum": ["red", "green", "blue"]},
        "present": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 6},
        "boxes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["count", "colour", "present", "label", "boxes"],
    "additionalProperties": False,
}
PROMPT = "How many shapes are there? Answer in JSON."


def validate(text: str, schema: dict = SCHEMA) -> dict:
    """json.loads + schema validation (jsonschema when installed, else keys and types by hand)."""
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        assert set(value) == set(schema["required"]), value
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 20
        assert value["colour"] in ("red", "green", "blue") and isinstance(value["present"], bool)
        assert isinstance(value["label"], str) and len(value["label"]) <= 6
        assert isinstance(value["boxes"], list) and len(value["boxes"]) <= 3
    else:
        jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def onnx_bundle(serve_onnx_bundle):
    return serve_onnx_bundle  # conftest's session export of the small random model, shared with test_serve*.py


@pytest.fixture(scope="module")
def gguf_bundle(serve_gguf_bundle):
    return serve_gguf_bundle


@pytest.fixture(scope="module", params=["ort", "llamacpp"])
def rt(request):
    bundle = request.getfixturevalue("onnx_bundle" if request.param == "ort" else "gguf_bundle")
    with Runtime.load(bundle, backend=request.param, threads=1) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def ort_rt(onnx_bundle):
    with Runtime.load(onnx_bundle, backend="ort", threads=1) as runtime:
        yield runtime


# --- constraints: compile errors and the cache --------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: Constraint.json_schema('{"type": "nope"}'),
    lambda: Constraint.json_schema("{not json"),
    lambda: Constraint.json_schema([1, 2]),
    lambda: Constraint.json_schema({"type": "string", "format": "no-such-format"}),  # strict: unknown keyword
    lambda: Constraint.regex("a(b"),
    lambda: Constraint.choices([]),
    lambda: constrain.constraint_from(json_object=True, regex="a"),
])
def test_bad_constraints_are_constraint_errors(make):
    with pytest.raises(ConstraintError) as e:
        make()
    assert isinstance(e.value, EdgeVLMError) and str(e.value)


def test_lenient_schema_ignores_what_it_cannot_enforce():
    assert Constraint.json_schema({"type": "string", "format": "no-such-format"}, strict=False).kind == "json_schema"


def test_compiled_once_per_constraint_and_tokenizer(ort_rt):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    before = compiled_count(ort_rt.tokenizer)
    first = ort_rt.generate(prompt=PROMPT, max_new_tokens=16, json_schema=schema)
    second = ort_rt.generate(prompt=PROMPT, max_new_tokens=16, json_schema=json.dumps(schema))  # same, as text
    assert compiled_count(ort_rt.tokenizer) == before + 1
    assert first.token_ids == second.token_ids and json.loads(first.text)["n"] in range(10)


# --- valid output on a random model, every backend ----------------------------------------------------


def test_json_schema_output_validates_greedy_and_sampled(rt):
    runs = [rt.generate(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA)]
    runs += [rt.generate(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA, do_sample=True, temperature=1.0,
                         top_p=0.95, seed=seed) for seed in range(4)]
    for r in runs:
        assert r.finish_reason == "eos", (r.finish_reason, r.text)
        assert r.token_ids[-1] == rt.tokenizer.eos_id
        validate(r.text)
    assert len({r.text for r in runs}) > 1  # sampling is on: the seeds give different answers


def test_choices_regex_and_json_object(rt):
    for seed in range(3):
        opts = ["yes", "no", "maybe not"]
        r = rt.generate(prompt="Is there a circle?", max_new_tokens=8, choices=opts, do_sample=True, seed=seed)
        assert r.text in opts and r.finish_reason == "eos"
        pattern = r"(red|blue) [0-9]{1,2}"
        r = rt.generate(prompt="Colour and count?", max_new_tokens=12, regex=pattern, do_sample=True, seed=seed)
        assert re.fullmatch(pattern, r.text), r.text
    # any JSON object: strings are unbounded, so a random model gets a nudge towards closing them
    nudge = {i: 6.0 for i in range(rt.tokenizer.vocab_size) if set(rt.tokenizer.decode([i])) & set('"}')}
    for seed in range(3):
        r = rt.generate(prompt=PROMPT, max_new_tokens=64, json_object=True, do_sample=True, seed=seed,
                        logit_bias=nudge)
        assert r.finish_reason == "eos", r.text
        assert isinstance(json.loads(r.text), dict)


def test_length_before_the_grammar_completes_and_ignore_eos(ort_rt):
    short = ort_rt.generate(prompt=PROMPT, max_new_tokens=5, json_schema=SCHEMA)
    assert short.finish_reason == "length" and len(short.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.text)  # documented: a cut-off run's text is incomplete
    # the grammar decides where EOS goes: ignore_eos cannot run past a complete answer
    r = ort_rt.generate(prompt=PROMPT, max_new_tokens=20, choices=["yes", "no"], ignore_eos=True)
    assert r.finish_reason == "eos" and r.text in ("yes", "no") and len(r.token_ids) < 20
    # a stop string still cuts the text
    r = ort_rt.generate(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA, stop='"colour"')
    assert r.finish_reason == "stop" and r.text.startswith('{"count": ') and '"colour"' not in r.text


def test_streamed_pieces_and_logprobs_match_the_whole_run(rt):
    kw = dict(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA, do_sample=True, seed=7, logprobs=True,
              top_logprobs=2)
    whole = rt.generate(**kw)
    s = rt.stream(**kw)
    pieces, entries = [], []
    for piece in s:
        pieces.append(piece)
        entries += s.take_logprobs()
    entries += s.take_logprobs()
    assert "".join(pieces) == whole.text == s.result.text and len(pieces) > 1
    assert [e.token_id for e in entries] == whole.token_ids == s.result.token_ids
    assert [e.logprob for e in entries] == [e.logprob for e in whole.logprobs]
    validate(whole.text)


# --- the token budget: a constrained answer completes whenever the budget can hold one -----------------

FREE = {  # free strings and arrays: a random model could write one endless string
    "type": "object",
    "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
FREE_MIN = '{"a": "", "b": []}'  # its shortest answer
HARD = {  # required keys with a pattern, a counted array of free numbers, a minimum length, a nested object
    "type": "object",
    "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                   "xs": {"type": "array", "items": {"type": "number"}, "minItems": 2},
                   "s": {"type": "string", "minLength": 3},
                   "o": {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}},
    "required": ["code", "xs", "s", "o"],
}


def _budget_runs(rt, **kw):
    for max_new in (12, 24, 48):
        for seed in range(4):
            r = rt.generate(prompt=PROMPT, max_new_tokens=max_new, do_sample=True, temperature=1.0, seed=seed, **kw)
            yield max_new, seed, r


def test_budget_closes_json_object_every_try(rt):
    texts = set()
    for max_new, seed, r in _budget_runs(rt, json_object=True):
        assert r.finish_reason == "eos" and len(r.token_ids) <= max_new, (max_new, seed, r.finish_reason, r.text)
        assert isinstance(json.loads(r.text), dict) and r.token_ids[-1] == rt.tokenizer.eos_id
        texts.add(r.text)
    assert len(texts) > 3  # sampling stays free until the budget runs short


def test_budget_closes_a_schema_with_free_strings_every_try(rt):
    st = Constraint.json_schema(FREE).start(rt.tokenizer)
    n_min = len(st.planner.plan(st.matcher)) + 1  # the shortest closing from the start + EOS (17 here)
    longer = 0
    for max_new, seed, r in _budget_runs(rt, json_schema=FREE):
        if max_new < n_min:
            continue
        assert r.finish_reason == "eos" and len(r.token_ids) <= max_new, (max_new, seed, r.finish_reason, r.text)
        validate(r.text, FREE)
        longer += len(r.text) > len(FREE_MIN)
    assert longer  # the model's own tokens, not only the shortest closing
    st = Constraint.json_schema(HARD).start(rt.tokenizer)
    n_hard = len(st.planner.plan(st.matcher)) + 1
    for extra in (0, 6, 24):
        for seed in range(3):
            r = rt.generate(prompt=PROMPT, max_new_tokens=n_hard + extra, json_schema=HARD, do_sample=True, seed=seed)
            assert r.finish_reason == "eos", (extra, seed, r.text)
            validate(r.text, HARD)
    # regexes with an unbounded repeat before a required end, streamed: the budget closes them too
    for pattern in (r'"[a-z ]+"', r"[0-9]+x"):
        for seed in range(3):
            s = rt.stream(prompt=PROMPT, max_new_tokens=6, regex=pattern, do_sample=True, seed=seed)
            text = "".join(s)
            assert re.fullmatch(pattern, text) and s.result.finish_reason == "eos", (pattern, text)


def test_budget_below_the_shortest_answer_ends_with_length(ort_rt):
    """The shortest closing from the start, plus its EOS, is the least budget that completes."""
    st = Constraint.json_schema(FREE).start(ort_rt.tokenizer)
    plan = st.planner.plan(st.matcher)
    assert ort_rt.tokenizer.decode(plan) == FREE_MIN
    exact = ort_rt.generate(prompt=PROMPT, max_new_tokens=len(plan) + 1, json_schema=FREE, do_sample=True, seed=1)
    assert exact.finish_reason == "eos" and exact.text == FREE_MIN
    no_eos = ort_rt.generate(prompt=PROMPT, max_new_tokens=len(plan), json_schema=FREE, do_sample=True, seed=1)
    assert no_eos.finish_reason == "length" and no_eos.text == FREE_MIN  # no room for the EOS: OpenAI's "length"
    short = ort_rt.generate(prompt=PROMPT, max_new_tokens=len(plan) - 1, json_schema=FREE, do_sample=True, seed=1)
    assert short.finish_reason == "length" and FREE_MIN.startswith(short.text) and short.text != FREE_MIN


def test_closing_plans_complete_any_prefix(ort_rt):
    """From states cut in a key, a string, an escape, a number or a nested array, the plan completes JSON."""
    tok = ort_rt.tokenizer
    for prefix in ('{"ke', '{"a": "x\\', '{"a": [1, {"b": -1.', '{"a": [[], "', '{"a": tr'):
        st = Constraint.json_object().start(tok)
        ids = constrain._engine(tok).lltok.tokenize_str(prefix)  # no leading "▁"
        for i in ids:
            st.advance(i)  # the run's own bookkeeping (the matcher and the planner's scan of the text)
        plan = st.planner.plan(st.matcher, st.scan)
        assert plan is not None and st.matcher.consume_tokens(plan) and st.matcher.is_accepting(), prefix
        assert isinstance(json.loads(tok.decode(ids + plan)), dict), tok.decode(ids + plan)


def test_damaged_closing_leaves_answers_that_do_not_parse(ort_rt, monkeypatch):
    """With the budget rule switched off, the same runs as above end cut off: the checks would fail."""
    monkeypatch.setattr(constrain.ConstraintState, "budget_token", lambda self, left: None)
    monkeypatch.setattr(constrain.ConstraintState, "fits", lambda self, token, left: True)
    cut = 0
    for _, _, r in _budget_runs(ort_rt, json_object=True):
        try:
            json.loads(r.text)
        except ValueError:
            cut += 1
            assert r.finish_reason == "length"
    assert cut >= 3


# --- a damaged mask must be caught --------------------------------------------------------------------


def _skip_mask_once(monkeypatch, at_step: int = 3):
    """The loop's mask, except that on one step it lets every token through."""
    real, calls = constrain.ConstraintState.mask, {"n": 0}

    def mask(self, logits):
        calls["n"] += 1
        return logits if calls["n"] == at_step + 1 else real(self, logits)

    monkeypatch.setattr(constrain.ConstraintState, "mask", mask)


def test_damaged_mask_is_refused_by_the_grammar(ort_rt, monkeypatch):
    _skip_mask_once(monkeypatch)
    with pytest.raises(ConstraintViolation):
        ort_rt.generate(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA)


def test_damaged_mask_output_fails_validation(ort_rt, monkeypatch):
    """With the loop's grammar check also switched off, the validity check itself catches the output."""
    _skip_mask_once(monkeypatch)
    real = constrain.ConstraintState.advance
    monkeypatch.setattr(constrain.ConstraintState, "advance",
                        lambda self, t: self.matcher.consume_token(int(t)) or None)
    r = ort_rt.generate(prompt=PROMPT, max_new_tokens=80, json_schema=SCHEMA)
    with pytest.raises(Exception) as e:
        validate(r.text)
    assert e.type.__name__ in ("JSONDecodeError", "ValidationError", "AssertionError"), e.value
    monkeypatch.setattr(constrain.ConstraintState, "advance", real)


# --- logprobs, logit_bias, penalties -------------------------------------------------------------------


def test_logprobs_are_sorted_normalised_and_greedy_picks_the_top(rt):
    r = rt.generate(prompt=PROMPT, max_new_tokens=12, logprobs=True, top_logprobs=5)
    assert len(r.logprobs) == len(r.token_ids)
    for e, tid in zip(r.logprobs, r.token_ids):
        lps = [t.logprob for t in e.top]
        assert len(e.top) == 5 and lps == sorted(lps, reverse=True)
        assert np.exp(lps).sum() <= 1 + 1e-6 and all(lp <= 0 for lp in lps)
        assert e.token_id == tid == e.top[0].token_id and e.logprob == e.top[0].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert rt.generate(prompt=PROMPT, max_new_tokens=4).logprobs is None
    # the same numbers from the backend's own logits, computed here step by step
    from edgevlm.runtime.fidelity import log_softmax
    from edgevlm.runtime.generate import split_segments

    logits = rt.backend.prefill(split_segments(rt.prompt_ids(PROMPT, with_image=False), None))
    for e in r.logprobs[:3]:
        want = log_softmax(np.asarray(logits, np.float64).reshape(-1))
        assert int(np.argmax(want)) == e.token_id and abs(want[e.token_id] - e.logprob) < 1e-4
        assert [t.token_id for t in e.top] == [int(i) for i in np.argsort(-want, kind="stable")[:5]]
        logits = rt.backend.decode(e.token_id)


def test_logprobs_under_a_constraint_cover_only_allowed_tokens(ort_rt):
    r = ort_rt.generate(prompt="Is there a circle?", max_new_tokens=8, choices=["yes", "no"], logprobs=True,
                        top_logprobs=20)
    first = r.logprobs[0]
    assert abs(np.exp([t.logprob for t in first.top]).sum() - 1) < 1e-6  # all the mass is on allowed tokens
    assert all(("yes".startswith(t.token) or "no".startswith(t.token)) for t in first.top)
    assert r.logprobs[-1].token_id == ort_rt.tokenizer.eos_id


def test_logit_bias_bans_and_forces(rt):
    base = rt.generate(prompt=PROMPT, max_new_tokens=8)
    banned = base.token_ids[0]
    r = rt.generate(prompt=PROMPT, max_new_tokens=8, logit_bias={banned: -100})
    assert banned not in r.token_ids
    forced = (banned + 5) % rt.tokenizer.vocab_size
    r = rt.generate(prompt=PROMPT, max_new_tokens=3, logit_bias={forced: 100}, ignore_eos=True)
    assert r.token_ids == [forced] * 3
    with pytest.raises(EdgeVLMError, match="vocabulary"):
        rt.generate(prompt=PROMPT, max_new_tokens=2, logit_bias={10**6: 1.0})


def test_presence_and_frequency_penalties_shift_the_reported_distribution(ort_rt):
    """Greedy with top_logprobs: at each step the penalised distribution is the plain one minus
    ``count * frequency + presence`` on the tokens generated so far (renormalised)."""
    kw = dict(prompt=PROMPT, max_new_tokens=10, logprobs=True, top_logprobs=20, ignore_eos=True)
    plain = ort_rt.generate(**kw)
    pen = ort_rt.generate(**kw, presence_penalty=0.5, frequency_penalty=1.5)
    assert pen.token_ids != plain.token_ids or len(set(plain.token_ids)) == len(plain.token_ids)
    n_same = next((i for i, (a, b) in enumerate(zip(plain.token_ids, pen.token_ids)) if a != b), 10)
    for step in range(1, min(n_same + 1, 10)):
        counts: dict[int, int] = {}
        for t in plain.token_ids[:step]:
            counts[t] = counts.get(t, 0) + 1
        want = {t.token_id: t.logprob - counts.get(t.token_id, 0) * 1.5 - (t.token_id in counts) * 0.5
                for t in plain.logprobs[step].top}
        got = {t.token_id: t.logprob for t in pen.logprobs[step].top}
        common = sorted(set(want) & set(got))
        assert len(common) >= 3
        shift = [got[i] - want[i] for i in common]  # equal up to the renormalisation constant
        assert max(shift) - min(shift) < 1e-4, (step, shift)


def test_cli_run_with_a_schema_file_and_choices(onnx_bundle, tmp_path, capsys):
    from edgevlm.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    args = ["run", "--bundle", str(onnx_bundle), "--prompt", PROMPT, "--threads", "1", "--max-new-tokens", "80"]
    assert main([*args, "--json-schema", str(schema), "--json", "--logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(validate(out["text"])) == list(SCHEMA["properties"])  # the schema's key order
    assert len(out["logprobs"]) == len(out["token_ids"])
    assert {len(e["top"]) for e in out["logprobs"]} == {1, 2}  # 1 where the schema allows one token only
    assert main([*args, "--choices", "yes,no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    (tmp_path / "bad.json").write_text('{"type": "nope"}')
    assert main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "nope" in capsys.readouterr().err


def test_docs_overhead_table_is_the_stored_run():
    """docs/structured-output.md's cost table quotes benchmarks/results/constrain_overhead/ort_int4_1.7b.jsonl."""
    from docs_text import DOCS, RESULTS, close, table

    rows = [json.loads(line) for line in
            (RESULTS / "constrain_overhead" / "ort_int4_1.7b.jsonl").read_text().splitlines()]
    by_kind = {r["kind"]: r for r in rows}
    step_ms = by_kind["decode"]["decode_step_ms"]
    shown = table((DOCS / "structured-output.md").read_text(), "| constraint | tokens (runs) |")
    assert sorted(r[0].split()[0] for r in shown) == sorted(set(by_kind) - {"decode"})
    for cells in shown:
        r = by_kind[cells[0].split()[0]]
        mean, p50, p90 = cells[2].split(" / ")
        assert close(mean, r["mask_us_mean"]) and close(p50, r["mask_us_p50"]) and close(p90, r["mask_us_p90"])
        assert close(cells[3], r["first_start_ms"]) and cells[1].startswith(f"{r['tokens']} ({r['runs']})")
        assert close(cells[4].rstrip("%"), 100 * r["mask_us_mean"] / (step_ms * 1e3))
        assert close(cells[5].rstrip("%"), 100 * r["mask_us_mean"] / 52.9e3) and float(cells[5].rstrip("%")) < 5
    assert f"({step_ms:.1f} ms)" in (DOCS / "structured-output.md").read_text()
