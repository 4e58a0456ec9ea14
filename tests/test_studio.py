"""`afina studio` at API level (FastAPI's TestClient): every endpoint, a run through every stage as real
background processes (start, stop with a checkpoint, resume), and the bad inputs refused with clear 4xx."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.studio.app import StudioSettings, create_app

# Settings that keep every stage of the tiny model to seconds: what a user would set in the form.
FAST = {
    "training.max_steps": "30",
    "training.batch_size": "2",
    "training.learning_rate": "0.01",
    "training.precision": "fp32",
    "training.log_every": "1",
    "training.eval_every": "10",
    "training.report_to": "[]",
    "training.plots": False,
    "eval.systems": "[base, tuned]",
    "eval.max_new_tokens": "4",
    "eval.forgetting.enabled": False,
    "eval.risks.memorisation_rows": "0",
    "eval.risks.unanswerable_rows": "0",
    "eval.risks.resamples": "100",
    "export.formats": "[adapter]",
}


def qa_rows(n: int = 24) -> list[dict]:
    """Rows whose field names no schema guesses (question/reply): the user maps them."""
    return [
        {
            "question": f"What does code {i % 6} mean? (variant {i})",
            "reply": f"Rinse the filter for {i % 6 + 3} minutes.",
        }
        for i in range(n)
    ]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def studio(tmp_path):
    (tmp_path / "data").mkdir()
    settings = StudioSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_upload_bytes=64 << 10)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as client:
        client.settings = settings  # type: ignore[attr-defined]
        yield client


def wait_for_job(client, name: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/runs/{name}").json()["job"]
        if job and not job["running"]:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job of {name} still running after {timeout} s")


def save_recipe(client, name: str, model: Path, data: str, **extra) -> dict:
    values = {"name": name, "model.name": str(model), "data.path": data, **FAST, **extra}
    response = client.post("/api/recipes", json={"values": values})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_run_through_every_stage_with_stop_and_resume(studio, tiny_model_dir):
    # Data: uploaded; the guess fails (no known field names) and says so; mapping the fields fixes it.
    up = studio.post("/api/uploads?name=support.jsonl", content=jsonl(qa_rows()))
    assert up.status_code == 200 and up.json()["path"] == "uploads/support.jsonl"
    assert "uploads/support.jsonl" in [f["path"] for f in studio.get("/api/files").json()["files"]]
    guess = studio.post("/api/schema", json={"path": "uploads/support.jsonl"}).json()
    assert guess["columns"] == ["question", "reply"] and "cannot tell the schema" in guess["error"]
    fields = {"prompt": "question", "completion": "reply"}
    mapped = studio.post(
        "/api/schema", json={"path": "uploads/support.jsonl", "schema": "prompt_completion", "fields": fields}
    ).json()
    assert mapped["schema"] == "prompt_completion" and mapped["mapping"] == "prompt=question, completion=reply"
    assert mapped["preview"][0]["messages"][-1] == {"role": "assistant", "content": "Rinse the filter for 3 minutes."}

    # Recipe: an invalid value is a 422 naming the field, with the CLI's message; then saved as YAML.
    values = {"name": "first", "model.name": str(tiny_model_dir), "data.path": "uploads/support.jsonl", **FAST}
    values.update({"data.schema": "prompt_completion", "data.fields": json.dumps(fields)})
    bad = studio.post("/api/recipes", json={"values": {**values, "training.learning_rate": "fast"}})
    assert bad.status_code == 422
    assert bad.json()["problems"] == [
        {
            "field": "training.learning_rate",
            "message": "'training.learning_rate': Input should be a valid number, unable to parse string as a "
            "number (given: 'fast')",
        }
    ]
    assert "recipe.yaml: the recipe is not valid" in bad.json()["error"]
    assert studio.post("/api/recipes/validate", json={"values": values}).json()["valid"] is True
    saved = studio.post("/api/recipes", json={"values": values}).json()
    recipe_file = Path(saved["path"])
    from afina.config import load_recipe

    recipe = load_recipe(recipe_file)  # what the CLI reads
    assert recipe.data.fields == fields and recipe.training.max_steps == 30 and recipe.export.formats == ["adapter"]
    assert recipe.run_dir == studio.settings.runs_dir.resolve() / "first"
    again = studio.post("/api/recipes", json={"values": values})
    assert again.status_code == 409 and "already has a recipe" in again.json()["error"]
    assert studio.post("/api/recipes", json={"values": values, "replace": True}).status_code == 200

    estimate = studio.post("/api/runs/first/estimate").json()
    assert estimate["ok"] and "memory per process (estimate)" in estimate["output"] and estimate["fits"]
    assert "time (from" not in estimate["output"]  # memory only: nothing loaded
    early = studio.post("/api/runs/first/estimate", json={"time": True})
    assert early.status_code == 409 and "run Prepare first" in early.json()["error"]

    # Prepare, as a background `python -m afina prepare recipe.yaml`.
    started = studio.post("/api/runs/first/jobs", json={"stage": "prepare"})
    assert started.status_code == 202 and started.json()["command"][-2:] == ["prepare", str(recipe_file)]
    assert (recipe_file.parent / "studio" / "job.json").is_file()
    assert wait_for_job(studio, "first")["returncode"] == 0
    page = studio.get("/runs/first/prepare").text
    assert "rows per step" in page and "prompt_completion" in page and "token-length histogram" in page

    # After prepare: memory from the real rows, and the time from a few measured steps.
    timed = studio.post("/api/runs/first/estimate", json={"time": True}).json()
    assert timed["ok"] and "s/step" in timed["output"] and "30 steps in the run" in timed["output"], timed["output"]

    # Train; stop once the curve has started (SIGTERM: a checkpoint, exit 130); resume to the end.
    assert studio.post("/api/runs/first/jobs", json={"stage": "train"}).status_code == 202
    busy = studio.post("/api/runs/first/jobs", json={"stage": "eval"})
    assert busy.status_code == 409 and "'train' of run 'first' is running" in busy.json()["error"]
    deadline = time.time() + 240
    while not studio.get("/api/runs/first/metrics").json()["rows"]:
        assert time.time() < deadline, studio.get("/api/runs/first").json()["log"]
        time.sleep(0.2)
    assert studio.post("/api/runs/first/stop").status_code == 200
    stopped = wait_for_job(studio, "first")
    assert stopped["returncode"] == 130, studio.get("/api/runs/first").json()["log"]
    assert any((recipe_file.parent / "checkpoints").glob("step-*"))
    assert studio.post("/api/runs/first/stop").status_code == 409
    live = studio.get("/api/runs/first/metrics").json()
    assert 0 < live["progress"]["step"] < 30 and live["progress"]["total"] == 30
    resumed = studio.post("/api/runs/first/jobs", json={"stage": "train", "resume": True})
    assert resumed.json()["command"][-1] == "--resume"
    assert wait_for_job(studio, "first")["returncode"] == 0
    rows = studio.get("/api/runs/first/metrics").json()["rows"]
    assert [r["step"] for r in rows] == list(range(1, 31)) and any("val_loss" in r for r in rows)
    assert studio.get("/api/runs/first/metrics?since=29").json()["rows"] == rows[29:]

    # Evaluate and export: the pages show what the stages wrote.
    assert studio.post("/api/runs/first/jobs", json={"stage": "eval"}).status_code == 202
    assert wait_for_job(studio, "first")["returncode"] == 0
    page = studio.get("/runs/first/eval").text
    assert "Systems × metrics" in page and "Recommendation" in page and "eval/report.html" in page
    assert "<html" in studio.get("/runs/first/file/eval-report").text
    export = studio.post("/api/runs/first/jobs", json={"stage": "export", "formats": ["adapter", "merged"]})
    assert export.status_code == 202 and load_recipe(recipe_file).export.formats == ["adapter", "merged"]
    assert wait_for_job(studio, "first")["returncode"] == 0
    page = studio.get("/runs/first/export").text
    assert page.count("<strong>verified</strong>") == 2

    # Runs list and headline numbers.
    run = studio.get("/api/runs").json()["runs"][0]
    assert run["name"] == "first" and run["stages"] == ["prepare", "train", "eval", "export"]
    assert run["metric"] and run["val_loss"] is not None and run["wall_time_s"] > 0
    assert "first" in studio.get("/").text

    # Chat through `afina serve`'s app: base and tuned, feedback, and the next training file.
    assert studio.post("/api/runs/first/next-data").status_code == 409  # nothing logged yet
    assert studio.get("/chat/first/v1/models").status_code == 409  # not loaded
    loaded = studio.post("/api/runs/first/serve").json()
    assert loaded["tuned"] == "first" and loaded["base"] == tiny_model_dir.name
    assert "afina chat" in studio.get("/chat/first/").text  # serve's own chat page, under the run
    ids = []
    for model in (loaded["base"], loaded["tuned"]):
        answer = studio.post(
            "/chat/first/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "What does code 2 mean?"}], "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    fixed = "Rinse the filter for 5 minutes."
    assert (
        studio.post("/chat/first/v1/feedback", json={"id": ids[1], "rating": -1, "correction": fixed}).status_code
        == 200
    )
    assert studio.post("/chat/first/v1/feedback", json={"id": ids[0], "rating": 1}).status_code == 200
    built = studio.post("/api/runs/first/next-data").json()
    # The correction always becomes a row; the base's answer too when the random tiny model wrote any text.
    assert built["path"] == "uploads/first-next.jsonl" and built["counts"]["corrected"] == 1
    assert built["counts"]["written"] + built["counts"]["left_out_empty"] == 2
    rows = [json.loads(line) for line in (studio.settings.runs_dir / ".uploads" / "first-next.jsonl").open()]
    assert [{"role": "user", "content": "What does code 2 mean?"}, {"role": "assistant", "content": fixed}] in [
        r["messages"] for r in rows
    ]
    assert "uploads/first-next.jsonl" in studio.get(built["next"]).text  # a new run from it, one click away

    # A second run from the new file, then the two side by side.
    save_recipe(studio, "second", tiny_model_dir, "uploads/first-next.jsonl", **{"method.r": "8"})
    compare = studio.get("/compare?a=first&b=second").text
    assert "method.r" in compare and "loss by step, both runs" in compare
    for view in ("prepare", "train", "eval", "export", "chat"):
        assert studio.get(f"/runs/second/{view}").status_code == 200


def test_bad_paths_and_names_are_refused_with_400(studio, tmp_path):
    data = studio.settings.data_dir
    (data / "ok.jsonl").write_bytes(jsonl(qa_rows(2)))
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(jsonl(qa_rows(2)))
    os.symlink(secret, data / "link.jsonl")
    (data / "sub").mkdir()
    os.symlink(tmp_path, data / "sub" / "up")
    for path in ("../secret.jsonl", str(secret), "sub/../../secret.jsonl", "link.jsonl", "sub/up/secret.jsonl", ""):
        response = studio.post("/api/schema", json={"path": path})
        assert response.status_code == 400, path
        assert response.json()["error"].startswith("data file"), response.json()
    assert "link.jsonl" not in json.dumps(studio.get("/api/files").json())
    assert studio.post("/api/schema", json={"path": "ok.jsonl"}).status_code == 200
    # Recipes: the data path is checked the same way; run names cannot leave the runs folder.
    values = {"name": "r", "data.path": "../secret.jsonl"}
    assert studio.post("/api/recipes", json={"values": values}).status_code == 400
    for name in ("..", ".hidden", "a b", "x%2F..%2F..%2Fetc"):
        response = studio.post("/api/recipes", json={"values": {"name": name, "data.path": "ok.jsonl"}})
        assert response.status_code == 400 and "run name" in response.json()["error"], name
    for name in ("%2E%2E", ".hidden"):
        assert studio.get(f"/api/runs/{name}").status_code == 400
        assert studio.post(f"/api/runs/{name}/jobs", json={"stage": "train"}).status_code == 400
    os.symlink(tmp_path, studio.settings.runs_dir / "linked")
    assert studio.get("/api/runs/linked").status_code == 400
    assert studio.get("/runs/nothere/train").status_code == 404
    assert studio.get("/runs/linked/file/eval-report").status_code == 400
    assert studio.get("/runs/x/file/..%2F..%2Fmanifest.json").status_code in (400, 404)
    # Uploads: a plain data file name only.
    for name in ("../x.jsonl", "/etc/x.jsonl", "a/b.jsonl", ".x.jsonl", "x.sh"):
        assert studio.post(f"/api/uploads?name={name}", content=b"{}\n").status_code == 400, name


def test_uploads_over_the_limit_get_413(studio):
    limit = studio.settings.max_upload_bytes
    response = studio.post("/api/uploads?name=big.jsonl", content=b"x" * (limit + 1))
    assert response.status_code == 413 and f"{limit:,} bytes" in response.json()["error"]

    def chunks():  # no content-length: counted while streaming
        for _ in range(limit // 1024 + 2):
            yield b"y" * 1024

    assert studio.post("/api/uploads?name=big.jsonl", content=chunks()).status_code == 413
    assert not list((studio.settings.runs_dir / ".uploads").iterdir())  # nothing half-written is left
    assert studio.post("/api/uploads?name=small.jsonl", content=b"x" * limit).status_code == 200


def test_recipe_problems_are_422_naming_each_field(studio):
    (studio.settings.data_dir / "ok.jsonl").write_bytes(jsonl(qa_rows(2)))
    values = {"name": "r", "data.path": "ok.jsonl", "method.r": "0", "trainig.epochs": "2", "task": "poems"}
    response = studio.post("/api/recipes", json={"values": values})
    assert response.status_code == 422
    problems = {p["field"]: p["message"] for p in response.json()["problems"]}
    assert problems["method.r"] == "'method.r': Input should be greater than or equal to 1 (given: 0)"
    assert problems["trainig"].startswith("unknown key 'trainig'") and "Did you mean 'training'" in problems["trainig"]
    assert "'task'" in problems["task"]
    # The same messages as the CLI prints for the same recipe.
    from afina.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["method.r=0"])
    assert problems["method.r"] in str(err.value)
    missing = studio.post("/api/recipes", json={"values": {"name": "r"}})
    assert missing.status_code == 422 and missing.json()["problems"][0]["field"] == "data.path"
    assert studio.post("/api/recipes", json={"values": {"data.path": "ok.jsonl"}}).status_code == 422
    assert studio.post("/api/recipes", content=b"not json").status_code == 400
    assert not (studio.settings.runs_dir / "r").exists()


def test_the_form_has_every_recipe_field_with_its_default_and_help(studio):
    from afina.config import Recipe
    from afina.studio.forms import FIELDS

    page = studio.get("/new").text
    for key in FIELDS:
        if key in ("name", "output_dir", "data.path", "data.schema", "data.fields"):
            continue  # the name is its own input; output dir is the studio's; data fields come from the mapping
        assert f"id='f-{key.replace('.', '-')}'" in page, key
    assert FIELDS["training.learning_rate"].default == Recipe().training.learning_rate
    assert "default: 0.0002" in page and "Examples per micro-batch." in page
    assert FIELDS["method.type"].choices == ("lora", "qlora", "full", "loha", "lokr", "ia3")


def test_one_job_at_a_time_even_for_starts_at_once_and_across_restarts(studio, tiny_model_dir):
    (studio.settings.data_dir / "ok.jsonl").write_bytes(jsonl(qa_rows()))
    for name in ("a", "b"):
        save_recipe(studio, name, tiny_model_dir, "ok.jsonl", **{"data.schema": "prompt_completion"})
    assert studio.post("/api/runs/a/stop").status_code == 409  # nothing running: a reason, not a crash
    codes = []

    def start(name):
        codes.append(studio.post(f"/api/runs/{name}/jobs", json={"stage": "prepare"}).status_code)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202, 409]
    running = studio.get("/api/runs").json()["running"]
    # A studio started again (the browser closed, the studio restarted) finds the job from its pid file.
    with TestClient(create_app(studio.settings), base_url="http://127.0.0.1:7860") as other:
        refused = other.post("/api/runs/b/jobs", json={"stage": "train"})
        assert refused.status_code == 409 and f"run '{running}' is running" in refused.json()["error"]
        assert other.post(f"/api/runs/{running}/stop").status_code == 200
    job = wait_for_job(studio, running)
    assert job["returncode"] != 0
    assert studio.post("/api/runs/a/jobs", json={"stage": "bake"}).status_code == 400
    early = studio.post("/api/runs/a/jobs", json={"stage": "eval"})  # nothing trained yet: says what to run
    assert early.status_code == 409 and "no trained model" in early.json()["error"]
    early = studio.post("/api/runs/a/jobs", json={"stage": "train"})
    assert early.status_code == 409 and "run prepare first" in early.json()["error"]
    assert studio.post("/api/runs/a/jobs", json={"stage": "prepare"}).status_code == 202
    studio.post("/api/runs/a/stop")
    wait_for_job(studio, "a")


def test_a_key_guards_everything_and_other_sites_cannot_post(tmp_path):
    settings = StudioSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path, api_key="s3cret")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/chat/x/v1/models").status_code == 401
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/login", content=b"key=nope").status_code == 401
        signed = client.post("/login", content=b"key=s3cret", follow_redirects=False)
        assert signed.status_code == 303 and "httponly" in signed.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200  # the cookie
        foreign = client.post("/api/recipes", json={"values": {}}, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
    with TestClient(create_app(settings), base_url="http://evil.example:7860") as rebound:  # DNS rebinding
        refused = rebound.get("/api/runs", headers={"Authorization": "Bearer s3cret"})
        assert refused.status_code == 403 and "evil.example" in refused.json()["error"]
    with TestClient(create_app(settings), base_url="http://localhost:7860") as local:
        assert local.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cli_studio_refuses_another_host_without_a_key(capsys):
    from afina.cli import main

    assert main(["studio", "--host", "0.0.0.0", "--runs", "/nonexistent/runs"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_progress_of_a_run_that_trains_until_validation_stops_improving():
    """A recipe without epochs (the default) plans at most AUTO_EPOCHS epochs, and says it is a cap."""
    from afina.config import AUTO_EPOCHS, FALLBACK_EPOCHS
    from afina.studio.runs import progress

    rows = [{"step": 21, "epoch": 1.0, "tokens": 2100, "tokens_per_s": 100.0}]  # 1 s per step
    capped = progress({"training": {"epochs": None, "max_steps": None}}, rows)
    assert capped == {"step": 21, "total": 21 * AUTO_EPOCHS, "at_most": True, "eta_s": 21.0 * (AUTO_EPOCHS - 1)}
    assert progress({}, rows)["total"] == 21 * AUTO_EPOCHS  # a saved recipe.yaml that names no training section
    no_validation = {"data": {"split": {"train": 0.8, "validation": 0.0, "test": 0.2}}}
    assert progress(no_validation, rows)["total"] == 21 * FALLBACK_EPOCHS
    assert progress({"training": {"epochs": 2}}, rows) == {"step": 21, "total": 42, "at_most": False, "eta_s": 21.0}
    assert progress({"training": {"epochs": 2, "max_steps": 30}}, rows)["total"] == 30
    assert progress({"training": {"epochs": None}}, []) == {"step": 0, "total": None, "at_most": True, "eta_s": None}


def test_the_train_page_says_what_a_finished_training_did():
    from afina.studio.runs import progress, train_result

    manifest = {
        "stages": {"train": {"wall_time_s": 826.0}},
        "train": {
            "steps": 210,
            "epochs": 10.0,
            "tokens_per_s": 132.0,
            "val_loss_before": 3.679,
            "val_loss_after": 0.2256,
            "best_step": 168,
            "best_val_loss": 0.2224,
            "stopped": "early stopping: no better validation loss in 2 validations",
        },
    }
    assert train_result(manifest) == (
        "Trained 210 steps (10 epochs) in 13.8 min at 132 tokens/s; validation loss 3.679 -> 0.226 (best 0.222 at "
        "step 168); stopped: early stopping: no better validation loss in 2 validations."
    )
    assert train_result({}) is None
    rows = [{"step": 210, "epoch": 10.0, "tokens": 98630, "tokens_per_s": 132.0}]
    assert progress({}, rows, running=False)["eta_s"] is None  # nothing left once the job has ended


def test_the_export_page_shows_the_numbers_behind_each_verdict():
    from afina.studio.pages import export_detail

    gguf = {
        "size_mb": 100.57,
        "llama_cpp": {"kl_mean": 0.1408, "top1_agreement": 0.9405, "greedy_text_equal": False, "max_kl": 0.15},
        "transformers": {"skipped": "transformers does not read GGUF architecture 'phi3'"},
        "ok": True,
    }
    assert export_detail(gguf) == (
        "100.57 MB; llama.cpp: kl_mean 0.1408, top1_agreement 0.9405, greedy_text_equal False, max_kl 0.15; "
        "transformers: transformers does not read GGUF architecture 'phi3'"
    )
    modelfile = {"template_matches_chat_template": False, "conversations_checked": 3, "ok": False, "failed": "x"}
    assert export_detail(modelfile) == "template DIFFERS from the chat template (3 conversations); failed: x"
