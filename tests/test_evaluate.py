"""edgevlm eval: per-type accuracy, majority baseline, the most frequent prediction, predictions file."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, split_records


def test_score_reports_a_constant_answer_as_share_one(shapes_dir):
    from edgevlm.train.evaluate import majority_answers, normalize, score

    records = split_records(shapes_dir, "test")
    predictions: list = []
    result = score(records, lambda rec, q: "Yes.", majority_answers(split_records(shapes_dir, "train")),
                   progress=False, predictions=predictions)
    assert len(predictions) == len(records) == result["overall"]["n"]
    for kind, row in result["per_type"].items():
        answers = [normalize(rec.turns[0][1]) for rec in records if rec.qa_meta[0]["type"] == kind]
        assert row["top_prediction"] == {"answer": "yes", "share": 1.0}
        assert row["accuracy"] == round(answers.count("yes") / len(answers), 4)
    assert all(p["prediction"] == "yes" and p["correct"] == (normalize(p["answer"]) == "yes")
               for p in predictions)


def test_score_top_prediction_share_counts_answers(shapes_dir):
    from edgevlm.train.evaluate import score

    records = [r for r in split_records(shapes_dir, "test") if r.qa_meta[0]["type"] == "colour"][:4]
    assert len(records) == 4
    echo = {rec.id: rec.turns[0][1] for rec in records}  # right on every question but the first
    echo[records[0].id] = "none of them"
    result = score(records, lambda rec, q: echo[rec.id], {}, progress=False)
    row = result["per_type"]["colour"]
    assert row["accuracy"] == 0.75
    said = [a.lower() for a in echo.values()]
    assert said.count(row["top_prediction"]["answer"]) == max(said.count(a) for a in said)
    assert row["top_prediction"]["share"] == max(said.count(a) for a in said) / 4


def test_eval_cli_writes_result_and_predictions(shapes_dir, tmp_path):
    out_json, out_pred = tmp_path / "eval.json", tmp_path / "pred.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "edgevlm.cli", "eval", "--model", "tiny", "--data", str(shapes_dir),
         "--max-records", "6", "--json", str(out_json), "--predictions", str(out_pred)],
        capture_output=True, text=True, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "most frequent prediction" in proc.stdout
    result = json.loads(out_json.read_text())
    rows = [json.loads(line) for line in out_pred.read_text().splitlines()]
    assert len(rows) == 6 == result["overall"]["n"]
    assert {r["id"] for r in rows} == {rec.id for rec in split_records(shapes_dir, "test")[:6]}
    assert abs(sum(r["correct"] for r in rows) / 6 - result["overall"]["accuracy"]) < 1e-4
    for kind, row in result["per_type"].items():
        preds = [r["prediction"] for r in rows if r["type"] == kind]
        assert row["top_prediction"]["share"] == round(preds.count(row["top_prediction"]["answer"]) / len(preds), 4)


def test_eval_cli_answers_through_a_bundle(shapes_dir, tmp_path, tiny_model):
    """--bundle: the same scoring, with the on-device runtime answering (here an fp32 ONNX bundle)."""
    from edgevlm.cli import main
    from edgevlm.export.to_onnx import export_onnx

    bundle = export_onnx(tiny_model, tmp_path / "b", exporter="torchscript", token_check=0, progress=False)
    out_json, out_pred = tmp_path / "eval.json", tmp_path / "pred.jsonl"
    assert main(["eval", "--bundle", str(bundle), "--data", str(shapes_dir), "--max-records", "6",
                 "--json", str(out_json), "--predictions", str(out_pred)]) == 0
    result = json.loads(out_json.read_text())
    assert result["backend"] == "ort" and result["bundle"] == str(bundle) and result["overall"]["n"] == 6
    assert len(out_pred.read_text().splitlines()) == 6
    with pytest.raises(SystemExit) as e:  # one or the other
        main(["eval", "--model", "tiny", "--bundle", str(bundle)])
    assert e.value.code == 2
