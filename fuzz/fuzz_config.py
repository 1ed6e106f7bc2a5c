"""Fuzz ooidx.config.parse: the daemon's YAML config file.

An input is the file's bytes, decoded as UTF-8 (undecodable bytes replaced:
ooidx.config.load refuses a file that is not UTF-8 before parse sees it).

Asserts:
  - parse(text, "fuzz.yaml", environ={}) returns a Config or raises
    ConfigError, whose message is one line (no newline); never another
    exception (ValueError from a YAML timestamp, from int(), from urlsplit...)
  - a Config survives its documented round trip: parse(yaml.safe_dump(
    config.to_dict(redact=False))) is an equal Config
and that each input finishes within libFuzzer's -timeout.

    .venv/bin/python fuzz/fuzz_config.py -max_total_time=60 fuzz/corpus-run/config fuzz/corpus/config

fuzz/config.dict (the config's keys and YAML's tokens) is used by default.
"""
from __future__ import annotations

import os

import _harness
import atheris

with atheris.instrument_imports(include=["ooidx.config", "ooidx.config.model", "ooidx.config.parser", "yaml"]):
    import yaml

    from ooidx.config import ConfigError, parse

FILENAME = "/etc/ooidx/fuzz.yaml"


def TestOneInput(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        config = parse(text, FILENAME, environ={})
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, f"ConfigError on several lines: {message!r}"
        assert message.startswith(FILENAME + ": "), message
        return
    again = parse(yaml.safe_dump(config.to_dict(redact=False)), FILENAME, environ={})
    assert again == config, (config, again)


if __name__ == "__main__":
    _harness.run(TestOneInput, extra=("-dict=" + os.path.join(_harness.ROOT, "fuzz", "config.dict"),))
