"""environment.yml is the README's set-up: the same pinned packages and the same extras as scripts/setup.sh,
and every extra it names exists in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def setup_sh_installs() -> tuple[set[str], set[str]]:
    """(pinned requirements, extras of the project) that scripts/setup.sh installs with pip."""
    pins, extras = set(), set()
    for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines():
        line = line.split("#", 1)[0]
        if "pip install" not in line:
            continue
        pins |= set(re.findall(r"\b([A-Za-z][\w.-]*==[\w.+-]+)", line))
        for group in re.findall(r"\.\[([\w,]+)\]", line):
            extras |= set(group.split(","))
    return pins, extras


def environment_yml_installs() -> tuple[set[str], set[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {p for p in pip if "==" in p}
    extras = {e for p in pip for group in re.findall(r"\.\[([\w,]+)\]", p) for e in group.split(",")}
    return pins, extras


def test_environment_yml_equals_the_readme_setup():
    setup_pins, setup_extras = setup_sh_installs()
    env_pins, env_extras = environment_yml_installs()
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= setup_pins and any(p.startswith("timm==") for p in setup_pins)
    assert env_pins == setup_pins, f"pins differ: setup.sh {sorted(setup_pins)}, environment.yml {sorted(env_pins)}"
    assert env_extras == setup_extras, f"extras differ: setup.sh {sorted(setup_extras)}, environment.yml {sorted(env_extras)}"
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert setup_extras <= declared


def test_the_pinned_timm_is_the_one_installed_here():
    import timm

    pins, _ = setup_sh_installs()
    assert f"timm=={timm.__version__}" in pins
