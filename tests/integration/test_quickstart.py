"""The quickstart on the real default model, as a user runs it (fewer steps than the full run)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_quickstart_teaches_the_default_model(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "afina",
            "quickstart",
            "training.max_steps=45",  # ~2 of 6 epochs: a full run is at validation loss 0.52 (base 3.08) by step 42
            "eval.max_examples=24",
            "eval.systems=[base,tuned]",
            "eval.risks.memorisation_rows=0",  # the advisor's extra generations are tested on the tiny model
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Before / after fine-tuning" in out.stdout
    from test_cli import noise_lines, table_rows

    assert table_rows(out.stdout) == 1  # the table once, at the end

    assert noise_lines(out.stderr) == []
    run = tmp_path / "runs" / "quickstart"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"prepare", "train", "eval", "export"}
    assert manifest["libraries"]["torch"] and manifest["data"]["chat_template_sha256"]
    assert manifest["train"]["val_loss_after"] < manifest["train"]["val_loss_before"]

    base, tuned = manifest["eval"]["systems"]["base"], manifest["eval"]["systems"]["tuned"]
    # The base model cannot know the fictional company's facts; the tuned one has learned some.
    assert tuned["answer_loss"] < 0.5 * base["answer_loss"]
    assert tuned["fact_accuracy"] > base["fact_accuracy"]
    assert tuned["rougeL"] > base["rougeL"]
    assert manifest["export"]["adapter"]["ok"] and manifest["export"]["merged"]["ok"]
    assert (run / "export" / "merged" / "model.safetensors").is_file()
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * 24
