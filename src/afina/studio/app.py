"""`afina studio`: a local web app over the run directories, on FastAPI (as `afina serve`).

Pages: /  (runs), /compare, /new (data, schema, recipe form, estimate), /runs/NAME/{prepare,train,eval,
export,chat}. JSON API under /api; /chat/NAME/... is `afina serve`'s own app for the run (its chat page and
OpenAI-compatible API, with its request and feedback log in NAME/logs).

The recipe is the source of truth: the studio writes NAME/recipe.yaml and starts `python -m afina STAGE
recipe.yaml` (studio/jobs.py). Bound to 127.0.0.1 by default; elsewhere it needs an API key (or --insecure),
as `afina serve` does. Every refusal is JSON {"error", "problems"} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from afina import __version__
from afina.config import ServeConfig
from afina.rundir import RunDir
from afina.studio import pages
from afina.studio.forms import recipe_from_values
from afina.studio.jobs import Jobs, log_tail
from afina.studio.paths import DATA_SUFFIXES, UPLOADS, StudioError, check_run_name, check_upload_name, inside
from afina.studio.runs import (
    list_runs,
    progress,
    read_json,
    read_metrics,
    recipe_diff,
    run_recipe,
    summary,
    train_result,
)

COOKIE = "afina_studio_key"
STATIC = {"studio.js": "text/javascript", "studio.css": "text/css"}
FILES = {  # what /runs/NAME/file/KIND serves: fixed paths inside the run, nothing else
    "data-report": ("data/report.html", "text/html"),
    "eval-report": ("eval/report.html", "text/html"),
    "training-plot": ("plots/training.png", "image/png"),
}


@dataclass
class StudioSettings:
    runs_dir: Path
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    insecure: bool = False
    max_upload_bytes: int = 256 << 20


@dataclass
class StudioState:
    settings: StudioSettings
    jobs: Jobs
    served: dict[str, tuple[Any, list[str]]] = field(default_factory=dict)  # run -> (serve app, model names)
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def uploads(self) -> Path:
        return self.settings.runs_dir / ".uploads"

    def run_root(self, name: str, must_exist: bool = True) -> Path:
        root = self.settings.runs_dir / check_run_name(name)
        if root.is_symlink():
            raise StudioError(400, f"run '{name}' is a symbolic link, which the studio does not follow")
        if must_exist and not root.is_dir():
            raise StudioError(404, f"no run named '{name}' in {self.settings.runs_dir}")
        return root

    def data_file(self, spec: str) -> Path:
        """A data path as the browser names it: uploads/FILE, or a path inside the data folder."""
        if spec.startswith(UPLOADS + "/"):
            path = inside(self.uploads, spec[len(UPLOADS) + 1 :], "data file")
        else:
            path = inside(self.settings.data_dir, spec, "data file")
        if not path.exists():
            raise StudioError(400, f"data file {spec!r} not found")
        return path


def studio_state(request: Request) -> StudioState:
    return request.app.state.studio


# ---------------------------------------------------------------------------------------------- guard


class Guard:
    """Before any route: the API key (when one is set), same-origin for changes, and /chat/NAME/ handed to
    the run's serve app."""

    def __init__(self, app, state: StudioState):
        from afina.serve.app import is_loopback

        self.app, self.state = app, state
        self.local_only = is_loopback(state.settings.host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path = scope["path"]
        key = self.state.settings.api_key
        if key and path not in ("/login",) and not path.startswith("/static/") and not _has_key(headers, key):
            if path.startswith(("/api/", "/chat/")) or scope["method"] != "GET":
                return await _send(send, JSONResponse({"error": "missing or wrong API key"}, 401), scope, receive)
            return await _send(send, RedirectResponse("/login", 303), scope, receive)
        if self.local_only and not _is_local(headers.get("host", "")):
            # A page of another site whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name.
            body = {"error": f"host {headers.get('host')!r} refused: the studio answers to 127.0.0.1 or localhost"}
            return await _send(send, JSONResponse(body, 403), scope, receive)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin and origin != "null" and urllib.parse.urlsplit(origin).netloc != headers.get("host"):
                body = {"error": f"cross-site request from {origin} refused"}
                return await _send(send, JSONResponse(body, 403), scope, receive)
        if path.startswith("/chat/"):
            return await self.chat(scope, receive, send, path)
        return await self.app(scope, receive, send)

    async def chat(self, scope, receive, send, path: str):
        name, slash, rest = path[len("/chat/") :].partition("/")
        try:
            check_run_name(name)
        except StudioError as exc:
            return await _send(send, JSONResponse({"error": exc.message}, 400), scope, receive)
        if not slash:
            return await _send(send, RedirectResponse(f"/chat/{name}/", 307), scope, receive)
        served = self.state.served.get(name)
        if served is None:
            message = f"run '{name}' is not loaded for chat: open /runs/{name}/chat and load it"
            return await _send(send, JSONResponse({"error": message}, 409), scope, receive)
        inner = {**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode(), "root_path": ""}
        return await served[0](inner, receive, send)


def _is_local(host: str) -> bool:
    from afina.serve.app import is_loopback

    name = urllib.parse.urlsplit("//" + host).hostname or ""
    return is_loopback(name)


def _has_key(headers: dict[str, str], key: str) -> bool:
    given = headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not token:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                token = urllib.parse.unquote(value)
    return hmac.compare_digest(token.encode(), key.encode())


async def _send(send, response: Response, scope, receive):
    await response(scope, receive, send)


async def studio_error(request: Request, exc: StudioError):
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": exc.message, "problems": exc.problems}, exc.status)
    return HTMLResponse(pages.message_page("Not possible", exc.message, exc.status), exc.status)


# ---------------------------------------------------------------------------------------------- pages


async def runs_view(request: Request):
    state = studio_state(request)
    return HTMLResponse(pages.runs_page(list_runs(state.settings.runs_dir), state.jobs.running()))


async def compare_view(request: Request, a: str, b: str):
    state = studio_state(request)
    sides: list[dict[str, Any]] = []
    for name in (a, b):
        root = state.run_root(name)
        manifest = RunDir(root).read_manifest()
        systems = (manifest.get("eval") or {}).get("systems") or {}
        scores = {f"{s} {m}": v for s, ms in systems.items() if s in ("base", "tuned") for m, v in ms.items()}
        sides.append(
            {
                "name": name,
                "recipe": run_recipe(root),
                "summary": summary(root),
                "eval": scores,
                "metrics": read_metrics(RunDir(root)),
            }
        )
    sides[0]["diff"] = _recipe_differences(sides[0]["recipe"], sides[1]["recipe"])
    return HTMLResponse(pages.compare_page(sides[0], sides[1]))


def _recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [d for d in recipe_diff(a, b) if d[0] not in ("name",)]


async def new_view(request: Request, run: str | None = None, data: str | None = None):
    state = studio_state(request)
    values: dict[str, Any] = {}
    data_path = data or ""
    if run:
        root = state.run_root(run)
        from afina.studio.runs import flatten

        recipe = run_recipe(root)
        values = flatten({k: v for k, v in recipe.items() if k not in ("data",)})
        data_section = recipe.get("data") or {}
        values.update(flatten(data_section, "data"))
        values["data.fields"] = data_section.get("fields") or {}
        values["name"] = run
        data_path = _spec_for(state, data_section.get("path")) or data_path
    return HTMLResponse(pages.new_run_page(_data_files(state), values, data_path, run, state.settings.max_upload_bytes))


def _spec_for(state: StudioState, path: str | None) -> str | None:
    """The browser's name for a recipe's absolute data path (uploads/FILE or a path in the data folder)."""
    if not path:
        return None
    p = Path(path)
    for root, prefix in ((state.uploads, UPLOADS + "/"), (state.settings.data_dir, "")):
        if p.is_relative_to(root):
            return prefix + p.relative_to(root).as_posix()
    return None


def _data_files(state: StudioState) -> list[dict[str, Any]]:
    found = []
    if state.uploads.is_dir():
        for path in sorted(state.uploads.iterdir()):
            if path.is_file() and not path.is_symlink() and path.suffix.lower() in DATA_SUFFIXES:
                found.append({"path": f"{UPLOADS}/{path.name}", "size": path.stat().st_size})
    root = state.settings.data_dir
    runs = state.settings.runs_dir.resolve()
    for depth_glob in ("*", "*/*"):
        for path in sorted(root.glob(depth_glob)):
            rel = path.relative_to(root)
            if (
                path.is_file()
                and path.suffix.lower() in DATA_SUFFIXES
                and not any(part.startswith(".") for part in rel.parts)
                and not path.is_symlink()
                and not path.resolve().is_relative_to(runs)
            ):
                found.append({"path": rel.as_posix(), "size": path.stat().st_size})
    return found[:500]


async def run_view(request: Request, name: str, view: str):
    state = studio_state(request)
    root = state.run_root(name)
    run = RunDir(root)
    job = state.jobs.status(root)
    panel = pages.job_panel(name, job, log_tail(job))
    if view == "prepare":
        return HTMLResponse(pages.prepare_page(name, read_json(run.data / "report.json"), panel))
    if view == "train":
        rows = read_metrics(run)
        has_checkpoint = (root / "checkpoints").is_dir() and any((root / "checkpoints").glob("step-*"))
        series = pages.curve_series("", rows)
        running = bool(job and job.get("running"))
        result = None if running else train_result(run.read_manifest())
        return HTMLResponse(
            pages.train_page(name, panel, has_checkpoint, series, progress(run_recipe(root), rows, running), result)
        )
    if view == "eval":
        return HTMLResponse(pages.eval_page(name, read_json(run.eval / "metrics.json"), panel))
    if view == "export":
        from afina.export.gguf_convert import llama_cpp_missing

        formats = ((run_recipe(root).get("export") or {}).get("formats")) or ["adapter", "merged"]
        exports = run.read_manifest().get("export")
        return HTMLResponse(pages.export_page(name, formats, exports, panel, llama_cpp_missing()))
    if view == "chat":
        requests = root / "logs" / "requests.jsonl"
        count = sum(1 for _ in requests.open(encoding="utf-8")) if requests.is_file() else 0
        loaded = state.served.get(name)
        return HTMLResponse(pages.chat_page(name, loaded[1] if loaded else None, count))
    raise StudioError(404, f"no view {view!r}; views: {', '.join(pages.RUN_VIEWS)}")


async def run_home(request: Request, name: str):
    """A run's page: the view of its next stage."""
    root = studio_state(request).run_root(name)
    return RedirectResponse(f"/runs/{name}/{pages.next_view(summary(root))}", 303)


async def run_file(request: Request, name: str, kind: str):
    state = studio_state(request)
    root = state.run_root(name)
    if kind not in FILES:
        raise StudioError(404, f"no file kind {kind!r}; kinds: {', '.join(FILES)}")
    relative, media = FILES[kind]
    path = inside(root, relative, "file")
    if not path.is_file():
        raise StudioError(404, f"{relative} not written yet: run the stage that writes it")
    return Response(path.read_bytes(), media_type=media)


async def static_file(name: str):
    if name not in STATIC:
        raise StudioError(404, f"no static file {name!r}")
    text = (resources.files("afina.studio") / "static" / name).read_text(encoding="utf-8")
    return Response(text, media_type=STATIC[name])


async def login_form():
    return HTMLResponse(pages.login_page())


async def login(request: Request):
    state = studio_state(request)
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", errors="replace"))
    given = (form.get("key") or [""])[0]
    if not state.settings.api_key or not hmac.compare_digest(given.encode(), state.settings.api_key.encode()):
        return HTMLResponse(pages.login_page("wrong API key"), 401)
    response = RedirectResponse("/", 303)
    response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
    return response


# ---------------------------------------------------------------------------------------------- API


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise StudioError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise StudioError(400, "the request body must be a JSON object")
    return body


async def api_runs(request: Request):
    state = studio_state(request)
    running = state.jobs.running()
    return {"runs": list_runs(state.settings.runs_dir), "running": running[0] if running else None}


async def api_run(request: Request, name: str):
    state = studio_state(request)
    root = state.run_root(name)
    job = state.jobs.status(root)
    return {"summary": summary(root), "job": job, "log": log_tail(job)}


async def api_files(request: Request):
    return {"files": _data_files(studio_state(request))}


async def api_upload(request: Request, name: str):
    """The file is the request body (no multipart): streamed to disk, refused with 413 past the limit."""
    state = studio_state(request)
    check_upload_name(name)
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    too_large = f"the upload is over the studio's limit of {limit:,} bytes (--max-upload-mb)"
    if declared and declared.isdigit() and int(declared) > limit:
        raise StudioError(413, too_large)
    state.uploads.mkdir(parents=True, exist_ok=True)
    target = inside(state.uploads, name, "upload")
    fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=state.uploads)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise StudioError(413, too_large)
                out.write(chunk)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": f"{UPLOADS}/{name}", "size": size}


async def api_schema(request: Request):
    """The guessed (or chosen) schema and field mapping of a data file's first rows, with a canonical preview."""
    from afina.data.load import DataError, Record, Reject, iter_source
    from afina.data.schema import RowError, guess_schema, to_canonical

    state = studio_state(request)
    body = await json_body(request)
    path = state.data_file(str(body.get("path") or ""))
    schema = str(body.get("schema") or "auto")
    fields = {str(k): str(v) for k, v in (body.get("fields") or {}).items() if v}
    rows, rejects = [], []
    try:
        for item in iter_source(path):
            if isinstance(item, Record):
                rows.append(item.row)
            elif isinstance(item, Reject):
                rejects.append(item.message())
            if len(rows) >= 20 or len(rejects) >= 20:
                break
    except DataError as exc:
        return {"error": str(exc), "columns": []}
    columns = sorted({key for row in rows for key in row})
    result: dict[str, Any] = {"columns": columns, "rows_read": len(rows), "load_problems": rejects[:5]}
    if not rows:
        result["error"] = "no usable row in the first rows of the file" + (f": {rejects[0]}" if rejects else "")
        return result
    try:
        guessed, mapping = guess_schema(rows[0], fields, schema)
        preview = [to_canonical(row, guessed, fields, None) for row in rows[:3]]
    except (RowError, KeyError) as exc:
        result["error"] = str(exc)
        return result
    return {**result, "schema": guessed, "mapping": mapping, "preview": preview}


def _recipe_values(state: StudioState, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    values = body.get("values")
    if not isinstance(values, dict):
        raise StudioError(400, 'give the recipe as {"values": {"key.sub": value, ...}}')
    name = str(values.get("name") or "")
    if not name:
        raise StudioError(422, "the run needs a name", [{"field": "name", "message": "'name': give the run a name"}])
    check_run_name(name)
    values = {k: v for k, v in values.items() if k != "output_dir"}
    values["output_dir"] = str(state.settings.runs_dir.resolve())
    spec = values.get("data.path")
    if spec:
        values["data.path"] = str(state.data_file(str(spec)).resolve())
    elif not values.get("data.sources"):
        raise StudioError(
            422,
            "data.path: choose a data file (upload one or pick one) before saving",
            [{"field": "data.path", "message": "'data.path': choose a data file (upload one or pick one)"}],
        )
    return name, values


async def api_validate(request: Request):
    state = studio_state(request)
    name, values = _recipe_values(state, await json_body(request))
    recipe, data = recipe_from_values(values, f"{state.settings.runs_dir / name / 'recipe.yaml'}")
    return {"valid": True, "yaml": _recipe_yaml(data)}


def _recipe_yaml(data: dict[str, Any]) -> str:
    ordered = {"name": data.get("name"), **{k: v for k, v in data.items() if k != "name"}}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


async def api_save_recipe(request: Request):
    """Validate and write <runs>/NAME/recipe.yaml (the keys the form changed, plus name, output_dir, data.path)."""
    state = studio_state(request)
    body = await json_body(request)
    name, values = _recipe_values(state, body)
    root = state.run_root(name, must_exist=False)
    path = root / "recipe.yaml"
    _, data = recipe_from_values(values, str(path))
    if path.is_file() and not body.get("replace"):
        raise StudioError(
            409, f"run '{name}' already has a recipe: open /new?run={name} to edit it, or pick a new name"
        )
    job = state.jobs.status(root) if root.is_dir() else None
    if job and job["running"]:
        raise StudioError(409, f"run '{name}' is running '{job['stage']}': stop it before changing its recipe")
    text = _recipe_yaml(data)
    from afina.rundir import write_text_atomic

    write_text_atomic(path, text)
    return {"name": name, "path": str(path), "yaml": text}


async def api_estimate(request: Request, name: str):
    """`afina estimate recipe.yaml --memory-only`, as typed (the model's config only; no weights read); with
    `{"time": true}`, `afina estimate recipe.yaml` (the prepared rows, a few timed steps: after prepare, and
    not while a job runs, whose timing it would disturb)."""
    import sys

    state = studio_state(request)
    root = state.run_root(name)
    recipe = root / "recipe.yaml"
    if not recipe.is_file():
        raise StudioError(409, f"run '{name}' has no recipe.yaml yet: save the recipe first")
    timed = (await json_body(request)).get("time") is True
    if timed:
        running = await asyncio.to_thread(state.jobs.running)
        if running is not None:
            other, job = running
            raise StudioError(409, f"'{job['stage']}' of run '{other}' is running: estimate the time when it ends")
        if not RunDir(root).split_path("train").is_file():
            raise StudioError(409, f"run '{name}' is not prepared: run Prepare first (the time comes from its rows)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "afina",
        "estimate",
        str(recipe),
        *([] if timed else ["--memory-only"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=root,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=600)
    except TimeoutError:
        proc.kill()
        raise StudioError(504, "afina estimate took over 10 minutes") from None
    text = out.decode("utf-8", errors="replace")
    noise = ("Loading", "WARNING bitsandbytes", "  warnings.warn")
    lines = [line for line in text.splitlines() if not line.startswith(noise) and "Warning: " not in line]
    return {
        "ok": proc.returncode == 0,
        "fits": proc.returncode == 0 and "does not fit" not in text,
        "output": "\n".join(lines).strip(),
    }


async def api_start(request: Request, name: str):
    state = studio_state(request)
    root = state.run_root(name)
    body = await json_body(request)
    stage = str(body.get("stage") or "")
    extra: list[str] = []
    if stage == "train" and body.get("resume"):
        extra.append("--resume")
    if stage == "export" and body.get("formats") is not None:
        _set_export_formats(state, root, body["formats"])
    job = await asyncio.to_thread(state.jobs.start, root, stage, extra)
    return JSONResponse(job, 202)


def _set_export_formats(state: StudioState, root: Path, formats: Any) -> None:
    """Write the chosen formats into the recipe (the recipe stays the source of truth), validated first."""
    from afina.config import RecipeError, build_recipe, read_recipe_file
    from afina.rundir import write_text_atomic

    path = root / "recipe.yaml"
    data = read_recipe_file(path)
    data.setdefault("export", {})["formats"] = formats
    try:
        build_recipe(data, str(path), root)
    except RecipeError as exc:
        raise StudioError(422, str(exc), [{"field": "export.formats", "message": str(exc)}]) from None
    write_text_atomic(path, _recipe_yaml(data))


async def api_stop(request: Request, name: str):
    state = studio_state(request)
    return state.jobs.stop(state.run_root(name))


async def api_metrics(request: Request, name: str, since: int = 0):
    state = studio_state(request)
    root = state.run_root(name)
    run = RunDir(root)
    rows = read_metrics(run, max(0, since))
    every = read_metrics(run) if since else rows
    job = state.jobs.status(root)
    return {
        "rows": rows,
        "next": max(0, since) + len(rows),
        "progress": progress(run_recipe(root), every, bool(job and job.get("running"))),
        "job": job,
        "log": log_tail(job, 2000),
    }


async def api_serve(request: Request, name: str):
    """Load the run for chat with `afina serve`'s own code: its tuned model and its base, side by side."""
    from afina.models import ModelError
    from afina.serve.app import create_app
    from afina.serve.models import load_served

    state = studio_state(request)
    root = state.run_root(name)
    async with state.loading:
        try:
            served = await asyncio.to_thread(load_served, str(root))
        except (ModelError, FileNotFoundError, KeyError) as exc:
            raise StudioError(409, f"cannot load run '{name}' for chat: {exc} (train it first)") from None
        app = create_app(served, ServeConfig(log_dir=str(root / "logs")))
        state.served.clear()  # one model in memory at a time
        state.served[name] = (app, served.names)
    return {"models": served.names, "tuned": served.default, "base": served.base_name}


async def api_next_data(request: Request, name: str):
    """`afina data from-logs NAME/logs -o uploads/NAME-next.jsonl`: rated and corrected answers -> training rows."""
    from afina.data.from_logs import from_logs
    from afina.data.load import DataError

    state = studio_state(request)
    root = state.run_root(name)
    logs = root / "logs"
    if not (logs / "requests.jsonl").is_file():
        raise StudioError(409, f"run '{name}' has no request log yet: chat with it and rate answers first")
    state.uploads.mkdir(parents=True, exist_ok=True)
    output = state.uploads / f"{name}-next.jsonl"
    try:
        counts = await asyncio.to_thread(from_logs, logs, output)
    except DataError as exc:
        raise StudioError(409, str(exc)) from None
    spec = f"{UPLOADS}/{output.name}"
    return {
        "path": spec,
        "counts": {k: v for k, v in counts.items() if isinstance(v, int)},
        "next": f"/new?data={spec}",
    }


async def api_health(request: Request):
    return {"status": "ok", "version": __version__, "time": time.time()}


def create_app(settings: StudioSettings) -> FastAPI:
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="afina studio", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    state = StudioState(settings, Jobs(settings.runs_dir))
    app.state.studio = state
    app.add_middleware(Guard, state=state)
    app.add_exception_handler(StudioError, studio_error)  # type: ignore[arg-type]
    routes: list[tuple[str, Callable[..., Any], str]] = [
        ("/", runs_view, "GET"),
        ("/compare", compare_view, "GET"),
        ("/new", new_view, "GET"),
        ("/runs/{name}", run_home, "GET"),
        ("/runs/{name}/file/{kind}", run_file, "GET"),
        ("/runs/{name}/{view}", run_view, "GET"),
        ("/static/{name}", static_file, "GET"),
        ("/login", login_form, "GET"),
        ("/login", login, "POST"),
        ("/api/health", api_health, "GET"),
        ("/health", api_health, "GET"),
        ("/api/runs", api_runs, "GET"),
        ("/api/runs/{name}", api_run, "GET"),
        ("/api/files", api_files, "GET"),
        ("/api/uploads", api_upload, "POST"),
        ("/api/schema", api_schema, "POST"),
        ("/api/recipes/validate", api_validate, "POST"),
        ("/api/recipes", api_save_recipe, "POST"),
        ("/api/runs/{name}/estimate", api_estimate, "POST"),
        ("/api/runs/{name}/jobs", api_start, "POST"),
        ("/api/runs/{name}/stop", api_stop, "POST"),
        ("/api/runs/{name}/metrics", api_metrics, "GET"),
        ("/api/runs/{name}/serve", api_serve, "POST"),
        ("/api/runs/{name}/next-data", api_next_data, "POST"),
    ]
    for path, handler, method in routes:
        app.add_api_route(path, handler, methods=[method])
    return app


def studio(settings: StudioSettings) -> None:
    import uvicorn

    from afina.serve.app import check_exposure, is_loopback

    settings.api_key = settings.api_key or os.environ.get("AFINA_API_KEY") or None
    check_exposure(ServeConfig(host=settings.host, api_key=settings.api_key, insecure=settings.insecure))
    app = create_app(settings)
    if not is_loopback(settings.host) and settings.api_key is None:
        print(f"WARNING: the studio is open on {settings.host} WITHOUT an API key (--insecure)")
    print(
        f"afina studio at http://{settings.host}:{settings.port}/ (runs: {settings.runs_dir}, data: "
        f"{settings.data_dir}); Ctrl-C to stop (running jobs go on)"
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
