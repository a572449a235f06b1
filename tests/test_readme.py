"""The README's code blocks run as written.

Python blocks are executed. Shell blocks are checked without side effects: every `make`
line is dry-run (`make -n`, which also checks the variables it sets are used), and every
`pip install` line names only options and extras that exist. `make demo` and `make test`
themselves run in CI (.ci/run)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def test_readme_has_python_and_shell_blocks():
    assert {"python", "sh"} <= {language for language, _ in BLOCKS}


@pytest.mark.parametrize("code", [c for lang, c in BLOCKS if lang == "python"])
def test_python_blocks_run(code, tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)


def shell_lines():
    for language, code in BLOCKS:
        if language == "sh":
            for line in code.splitlines():
                command = line.split("#")[0].strip()
                if command:
                    yield command


@pytest.mark.parametrize("command", [c for c in shell_lines() if c.startswith("make ")])
def test_make_lines_are_real_targets(command):
    result = subprocess.run(["make", "-n", *command.split()[1:]], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "VIRTUAL_ENV": os.path.dirname(os.path.dirname(sys.executable))})
    assert result.returncode == 0, result.stderr
    for assignment in command.split()[1:]:
        if "=" in assignment:
            name = assignment.split("=")[0]
            assert name in open(os.path.join(ROOT, "Makefile")).read(), f"Makefile does not use {name}"


@pytest.mark.parametrize("command", [c for c in shell_lines() if c.startswith("pip ")])
def test_pip_lines_name_real_options_and_extras(command):
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    for extra in re.findall(r"\[(\w+)\]", command):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), f"no extra {extra!r}"
    for option in re.findall(r"(--[\w-]+)", command):
        assert option in ("--no-build-isolation", "--index-url"), option


def test_no_link_to_files_users_do_not_have():
    for path in ("README.md", "docs/chapter7.md"):
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        assert "shared/seed" not in text and "../shared" not in text, path


def test_layout_section_matches_the_tree():
    # Every path the layout lists exists, and every file of csrc/ and pyext/handgrad/ is
    # listed (itself, by a glob such as fused_mlp.*, by its folder, or by name in the text).
    import fnmatch

    block = README.split("## Layout", 1)[1].split("```")[1]
    listed = [line.split()[0].rstrip(",") for line in block.splitlines() if line[:1].strip()]
    files = _tracked()
    for path in listed:
        assert any(fnmatch.fnmatch(f, path.rstrip("/") + "*") for f in files), f"{path} is not in the tree"
    for f in files:
        if f.startswith("csrc/"):
            assert any(fnmatch.fnmatch(f, p) or (p.endswith("/") and f.startswith(p) and p != "csrc/")
                       for p in listed), f"{f} is missing from the README's layout"
        elif f.startswith("pyext/handgrad/") and f.count("/") == 2 and not f.endswith("__init__.py"):
            assert f.rsplit("/", 1)[1] in block, f"{f} is missing from the README's layout"


def _tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    return files
