"""``edgevlm serve`` against generated and hostile requests (benchmarks/serve_fuzz.py at small counts;
docs/serving.md has the large run): schemathesis cases from the server's own /openapi.json, valid and
invalid, get no 5xx; malformed images, a huge body, slowloris clients (408 after --body-timeout while
others are served), clients leaving mid-stream; the server answers a good request after each. Real
uvicorn on 127.0.0.1 and the random tiny ONNX bundle (conftest)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from edgevlm.benchmarks import serve_fuzz  # noqa: E402

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(serve_onnx_bundle, tmp_path_factory):
    from edgevlm.benchmarks.serve_soak import served

    with served(serve_onnx_bundle, [*serve_fuzz.SERVE_ARGS, "--api-key", KEY, "--max-queue", "4",
                                    "--image-root", str(tmp_path_factory.mktemp("fuzz_root"))]) as url:
        yield url


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_generated_requests_from_the_openapi_schema_get_no_5xx(fuzz_server):
    report = serve_fuzz.fuzz(fuzz_server, examples=100, headers=_auth())
    assert report["requests"] >= 200, report
    assert report["server_errors"] == 0, report["failures"]
    assert report["alive_after"]
    codes = {int(s) for s in report["statuses"]}
    assert 200 in codes and 400 in codes, report["statuses"]  # both valid and invalid bodies reached the model


def test_hostile_inputs_get_4xx_and_the_server_keeps_serving(fuzz_server):
    report = serve_fuzz.abuse(fuzz_server, rounds=2, headers=_auth())
    assert report["server_errors"] == 0, report
    assert report["alive_after"] and report["answered_during_slowloris"], report
    s = report["statuses"]
    assert s["huge"] == {"413": 2} and s["slowloris"] == {"408": 2} and s["disconnect"] == {"200": 2}, s
    assert set(s["images"]) <= {"200", "400"} and s["images"].get("400", 0) >= 2 * 5, s  # 5+ are no image
    metrics = httpx.get(f"{fuzz_server}/metrics", timeout=30).text
    assert 'status="5' not in metrics


def test_an_unauthorised_fuzz_gets_401_not_5xx(fuzz_server):
    report = serve_fuzz.fuzz(fuzz_server, examples=10)
    assert report["server_errors"] == 0 and "401" in report["statuses"], report
