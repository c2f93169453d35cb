"""Every launch line of the README starts as written: its arguments parse and pass the file's checks at the
world size the line launches (8 or 16 processes), without launching them."""
import importlib
import os
import re
import shlex

import pytest

from helpers import ROOT


def launch_lines():
    """(script, argv, world size) for every `python X.py ...` and `torchrun ... X.py ...` line in the README
    (backslash continuations joined; the text after a `#` is a comment)."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`((?:torchrun|python) [^`]+)`", text)
    found = []
    for line in "\n".join(blocks).splitlines():
        line = line.split(" #")[0].strip()
        for cmd in line.split("&&"):
            words = shlex.split(cmd.strip())
            scripts = [i for i, w in enumerate(words) if re.fullmatch(r"(\S+/)?[a-z_]+\.py", w)]
            if not words or not scripts or words[0] not in ("python", "python3", "torchrun", ".venv/bin/python"):
                continue
            i = scripts[0]
            if os.path.dirname(words[i]):  # a method file is launched from the root (not tests/bench.py)
                continue
            launcher = " ".join(words[:i])
            world = 1
            if words[0] == "torchrun":
                nproc = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", launcher)
                nnodes = re.search(r"--nnodes[= ](\d+)", launcher)
                world = int(nproc.group(1)) * (int(nnodes.group(1)) if nnodes else 1)
            found.append((os.path.basename(words[i]), words[i + 1:], world))
    return found


LINES = launch_lines()


def test_readme_has_launch_lines_for_every_method_file():
    scripts = {s for s, _, _ in LINES}
    methods = {f for f in os.listdir(ROOT) if f.endswith(".py") and f != "common.py"}
    assert methods <= scripts, f"no README launch line for {sorted(methods - scripts)}"
    assert any(w == 8 for _, _, w in LINES) and any(w == 16 for _, _, w in LINES)


@pytest.mark.parametrize("script,argv,world", LINES, ids=[f"{s} x{w} {' '.join(a)}"[:90] for s, a, w in LINES])
def test_readme_launch_line_passes_the_configuration_checks(script, argv, world):
    module = importlib.import_module(script[:-3])
    args = module.get_args(argv)
    module.check_args(args, world)  # a SystemExit here is a launch line that exits at start


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and f != "common.py"))
def test_a_flag_given_with_tiny_wins_over_the_preset(script):
    """`--tiny --lr X` trains at X even when X is the paper's default (a preset must not read a given flag as
    absent because it equals the default)."""
    module = importlib.import_module(script[:-3])
    paper = module.get_args([])
    assert module.get_args(["--tiny", "--lr", str(paper.lr)]).lr == paper.lr
    if paper.epochs is not None:  # (a file whose schedule is per stage has no single default)
        assert module.get_args(["--tiny", f"--epochs={paper.epochs}"]).epochs == paper.epochs
