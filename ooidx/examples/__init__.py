"""The example configs, shipped in the package (copies of the checkout's etc/*.yaml).

An installed ooidx (C{pip install .}, no checkout) has no C{etc/}: these
are what C{ooidx config init PATH} writes and what C{twistd ooidx} points at
when it finds no config. tests/fast/cli/test_config_init.py keeps them equal
to etc/.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Tuple

__all__ = ["NAMES", "DIRECTORY", "path", "text", "init_text"]

DIRECTORY = Path(__file__).resolve().parent
#: The examples, by name (the file is NAME.yaml); dx first: the default.
NAMES: Tuple[str, ...] = ("dx", "dx-rabbitmq", "node-edge", "node-worker")

_DATA_DIR = re.compile(r"^data_dir: \.\./var/ooidx(/\S+)?", re.MULTILINE)


def path(name: str) -> Path:
    """The example's file in the package; KeyError for an unknown name."""
    if name not in NAMES:
        raise KeyError(name)
    return DIRECTORY / f"{name}.yaml"


def text(name: str) -> str:
    """The example as the checkout has it (etc/NAME.yaml)."""
    return path(name).read_text(encoding="utf-8")


def init_text(name: str) -> str:
    """The example for a file of its own, anywhere: its data directory is
    C{var/ooidx} beside the file (the checkout's is C{../var/ooidx}, beside etc/)."""
    out = _DATA_DIR.sub(lambda m: f"data_dir: var/ooidx{m.group(1) or ''}", text(name), count=1)
    out = out.replace("# relative to etc/;", "# relative to this file;")
    return out.replace("../var/ooidx is <checkout>/var/ooidx.", "var/ooidx is beside this file.")
