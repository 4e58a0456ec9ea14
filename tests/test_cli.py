"""The CLI as a user types it (a real subprocess)."""

import subprocess
import sys

import pytest

COMMANDS = [
    "prepare",
    "train",
    "estimate",
    "eval",
    "export",
    "run",
    "serve",
    "studio",
    "models",
    "setup",
    "config",
    "quickstart",
]


# Third-party output that tells a user nothing (afina/quiet.py silences it): transformers' weight loading and
# saving bars, the kernels package's offline trust-check warning, bitsandbytes' failed optional-kernel fetch,
# peft's deprecated-property warning, bm25s's DEBUG lines.
THIRD_PARTY_NOISE = (
    "Loading weights",
    "Writing model shards",
    "Skipping publisher trust check",
    "gemm_4bit_forward",
    "is_gradient_checkpointing",
    "DEBUG bm25s",
)


def noise_lines(stderr: str) -> list[str]:
    """stderr lines (progress bars split at their carriage returns) that are third-party chatter or warnings."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return [l for l in lines if any(n in l for n in THIRD_PARTY_NOISE) or "warning" in l.lower()]


def table_rows(stdout: str) -> int:
    """How many times the eval table was printed (its fact-accuracy row starts a line)."""
    return sum(line.startswith("fact accuracy (%)") for line in stdout.splitlines())


def afina(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "afina", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_top_level_help_lists_every_command():
    out = afina("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS + ["config show"])
def test_every_command_has_help(command):
    out = afina(*command.split(), "--help")
    assert out.returncode == 0 and "usage: afina" in out.stdout


def test_config_show_fills_defaults_and_applies_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\ntraining:\n  epochs: 2\n")
    out = afina("config", "show", str(recipe), "method.r=4")
    assert out.returncode == 0, out.stderr
    assert "name: mine" in out.stdout and "epochs: 2.0" in out.stdout and "r: 4" in out.stdout
    assert "learning_rate: 0.0002" in out.stdout  # a default filled in


def test_config_show_names_a_typo_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainig:\n  epochs: 2\n")
    out = afina("config", "show", str(recipe))
    assert out.returncode == 2
    assert "unknown key 'trainig'" in out.stderr and "Did you mean 'training'" in out.stderr


def test_models_lists_the_default():
    out = afina("models")
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout and "installed" in out.stdout


def test_prepare_on_a_missing_file_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  path: none.jsonl\noutput_dir: {tmp_path / 'runs'}\n")
    out = afina("prepare", str(recipe))
    assert out.returncode == 2
    assert str(tmp_path / "none.jsonl") in out.stderr and "not found" in out.stderr


def test_run_goes_through_every_stage(tmp_path, tiny_model_dir):
    from conftest import support_rows, write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", support_rows())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {tiny_model_dir}\n"
        "data:\n  path: rows.jsonl\ntraining:\n  max_steps: 2\n  batch_size: 4\neval:\n  max_new_tokens: 4\n"
        # llama.cpp verifies the GGUF files; transformers' slow second reading is tested in test_export_gguf.py
        "export:\n  gguf_check_transformers: false\n"
    )
    out = afina("run", str(recipe))
    assert out.returncode == 0, out.stderr
    for stage in ("== prepare", "== train", "== eval", "== export", "fact accuracy", "verified"):
        assert stage in out.stdout
    assert noise_lines(out.stderr) == []
    import json

    stages = json.loads((tmp_path / "runs" / "cli" / "manifest.json").read_text())["stages"]
    assert set(stages) == {"prepare", "train", "eval", "export"}
    assert all(s["wall_time_s"] > 0 for s in stages.values())


KERNEL_FETCH = """
import logging, sys
from afina.quiet import quiet_third_party
if sys.argv[1] != "loud":
    quiet_third_party(verbose=sys.argv[1] == "verbose")
logging.basicConfig(level=logging.INFO if sys.argv[1] == "verbose" else logging.WARNING)
from kernels import get_kernel
try:  # what importing bitsandbytes does on a CPU with AVX512-BF16, offline
    get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception as exc:
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward: %s", exc)
"""


def test_the_optional_kernel_fetch_is_one_afina_line_at_most(monkeypatch):
    pytest.importorskip("kernels")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def stderr(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", KERNEL_FETCH, mode], capture_output=True, text=True).stderr

    loud = stderr("loud")  # the libraries left alone: both lines appear
    assert "Skipping publisher trust check" in loud and "gemm_4bit_forward" in loud
    assert noise_lines(stderr("quiet")) == [] and stderr("quiet").strip() == ""
    verbose = stderr("verbose").strip().splitlines()
    assert len(verbose) == 1 and verbose[0].startswith("INFO:afina:") and "built-in kernel" in verbose[0]


def test_overrides_may_follow_the_flags_and_unknown_flags_are_still_refused(capsys):
    from afina.cli import parse_command_line

    args = parse_command_line(["train", "r.yaml", "--nproc-per-node", "2", "training.max_steps=3", "--resume"])
    assert args.overrides == ["training.max_steps=3"] and args.nproc_per_node == 2 and args.resume
    assert parse_command_line(["train", "r.yaml", "method.r=8", "--resume"]).overrides == ["method.r=8"]
    with pytest.raises(SystemExit):
        parse_command_line(["train", "r.yaml", "--bogus", "training.max_steps=3"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
