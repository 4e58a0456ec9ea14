"""Switch the served adapter without a restart: `afina serve RUN --watch FILE`.

FILE is the serving file `afina promote --serving FILE` writes when a candidate passes the gate
(JSON with `adapter`: the adapter folder to serve). A watcher thread polls it; when it names another
adapter, the adapter is loaded next to the served ones and the served name (the default model) is
pointed at it, between two generation batches (under ServedModels.lock, which every batch holds):
requests queued meanwhile wait a moment, none fails. The previous adapter is then unloaded. A file
that cannot be used (missing folder, another base model or rope scaling) is reported and ignored:
the server keeps serving what it served.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("afina.serve")


class AdapterWatcher:
    """Polls `path` every `interval` seconds and switches `served`'s default adapter to the one it names."""

    def __init__(self, served, path: str | Path, interval: float = 1.0):
        if not served.adapters or served.default not in served.adapters:
            from afina.models.loader import ModelError

            raise ModelError(
                f"--watch {path}: the served default '{served.default}' is not a LoRA adapter; serve a run "
                "trained with an adapter method to switch adapters without a restart"
            )
        self.served, self.path, self.interval = served, Path(path), interval
        self.current: str | None = None  # the adapter folder the file named when last applied
        self.reloads = 0
        self.errors: list[str] = []
        self._seen: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="afina-adapter-watch", daemon=True)

    def start(self) -> AdapterWatcher:
        self.check()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> bool:
        """Apply the serving file if it changed since the last look; True when the adapter was switched."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        if self._seen == (stat.st_mtime, stat.st_size):
            return False
        self._seen = (stat.st_mtime, stat.st_size)
        try:
            adapter = self._adapter_named()
            if adapter is None or adapter == self.current:
                return False
            self.switch(Path(adapter))
        except Exception as exc:  # a bad file must not stop the server: it keeps serving the current adapter
            message = f"{self.path}: not switched ({exc})"
            self.errors.append(message)
            log.error(message)
            return False
        self.current = adapter
        return True

    def _adapter_named(self) -> str | None:
        text = self.path.read_text(encoding="utf-8").strip()
        if not text:
            return None
        value: Any = json.loads(text) if text.startswith("{") else {"adapter": text}
        if not isinstance(value, dict) or not isinstance(value.get("adapter"), str):
            raise ValueError(
                "the serving file must be JSON with an 'adapter' folder (as `afina promote --serving` writes)"
            )
        return value["adapter"]

    def switch(self, adapter: Path) -> None:
        """Load `adapter` beside the served ones, point the default name at it, unload the one it replaces."""
        from afina.models.rope import read_rope_settings

        served = self.served
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} has no adapter_config.json")
        current_dir = Path(served.model.peft_config[served.adapters[served.default]].base_model_name_or_path or "")
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        if (
            config.get("base_model_name_or_path")
            and current_dir.name
            and Path(config["base_model_name_or_path"]).name != current_dir.name
        ):
            raise ValueError(
                f"the adapter was trained on {config['base_model_name_or_path']}, the server serves {current_dir}"
            )
        if read_rope_settings(adapter) != served.rope:
            raise ValueError("the adapter was trained with other rope scaling (afina_rope.json) than the served ones")
        peft_name = f"reloaded{self.reloads + 1}"
        with served.lock:  # between two batches: no generation runs while adapters change
            served.model.load_adapter(str(adapter), adapter_name=peft_name)
            old = served.adapters[served.default]
            served.adapters[served.default] = peft_name
            if old not in served.adapters.values():
                served.model.set_adapter(peft_name)  # never delete the active adapter
                served.model.delete_adapter(old)
            served.model.eval()
            self.reloads += 1
        log.warning("now serving %s as '%s'", adapter, served.default)
