"""The chat API as the ``openai`` client sees it: every field the client can send is honoured or refused
with a 400 naming it (the client's own parameter list is walked), ``response_format`` constrains the
answer so ``.parse()`` with a pydantic model and ``json_object`` always parse (random weights,
sampling on, ONNX and GGUF bundles), logprobs come back sorted, ``logit_bias``, ``stop``, ``seed`` and
the penalties reach the runtime, ``/openapi.json`` is the real schema, ``--strict-model``. Real
uvicorn, openai client, ONNX Runtime and llama.cpp (bundles and helpers from test_serve.py)."""
from __future__ import annotations

import inspect
import json
import math
from typing import Literal

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pydantic import BaseModel  # noqa: E402

from test_serve import (  # noqa: E402,F401  (fixtures)
    MODEL, TIMEOUT, _reference, _serve, _user, gguf_bundle, gguf_server, image_root, onnx_bundle, ort_server,
    small_model,
)

from edgevlm.runtime.serve.schema import NO_EFFECT, REFUSED, ChatRequest  # noqa: E402

CLIENT_ONLY = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}  # never in the body
# a value of each refused field that the server cannot honour
REFUSED_SAMPLES = {
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto", "functions": [{"name": "f", "parameters": {}}], "moderation": {"input": {}},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h", "reasoning_effort": "high", "service_tier": "priority", "store": True,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}], "verbosity": "low",
    "web_search_options": {},
}
NO_EFFECT_SAMPLES = {"user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"},
                     "prompt_cache_key": "conv-1", "parallel_tool_calls": False}


class Scene(BaseModel):
    shape: Literal["circle", "square", "triangle"]
    colour: Literal["red", "green", "blue"]
    present: bool


def _needs_constraints():
    pytest.importorskip("llguidance")


# --- every client field is classified ----------------------------------------------------------------


def test_every_openai_client_field_is_honoured_or_refused():
    from openai.resources.chat.completions import Completions

    sent = set(inspect.signature(Completions.create).parameters) - CLIENT_ONLY
    fields = set(ChatRequest.model_fields)
    unclassified = sent - fields
    assert not unclassified, f"openai client fields this server neither honours nor refuses: {unclassified}"
    assert set(REFUSED) <= fields and set(NO_EFFECT) <= fields and not set(REFUSED) & set(NO_EFFECT)
    assert set(REFUSED_SAMPLES) == set(REFUSED) and set(NO_EFFECT_SAMPLES) == set(NO_EFFECT)


def test_refused_fields_get_400_naming_them_and_the_server_keeps_serving(ort_server):
    ok = {"model": MODEL, "messages": [_user("hi")], "max_tokens": 2}
    cases = {**{k: {**ok, k: v} for k, v in REFUSED_SAMPLES.items()},
             "top_k_unknown": {**ok, "frobnicate": 1}, "n": {**ok, "n": 3},
             "messages[0].role": {**ok, "messages": [{"role": "tool", "content": "x"}]},
             "messages[0].name": {**ok, "messages": [{"role": "user", "content": "hi", "name": "bob"}]},
             "top_logprobs": {**ok, "top_logprobs": 2}, "logit_bias": {**ok, "logit_bias": {"999999": 5}}}
    for name, body in cases.items():
        r = ort_server.post(body)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == (
            "frobnicate" if name == "top_k_unknown" else name), (name, err)
    client = ort_server.client()
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=[_user("hi")], tools=REFUSED_SAMPLES["tools"])
    assert client.chat.completions.create(model=MODEL, messages=[_user("hi")], max_tokens=2).choices[0].message


def test_no_effect_fields_are_accepted_and_change_nothing(ort_server):
    client = ort_server.client()
    base = dict(model=MODEL, messages=[_user("What colour is the circle?")], max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**base).choices[0].message.content
    given = client.chat.completions.create(**base, **NO_EFFECT_SAMPLES, tools=[], tool_choice="none", store=False,
                                           n=1, modalities=["text"])
    assert given.choices[0].message.content == plain


def test_openapi_schema_is_the_real_api(ort_server):
    spec = httpx.get(f"{ort_server.url}/openapi.json", timeout=TIMEOUT).json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    props = spec["components"]["schemas"][ref]["properties"]
    assert {"messages", "response_format", "logprobs", "logit_bias", "stop"} <= set(props)
    assert spec["components"]["schemas"][ref].get("additionalProperties") is False
    assert {"200", "400", "429"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]


def test_strict_model_refuses_other_names(onnx_bundle, image_root):
    s = _serve(onnx_bundle, "ort", image_root, "--strict-model")
    try:
        with pytest.raises(openai.NotFoundError, match="gpt-9"):
            s.client().chat.completions.create(model="gpt-9", messages=[_user("hi")], max_tokens=2)
        assert s.client().chat.completions.create(model=MODEL, messages=[_user("hi")], max_tokens=2).model == MODEL
    finally:
        s.stop()


# --- constrained answers: parse() and json_object -------------------------------------------------------


@pytest.mark.parametrize("server_fixture", ["ort_server", "gguf_server"])
def test_parse_with_a_pydantic_model_returns_the_object(server_fixture, request):
    _needs_constraints()
    server = request.getfixturevalue(server_fixture)
    client = server.client()
    for seed in range(3):  # sampling on: the random model's free text would never parse
        r = client.chat.completions.parse(model=MODEL, messages=[_user("Describe the shape.")], response_format=Scene,
                                          temperature=1.0, seed=seed, max_tokens=120)
        msg = r.choices[0].message
        assert isinstance(msg.parsed, Scene), (seed, msg.content)
        assert r.choices[0].finish_reason == "stop"


def test_json_object_parses_every_time_and_free_text_does_not(ort_server):
    """A random model under ``json_object`` could write one endless string; the loop's budget rule
    closes it in time (docs/structured-output.md), so every answer is one JSON object that ends."""
    _needs_constraints()
    client = ort_server.client()
    ask = dict(model=MODEL, messages=[_user("Answer in JSON.")], temperature=1.0, max_tokens=24)
    free = []
    constrained = ort_server.metric("edgevlm_constrained_requests_total")
    for seed in range(6):
        r = client.chat.completions.create(**ask, seed=seed, response_format={"type": "json_object"})
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop" and isinstance(json.loads(text), dict), (seed, finish, text)
        assert r.usage.completion_tokens <= 24
        free.append(client.chat.completions.create(**ask, seed=seed).choices[0].message.content)
    assert ort_server.metric("edgevlm_constrained_requests_total") == constrained + 6
    parsed = 0
    for text in free:  # the same requests unconstrained: the check above would have failed
        try:
            parsed += isinstance(json.loads(text), dict)
        except ValueError:
            pass
    assert parsed < len(free)


def test_streamed_json_schema_answer_parses(ort_server):
    _needs_constraints()
    chunks = ort_server.client().chat.completions.create(
        model=MODEL, messages=[_user("Describe it.")], temperature=0.8, seed=5, max_tokens=120, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "scene", "schema": Scene.model_json_schema(),
                                                                "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    Scene.model_validate_json(text)


def test_a_bad_schema_is_a_400_naming_response_format(ort_server):
    _needs_constraints()
    r = ort_server.post({"model": MODEL, "messages": [_user("hi")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}, "strict": True}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


# --- logprobs, logit_bias, stop, seed, penalties --------------------------------------------------------


def _check_logprobs(entries, k: int) -> None:
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == k and tops == sorted(tops, reverse=True)
        assert e.logprob <= tops[0] + 1e-6 and e.logprob <= 0
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-4


def test_logprobs_are_returned_sorted_also_in_the_stream(ort_server):
    client = ort_server.client()
    ask = dict(model=MODEL, messages=[_user("What colour is the circle?")], max_tokens=6, temperature=0,
               logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**ask)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    _check_logprobs(entries, 3)
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6
    assert "".join(e.token for e in entries).strip() == r.choices[0].message.content.strip()
    streamed = [e for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None}).choices[0].logprobs is None


def test_logit_bias_stop_seed_and_penalties_reach_the_runtime(ort_server, onnx_bundle):
    client = ort_server.client()
    q = "What colour is the circle?"
    ask = dict(model=MODEL, messages=[_user(q)], max_tokens=12, temperature=0)
    with _reference(onnx_bundle, "ort") as rt:
        token = rt.tokenizer.encode(" blue")[-1]
        biased = client.chat.completions.create(**ask, logit_bias={str(token): 100}).choices[0].message.content
        assert biased == rt.tokenizer.decode([token] * 12)  # +100 outweighs any logit of this model
        plain = client.chat.completions.create(**ask).choices[0].message.content
        cut = plain[len(plain) // 2:][:2]
        assert cut.strip()
        stopped = client.chat.completions.create(**ask, stop=["zzzz", cut]).choices[0].message.content
        assert stopped == plain[:plain.index(cut)]
        pen = dict(frequency_penalty=2.0, presence_penalty=1.0)
        penalised = client.chat.completions.create(**ask, **pen).choices[0].message.content
        want = rt.generate(None, q, max_new_tokens=12, **pen)
        assert penalised == want.text and penalised != plain  # (the penalties change this answer)
    sampled = [client.chat.completions.create(**{**ask, "temperature": 1.0}, seed=s).choices[0].message.content
               for s in (7, 7)]
    assert sampled[0] == sampled[1]


# --- the trained tiny model (conftest's trained_tiny; the make-demo model is not in the suite) ---------


def test_parse_on_the_trained_tiny_model(trained_tiny, trained_data, tmp_path_factory, image_root):
    """The model trained in this session, served from its GGUF bundle: .parse() on ShapesVQA images."""
    _needs_constraints()
    from conftest import split_records, tiny_gguf
    from test_serve import _data_uri

    from edgevlm import load_model

    bundle = tiny_gguf(load_model(str(trained_tiny)).float().eval(), tmp_path_factory.mktemp("trained_gguf") / "b",
                       ["f16"])
    s = _serve(bundle, "llamacpp", image_root)
    try:
        client = s.client()
        for rec in split_records(trained_data, "test")[:3]:
            question = rec.turns[0][0].replace("<image>", "").strip()
            image = _data_uri(open(rec.image_path, "rb").read())
            r = client.chat.completions.parse(model=MODEL, messages=[_user(question, image)], response_format=Scene,
                                              temperature=0.7, seed=1, max_tokens=60)
            assert isinstance(r.choices[0].message.parsed, Scene), r.choices[0].message.content
    finally:
        s.stop()
