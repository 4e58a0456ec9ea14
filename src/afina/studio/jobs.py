"""Stage commands run as detached background processes, one at a time.

A job is `python -m afina <stage> recipe.yaml [...]`, the same command a user types, started in its own
session so that it outlives the browser tab and the studio itself. Its pid, command and log live in
`<run>/studio/job.json` and `<run>/studio/<stage>.log`; a studio restarted later finds a running job there.
Stopping sends SIGTERM, on which training saves a checkpoint and exits (`afina train --resume` continues).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from afina.rundir import write_json_atomic
from afina.studio.paths import StudioError

STAGES = ("prepare", "train", "eval", "export")


def job_file(run_root: Path) -> Path:
    return run_root / "studio" / "job.json"


def read_job(run_root: Path) -> dict[str, Any] | None:
    import json

    path = job_file(run_root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """A live afina process with this pid (a zombie, or a pid reused by another program, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        return state != "Z" and b"afina" in cmdline
    return True


class Jobs:
    """Starts, watches and stops the studio's stage processes; at most one runs at a time (one machine)."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.lock = threading.Lock()
        self.children: dict[int, subprocess.Popen] = {}

    def status(self, run_root: Path) -> dict[str, Any] | None:
        """The run's last job, with `running` true while its process lives."""
        job = read_job(run_root)
        if job is None:
            return None
        child = self.children.get(job["pid"])
        running = child.poll() is None if child is not None else pid_alive(job["pid"])
        job["running"] = running and job.get("returncode") is None
        if not job["running"] and child is not None and job.get("returncode") is None:
            job["returncode"] = child.returncode
        return job

    def running(self) -> tuple[str, dict[str, Any]] | None:
        """(run name, job) of the job running now, if any."""
        if not self.runs_dir.is_dir():
            return None
        for root in sorted(self.runs_dir.iterdir()):
            if root.is_dir() and not root.is_symlink() and job_file(root).is_file():
                job = self.status(root)
                if job and job["running"]:
                    return root.name, job
        return None

    def start(self, run_root: Path, stage: str, extra: list[str] | None = None) -> dict[str, Any]:
        if stage not in STAGES:
            raise StudioError(400, f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        recipe = run_root / "recipe.yaml"
        if not recipe.is_file():
            raise StudioError(409, f"run '{run_root.name}' has no recipe.yaml yet: save its recipe first (New run)")
        with self.lock:  # two starts at once: one wins, the other sees its job and gets 409
            busy = self.running()
            if busy is not None:
                name, job = busy
                raise StudioError(
                    409,
                    f"'{job['stage']}' of run '{name}' is running (pid {job['pid']}, since {job['started_at']}); "
                    "one job runs at a time on this machine: wait for it or stop it first",
                )
            missing = missing_before(run_root, stage)
            if missing:
                raise StudioError(409, f"run '{run_root.name}' cannot {stage} yet: {missing}")
            log = run_root / "studio" / f"{stage}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "afina", stage, str(recipe), *(extra or [])]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with log.open("wb") as out:
                child = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=run_root,
                    env=env,
                    start_new_session=True,  # its own session: closing the studio does not stop it
                )
            job = {
                "stage": stage,
                "pid": child.pid,
                "command": command,
                "log": str(log),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "started": time.time(),
                "returncode": None,
            }
            write_json_atomic(job_file(run_root), job)
            self.children[child.pid] = child
        threading.Thread(target=self._wait, args=(run_root, child), daemon=True).start()
        return {**job, "running": True}

    def _wait(self, run_root: Path, child: subprocess.Popen) -> None:
        """Reap the child and record its exit status (a studio restarted meanwhile finds the pid gone instead)."""
        code = child.wait()
        job = read_job(run_root)
        if job is not None and job["pid"] == child.pid:
            job.update(returncode=code, finished=time.time())
            write_json_atomic(job_file(run_root), job)

    def stop(self, run_root: Path) -> dict[str, Any]:
        job = self.status(run_root)
        if job is None or not job["running"]:
            raise StudioError(409, f"run '{run_root.name}' has no job running: nothing to stop")
        os.kill(job["pid"], signal.SIGTERM)  # training saves a checkpoint and exits; resume continues it
        return {**job, "stopping": True}


def missing_before(run_root: Path, stage: str) -> str | None:
    """What an earlier stage must write before `stage` can run, or None."""
    if stage == "train" and not (run_root / "data" / "train.jsonl").is_file():
        return "its data is not prepared (run prepare first)"
    if stage in ("eval", "export") and not ((run_root / "adapter").is_dir() or (run_root / "model").is_dir()):
        return "it has no trained model (train it, or resume its training, first)"
    return None


def log_tail(job: dict[str, Any] | None, chars: int = 4000) -> str:
    """The end of a job's log, with progress-bar redraws reduced to their last state."""
    if not job:
        return ""
    path = Path(job["log"])
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - chars * 4))
        text = fh.read().decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines)[-chars:]
