"""`training.report_to`: TensorBoard, MLflow and W&B get the same metrics at the same steps, the resolved recipe
as parameters and the run's plots as artifacts; read back here with each tracker's own reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from afina.config import RecipeError, load_recipe
from afina.pipeline import evaluate, prepare, train
from afina.rundir import RunDir


def logged_metrics(run: RunDir) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the trackers name it: {"train/loss": {step: value}, "validation/loss": {...}}."""
    out: dict[str, dict[int, float]] = {}
    for line in run.metrics.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = "validation/loss" if key == "val_loss" else f"train/{key}"
                out.setdefault(name, {})[record["step"]] = float(value)
    return out


def trained_run(tiny_recipe, *overrides: str) -> RunDir:
    recipe = tiny_recipe("training.max_steps=4", "training.eval_every=2", "training.log_every=1", *overrides)
    prepare(recipe)
    train(recipe, progress=False)
    return RunDir(recipe.run_dir)


def test_mlflow_run_holds_the_metrics_params_and_plots(tiny_recipe, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'afina[trackers]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = trained_run(tiny_recipe, "training.report_to=[mlflow]")
    assert not (run.root / "tensorboard").exists()  # only the trackers asked for
    client = MlflowClient(tracking_uri=(run.root / "mlruns").resolve().as_uri())
    run_id = json.loads((run.root / "trackers.json").read_text())["mlflow"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "tiny"

    expected = logged_metrics(run)
    assert {"train/loss", "train/lr", "validation/loss"} <= set(expected)
    for name, by_step in expected.items():
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert history == pytest.approx(by_step), name
    assert sorted(expected["validation/loss"]) == [2, 4]

    params = mlflow_run.data.params
    assert params["training.max_steps"] == "4" and params["training.learning_rate"] == "0.01"
    assert params["name"] == "tiny" and params["training.report_to"] == '["mlflow"]'
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "plots")
    }
    assert {"plots/training.png", "metrics.jsonl", "data"} <= artifacts


def test_eval_joins_the_training_run_in_mlflow(tiny_recipe, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'afina[trackers]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe("training.report_to=[mlflow]", "eval.systems=[base,tuned]", "eval.max_examples=4")
    prepare(recipe)
    train(recipe, progress=False)
    evaluate(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    client = MlflowClient(tracking_uri=(run.root / "mlruns").resolve().as_uri())
    run_id = json.loads((run.root / "trackers.json").read_text())["mlflow"]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # the same run, not a second
    systems = json.loads((run.root / "eval" / "metrics.json").read_text())["systems"]
    for system in ("base", "tuned"):
        history = client.get_metric_history(run_id, f"eval/{system}/rougeL")
        assert [(m.step, m.value) for m in history] == [(4, pytest.approx(systems[system]["rougeL"]))]
    assert {f.path for f in client.list_artifacts(run_id, "eval")} == {"eval/report.html", "eval/metrics.json"}
    assert client.get_run(run_id).info.status == "FINISHED"


def wandb_records(path: Path):
    """The records of a W&B offline run file (`run-ID.wandb`): a LevelDB-style log of protobuf `Record`s
    (32 KiB blocks; each chunk: crc32c, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the block's padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_config_and_plots(tiny_recipe, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'afina[trackers]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = trained_run(tiny_recipe, "training.report_to=[tensorboard,wandb]")
    assert list((run.root / "tensorboard").glob("events.out.tfevents.*"))
    (offline,) = (run.root / "wandb").glob("offline-run-*")
    run_id = json.loads((run.root / "trackers.json").read_text())["wandb"]
    assert offline.name.endswith(run_id)

    history: dict[str, dict[int, float]] = {}
    config: dict = {}
    for record in wandb_records(offline / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[row["_step"]] = value
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    expected = logged_metrics(run)
    assert set(history) == set(expected)
    for name, by_step in expected.items():
        assert history[name] == pytest.approx(by_step), name
    assert config["training"]["max_steps"] == 4 and config["model"]["name"] == str(tiny_recipe().model.name)
    assert (offline / "files" / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (offline / "files" / "metrics.jsonl").read_text() == run.metrics.read_text()


def test_unknown_and_missing_trackers_are_clear_errors(tiny_recipe, monkeypatch):
    with pytest.raises(RecipeError, match="training.report_to"):
        load_recipe(None, ["training.report_to=[comet]"])
    import afina.train.trackers as trackers

    monkeypatch.setitem(trackers.TRACKER_PACKAGES, "mlflow", ("afina_no_such_module", "pip install mlflow-skinny"))
    recipe = tiny_recipe("training.report_to=[mlflow]")
    prepare(recipe)
    with pytest.raises(RecipeError, match=r"training.report_to: mlflow is not installed; .*pip install mlflow"):
        train(recipe, progress=False)
    assert not (RunDir(recipe.run_dir).root / "checkpoints").exists()  # stopped before training
