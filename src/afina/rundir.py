"""The run directory is the contract between stages; manifest.json records what happened.

runs/<name>/
  manifest.json   recipe, data and template hashes, library versions, seed, stage times
  data/           train/validation/test JSONL (canonical rows), rejects.jsonl, report.json, report.html
  adapter/        the trained LoRA adapter (peft layout)   | model/ for full fine-tuning
  metrics.jsonl   one line per logged training step
  eval/           predictions.jsonl, metrics.json, report.html
  export/         merged Hugging Face model, copied adapter
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")
LIBRARIES = ("afina", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic")


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class JsonlWriter:
    """Append rows to a JSONL file written atomically: the file appears whole on close(), or not at all."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._fh.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._fh.close()
        Path(self._tmp).unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    data = property(lambda self: self.root / "data")
    adapter = property(lambda self: self.root / "adapter")
    model = property(lambda self: self.root / "model")
    eval = property(lambda self: self.root / "eval")
    export = property(lambda self: self.root / "export")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    manifest_path = property(lambda self: self.root / "manifest.json")

    def split_path(self, split: str) -> Path:
        return self.data / f"{split}.jsonl"

    def require(self, path: Path, stage: str) -> Path:
        """A file an earlier stage writes; a clear error when that stage has not run."""
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `afina {stage}` on this recipe first")
        return path

    def read_manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        return {}

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    @contextmanager
    def stage(self, name: str, recipe: dict[str, Any], seed: int) -> Iterator[None]:
        """Record the recipe, versions and seed, then the stage's wall time once it finishes."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.update_manifest(recipe=recipe, seed=seed, libraries=library_versions())
        start = time.perf_counter()
        yield
        self.update_manifest(
            stages={
                name: {
                    "wall_time_s": round(time.perf_counter() - start, 2),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            }
        )
