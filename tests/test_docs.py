"""The documentation names only what exists: every dotted Python name, repository path, config key, config
group option and script that README.md, CONTRIBUTING.md, docs/ and results/README.md mention resolves, so a
rename that leaves the docs behind fails here."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from compconv import CompConvOptions
from compconv.detection.config import DetTrainConfig
from compconv.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CODE = re.compile(r"`([^`\n]+)`")
PYTHON_NAME = re.compile(r"(?<![\w./-])((?:compconv|timm|torch)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./-])((?:results|scripts|configs|docs|compconv|tests|\.ci)/[\w./*-]*[\w*])")
LINK = re.compile(r"\]\(([^)#\s]+)\)")
CONFIG_KEY = re.compile(r"(?<![\w./-])((?:model|data|optim|sched|trainer|logger|head)\.[a-z_][\w.]*)")
GROUP_OPTION = re.compile(r"(?<![\w.+-])(experiment|launcher|debug|trainer|optim|sched|logger|data|head)=([\w,]+)")


def current_lines(text: str) -> str:
    """The text less the lines that speak of history or of errors: a line naming a commit (7+ hex digits) may
    name what existed then, and a line with "unknown" quotes bad input on purpose."""
    return "\n".join(line for line in text.splitlines()
                     if not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", line)
                     and "unknown" not in line)


def mentions(pattern: re.Pattern, text: str, code_blocks: bool = True) -> set[str]:
    """Matches of ``pattern`` inside the inline code (and, with ``code_blocks``, the code blocks) of the current
    lines of a markdown text."""
    text = current_lines(text)
    blocks = re.findall(r"```.*?```", text, flags=re.S) if code_blocks else []
    spans = CODE.findall(re.sub(r"```.*?```", "", text, flags=re.S)) + blocks
    return {m if isinstance(m, str) else "=".join(m) for span in spans for m in pattern.findall(span)}


def config_keys(text: str) -> set[str]:
    """Config keys: an inline span that is a key or sets one (``key=value``), and ``key=`` in code blocks; lines
    about mmdetection's own configs (``--cfg-options``, its ``model.backbone``) are another schema's."""
    text = "\n".join(line for line in text.splitlines() if "--cfg-options" not in line and "mmdet" not in line)
    keys = {m for m in mentions(CONFIG_KEY, text, code_blocks=False)}
    spans = CODE.findall(re.sub(r"```.*?```", "", current_lines(text), flags=re.S))
    inline = {k for k in keys if any(span.strip().lstrip("+") == k or f"{k}=" in span for span in spans)}
    blocks = re.findall(r"```.*?```", current_lines(text), flags=re.S)
    return inline | {m for block in blocks for m in re.findall(CONFIG_KEY.pattern + r"(?==)", block)}


def resolves(name: str) -> bool:
    """Whether ``a.b.c`` is a module (found, not necessarily importable here: an optional integration), or an
    attribute chain of the longest importable module prefix."""
    parts = name.split(".")
    try:
        if importlib.util.find_spec(name) is not None:
            return True
    except (ImportError, ValueError):
        pass
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def key_in_schema(key: str) -> bool:
    """Whether a dotted config key is a field of the classification or detection schema (``model.compconv.*``:
    a CompConv option)."""
    parts = key.split(".")
    if parts[:2] == ["model", "compconv"]:
        return len(parts) == 2 or parts[2] in {f.name for f in dataclasses.fields(CompConvOptions)}
    for schema in (TrainConfig, DetTrainConfig):
        node: Any = schema
        for part in parts:
            if not dataclasses.is_dataclass(node):
                break
            fields = get_type_hints(node)
            if part not in fields:
                node = None
                break
            node = fields[part]
            if node is dict or get_origin(node) is dict:  # a free mapping (model.kwargs): any key below it
                return True
            if get_origin(node) is not None:  # Optional[...]: the dataclass inside
                node = next((a for a in get_args(node) if dataclasses.is_dataclass(a)), node)
        else:
            return True
        if node is not None and not dataclasses.is_dataclass(node) and part == parts[-1]:
            return True
    return False


def texts() -> list[tuple[str, str]]:
    return [(str(path.relative_to(ROOT)), path.read_text()) for path in DOCS]


@pytest.mark.parametrize("doc, text", texts(), ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_dotted_names_resolve(doc, text):
    broken = sorted(name for name in mentions(PYTHON_NAME, text) if not resolves(name.rstrip(".")))
    assert not broken, f"{doc} names Python objects that do not exist: {broken}"


@pytest.mark.parametrize("doc, text", texts(), ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_paths_exist(doc, text):
    base = ROOT if doc in ("README.md", "CONTRIBUTING.md") else (ROOT / doc).parent
    found = {(ROOT, p) for p in mentions(PATH, text)}
    found |= {(base, link) for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)}
    missing = sorted(p for where, p in found if not any(where.glob(p)) and not any(ROOT.glob(p))
                     and not p.startswith("configs/local/"))  # configs/local/ is the user's own (git-ignored)
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc, text", texts(), ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_config_keys_and_group_options_exist(doc, text):
    unknown = sorted(key for key in config_keys(text) if not key_in_schema(key.rstrip(".")))
    options = [m.split("=", 1) for m in mentions(GROUP_OPTION, text)]
    missing = sorted(f"{group}={option}" for group, values in options for option in values.split(",")
                     if option not in ("null", "none") and not (ROOT / "configs" / group / f"{option}.yaml").is_file())
    assert not unknown, f"{doc} names config keys the schema does not have: {unknown}"
    assert not missing, f"{doc} names config group options with no file under configs/: {missing}"


def test_the_checks_catch_a_broken_name(tmp_path):
    """The extractors find what the docs tests rely on (so a passing run is not an empty one)."""
    text = "Use `compconv.inference.no_such_rule`, `results/no_such_table.md`, `trainer.no_such_key=1` and " \
           "`python train_cls.py experiment=no_such_experiment`."
    assert not resolves(next(iter(mentions(PYTHON_NAME, text))))
    assert mentions(PATH, text) == {"results/no_such_table.md"}
    assert config_keys(text) == {"trainer.no_such_key"} and not key_in_schema("trainer.no_such_key")
    assert mentions(GROUP_OPTION, text) == {"experiment=no_such_experiment"}
    assert resolves("compconv.inference.rule_choice") and key_in_schema("model.compconv.c0")
    assert key_in_schema("trainer.epochs") and key_in_schema("model.backbone_checkpoint")


def config_table() -> dict[str, tuple[str, str]]:
    """docs/configs.md's table: each group's options cell and notes cell."""
    table = {}
    for line in (ROOT / "docs" / "configs.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if line.startswith("| `") and len(cells) > 4:
            table[cells[1].split()[0].strip("`")] = (cells[2], cells[3])
    return table


def test_the_config_table_lists_every_group_option():
    """docs/configs.md's table names each option of each config group, so a file added under configs/ is documented
    (``model`` is generated from timm's registry; ``hydra``, ``local`` and ``mmdet`` are not groups a run picks)."""
    cells = {group: set(CODE.findall(options)) for group, (options, _) in config_table().items()}
    groups = [p for p in sorted((ROOT / "configs").iterdir())
              if p.is_dir() and p.name not in ("hydra", "local", "mmdet")]
    unlisted = sorted(group.name for group in groups if group.name not in cells)
    assert groups and not unlisted, f"docs/configs.md's table has no row for these config groups: {unlisted}"
    missing = sorted(f"{group.name}={option.stem}" for group in groups for option in group.glob("*.yaml")
                     if option.stem not in cells[group.name])
    assert not missing, f"docs/configs.md's table does not name these config group options: {missing}"


def test_the_config_table_lists_every_trainer_key():
    """The ``trainer`` row's notes name every field of the trainer schema (the keys a run most often sets)."""
    named = set(re.findall(r"\w+", config_table()["trainer"][1]))
    missing = sorted(f.name for f in dataclasses.fields(get_type_hints(TrainConfig)["trainer"]) if f.name not in named)
    assert not missing, f"docs/configs.md's trainer row does not name: {missing}"
