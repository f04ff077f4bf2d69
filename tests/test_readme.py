"""The README stays true: its set-up commands match .ci/run, and its core example runs."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    """The first code block: the main job, then the test command that .ci/run runs verbatim."""
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first) == 2 and "dfmpc demo" in first[0]
    test_cmd = first[1].split("#")[0].strip().split("&&")[-1].strip()
    assert test_cmd == "python3 -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci and 'pip install --quiet -e ".[test]"' in ci


def test_core_example_runs():
    """The 'core in ten lines' example executes and gives c >= 0, one per channel."""
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    env = {}
    exec(compile(code, "README core example", "exec"), env)
    assert env["c"].shape == (16,) and np.all(env["c"] >= 0)
