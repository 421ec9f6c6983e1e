"""The README stays true: its examples run, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^\d\. [^:]+: `([^`]+)`", README, flags=re.MULTILINE)
    assert len(commands) == 2, "the README must open with the main-job and test commands"
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci_script.splitlines()


def test_the_readme_commands_name_tox_environments_that_exist() -> None:
    commands = re.findall(r"^\d\. [^:]+: `([^`]+)`", README, flags=re.MULTILINE)
    tox_ini = (ROOT / "tox.ini").read_text(encoding="utf-8")
    for command in commands:
        env = re.search(r"tox -e (\S+)", command)
        assert env, command
        assert f"[testenv:{env.group(1)}]" in tox_ini, command
