"""The README's "Testing" section and .ci/run say the same: the test command, the packages
installed, and the programs hidden in CI's bare-machine step are the suite's PROGRAMS."""

from __future__ import annotations

import re
import shlex
from typing import List

from support import PROGRAMS, ROOT

README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()
TESTING = README.split("\n## Testing\n", 1)[1].split("\n## ", 1)[0]


def _commands(text: str) -> List[str]:
    """The commands of a shell text, continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    return [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def test_the_readme_runs_the_suite_as_ci_does() -> None:
    readme = re.findall(r"^pip install -e .*$", README, re.M)
    assert len(set(readme)) == 1, readme  # the top of the README and "Testing"
    command = readme[0].split("&&", 1)[1].strip()
    assert command in _commands(CI_RUN), f"{command!r} is not what .ci/run runs"
    assert "--durations=15" in command


def test_the_readme_installs_what_ci_installs() -> None:
    ci = next(c for c in _commands(CI_RUN) if c.startswith("apt-get install"))
    ci_packages = []
    for word in ci.split()[2:]:
        if ">" in word or word == "||":  # the redirection of its output
            break
        if not word.startswith("-"):
            ci_packages.append(word)
    lines = re.findall(r"^apt-get install (.*)$", TESTING, re.M)
    assert len(lines) == 1, lines
    assert lines[0].split() == ci_packages


def test_ci_hides_every_program_the_suite_can_drive() -> None:
    step = next(c for c in _commands(CI_RUN) if ".ci/hide-programs" in c)
    hidden = step.split(".ci/hide-programs", 1)[1].split(" -- ", 1)[0].split()
    assert sorted(hidden) == sorted(PROGRAMS)
    assert "-m needs_program" in step
    for name in PROGRAMS:
        assert f"`{name}`" in TESTING, f"README's Testing section: what does {name} turn on?"
