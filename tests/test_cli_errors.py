"""The command line on bad input: one ``edgerazor: error:`` line and exit status 2, never a traceback;
an internal error exits 1 with its traceback; ``--debug`` shows the traceback of any error."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgerazor.cli as cli
import edgerazor.run as run_module
from edgerazor.cli import main
from edgerazor.errors import EdgeRazorError

DEEP = "a: " + "[" * 1000 + "]" * 1000 + "\n"

# (case, file content or None for the special paths, what the one error line must say besides the path)
RECIPES = [
    ("missing", None, "does not exist"),
    ("directory", None, "is a directory"),
    ("name too long", None, "File name too long"),
    ("invalid utf-8", b"name: caf\xe9\n", "is not valid UTF-8 (byte 0xe9 on line 1)"),
    ("empty", b"# nothing but a comment\n", "is empty"),
    ("a list", b"- quant\n- train\n", "the top level must be a mapping of sections (name:, model:, quant:, ...), got list"),
    ("duplicate key", b"train:\n  max_steps: 5\n  max_steps: 6\n", "duplicate key 'max_steps' at line 3 (first at line 2)"),
    ("infinite learning rate", b"train:\n  learning_rate: .inf\n", "train.learning_rate: must be a finite number, got inf"),
    ("negative max_steps", b"train:\n  max_steps: -5\n", "train.max_steps: must be -1 (train for num_epochs) or a positive"),
    ("rho above 1", b"quant:\n  weight:\n    rho: 1.5\n", "quant.weight.rho: Input should be less than or equal to 1 (got 1.5)"),
    ("1000-deep nesting", DEEP.encode(), "nested deeper than 32 levels at line 1"),
]


def _recipe(tmp_path: Path, case: str, content: bytes | None) -> Path:
    if case == "directory":
        return tmp_path
    if case == "name too long":
        return tmp_path / ("r" * 300 + ".yaml")
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_bytes(content)
    return path


def _one_error_line(err: str) -> str:
    """The whole of stderr must be one ``edgerazor: error:`` line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgerazor: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_teacher(monkeypatch):
    """``edgerazor run`` must refuse a bad recipe before it loads any teacher: loading one is a failure here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was loaded for a bad recipe")

    monkeypatch.setattr(run_module, "load_inputs", refuse)
    monkeypatch.setattr(run_module, "demo_inputs", refuse)
    monkeypatch.delenv("EDGERAZOR_DEBUG", raising=False)


@pytest.mark.parametrize(("case", "content", "expected"), RECIPES, ids=[c[0] for c in RECIPES])
def test_bad_recipe_file_is_one_line_naming_file_and_key(tmp_path, capsys, no_teacher, case, content, expected):
    path = _recipe(tmp_path, case, content)
    assert main(["run", "--recipe", str(path)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert str(path) in line and expected in line
    assert captured.out == ""


def test_unreadable_recipe(tmp_path, capsys, no_teacher):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not stop reading (the directory and UTF-8 cases cover it)")
        assert main(["run", "--recipe", str(path)]) == 2
        assert _one_error_line(capsys.readouterr().err).endswith(f"recipe file {path} cannot be read: permission denied")
    finally:
        path.chmod(0o644)


def test_bits_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("quant:\n  weight:\n    group_size: 0\n")
    assert main(["bits", "--model", "qwen3-0.6b", "--recipe", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"invalid recipe {path}: quant.weight.group_size: Input should be greater than 0 (got 0)" in line


def test_set_value_of_the_wrong_kind_names_key_and_override(capsys, no_teacher):
    assert main(["run", "--set", "train.max_steps=abc"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "train.max_steps: Input should be a valid integer" in line and "(got 'abc')" in line
    assert "(from override 'train.max_steps=abc')" in line


def test_set_indexes_list_items(tmp_path, capsys, monkeypatch):
    """``data.sources.0.prompt_field=q`` reaches the recipe ``edgerazor run`` uses; index 1 of one is refused."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  teacher: ./teacher\ndata:\n  eval_fraction: 0.1\n  sources:\n    - path: qa.jsonl\n"
                    "      format: prompt_response\n")

    def report(recipe, teacher, adapter=None, dtype=None):  # stops the run where it would load the teacher
        raise EdgeRazorError(f"would load the teacher with prompt_field={recipe.data.sources[0].prompt_field}")

    monkeypatch.setattr(run_module, "load_inputs", report)
    assert main(["run", "--recipe", str(path), "--set", "data.sources.0.prompt_field=question"]) == 2
    assert _one_error_line(capsys.readouterr().err).endswith("would load the teacher with prompt_field=question")

    assert main(["run", "--recipe", str(path), "--set", "data.sources.1.prompt_field=q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("edgerazor: error: override 'data.sources.1.prompt_field=q': data.sources has 1 item(s), "
                    "so index 1 is out of range")


def test_internal_error_exits_1_with_its_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_cmd_plugins", broken)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    last = err.splitlines()[-1]
    assert last.startswith("edgerazor: internal error: RuntimeError: boom") and "report it" in last


@pytest.mark.parametrize("how", ["option", "option after the command", "environment"])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, no_teacher, monkeypatch, how):
    missing = tmp_path / "nope.yaml"
    argv = ["run", "--recipe", str(missing)]
    if how == "option":
        argv = ["--debug", *argv]
    elif how == "option after the command":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("EDGERAZOR_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RecipeError" in err
    assert err.splitlines()[-1] == f"edgerazor: error: recipe file {missing} does not exist"


@pytest.mark.parametrize(("code", "reason"), [
    (errno.ENOSPC, "No space left on device (free some space or write somewhere else)"),
    (errno.EROFS, "Read-only file system (write somewhere else)"),
    (errno.EACCES, "Permission denied (check its permissions)"),
])
def test_os_errors_are_user_errors_naming_path_and_reason(capsys, monkeypatch, code, reason):
    def write(args):
        raise OSError(code, os.strerror(code), "/data/out/model.gguf")

    monkeypatch.setattr(cli, "_cmd_plugins", write)
    monkeypatch.delenv("EDGERAZOR_DEBUG", raising=False)
    assert main(["plugins"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"edgerazor: error: /data/out/model.gguf: {reason}"


def test_interrupt_exits_130_in_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_plugins", interrupted)
    monkeypatch.delenv("EDGERAZOR_DEBUG", raising=False)
    assert main(["plugins"]) == 130
    assert capsys.readouterr().err == "edgerazor: interrupted\n"


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The installed ``edgerazor`` script, as a user runs it."""
    script = Path(sys.executable).with_name("edgerazor")
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable}")
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  learning_rate: 2.0e-4\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGERAZOR_DEBUG"}
    proc = subprocess.run([str(script), "run", "--recipe", str(path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == (f"edgerazor: error: recipe file {path}: duplicate key 'learning_rate' at line 3 "
                           "(first at line 2); a key may appear once per mapping\n")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
