"""What every harness in fuzz/ shares: the repository on sys.path, libFuzzer
defaults that suit this project, and a check that an exception is one the
target documents.

A harness runs as ``.venv/bin/python fuzz/fuzz_NAME.py [libFuzzer flags]
[corpus dirs or input files]``; see fuzz/README.md.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Flags added unless given: one input may take at most this many seconds
#: (a hang is a crash: "bounded time"), and the process this much memory.
DEFAULT_FLAGS = ("-timeout=10", "-rss_limit_mb=3072", "-max_len=8192")


def argv(extra: tuple = ()) -> List[str]:
    args = list(sys.argv)
    given = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    for flag in DEFAULT_FLAGS + tuple(extra):
        if flag.split("=", 1)[0] not in given:
            args.insert(1, flag)
    return args


def run(test_one_input: Callable[[bytes], None], extra: tuple = ()) -> None:
    """Fuzz C{test_one_input}; crashes go to fuzz/artifacts/ unless
    -artifact_prefix says otherwise."""
    import atheris

    artifacts = os.path.join(ROOT, "fuzz", "artifacts") + os.sep
    os.makedirs(artifacts, exist_ok=True)
    atheris.Setup(argv(extra + (f"-artifact_prefix={artifacts}",)), test_one_input)
    atheris.Fuzz()
