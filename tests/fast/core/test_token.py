"""The operator token: made once, kept private, reused, never logged."""
from __future__ import annotations

import os
import stat
from typing import Any, List

from twisted.logger import Logger, formatEvent

from ooidx.config import load
from ooidx.node.token import TOKEN_FILE, TokenError, ensure_token, find_token

from tests.fast.core.support import FastCase, expand

CONFIGURED = "configured-token-0123456789"


def write_config(tmp_path: Any, token: Any = None, data_dir: str = "data") -> str:
    path = tmp_path / "dx.yaml"
    text = f"broker: memory://\ndata_dir: {data_dir}\n"
    if token is not None:
        text += f"security:\n  token: {token}\n"
    path.write_text(text)
    return str(path)


class Captured:
    def __init__(self) -> None:
        self.events: List[dict] = []
        self.log = Logger(namespace="test", observer=self.events.append)

    def text(self) -> str:
        # Everything an event carries, not just its formatted line.
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


@expand
class TokenTests(FastCase):
    def test_made_at_first_start_private_and_reused(self) -> None:
        tmp_path = self.tmp_path()
        config = load(write_config(tmp_path))
        assert not os.path.exists(config.data_dir)
        first = Captured()
        token = ensure_token(config, first.log)
        path = os.path.join(config.data_dir, TOKEN_FILE)
        assert len(token) >= 32
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(config.data_dir).st_mode) == 0o700
        assert open(path).read().strip() == token
        assert [n for n in os.listdir(config.data_dir)] == [TOKEN_FILE]  # no temporary file left
        assert path in first.text()
        assert token not in first.text()

        again = Captured()
        assert ensure_token(load(config.source), again.log) == token
        assert path in again.text()
        assert token not in again.text()

    def test_existing_data_dir_keeps_its_mode(self) -> None:
        tmp_path = self.tmp_path()
        (tmp_path / "data").mkdir(mode=0o750)
        os.chmod(tmp_path / "data", 0o750)
        config = load(write_config(tmp_path))
        ensure_token(config, Captured().log)
        assert stat.S_IMODE(os.stat(config.data_dir).st_mode) == 0o750
        assert stat.S_IMODE(os.stat(os.path.join(config.data_dir, TOKEN_FILE)).st_mode) == 0o600

    def test_token_from_config_wins_and_is_not_written(self) -> None:
        tmp_path = self.tmp_path()
        config = load(write_config(tmp_path, token=CONFIGURED))
        captured = Captured()
        assert ensure_token(config, captured.log) == CONFIGURED
        assert not os.path.exists(os.path.join(config.data_dir, TOKEN_FILE))
        assert CONFIGURED not in captured.text()

    def test_a_readable_token_file_is_made_private(self) -> None:
        tmp_path = self.tmp_path()
        config = load(write_config(tmp_path))
        token = ensure_token(config, Captured().log)
        path = os.path.join(config.data_dir, TOKEN_FILE)
        os.chmod(path, 0o644)
        captured = Captured()
        assert ensure_token(config, captured.log) == token
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert "readable by others" in captured.text()
        assert token not in captured.text()

    def test_a_garbled_token_file_is_an_error_naming_the_file(self) -> None:
        tmp_path = self.tmp_path()
        config = load(write_config(tmp_path))
        os.makedirs(config.data_dir)
        path = os.path.join(config.data_dir, TOKEN_FILE)
        with open(path, "w") as f:
            f.write("short\n")
        with self.assertRaises(TokenError) as e:
            ensure_token(config, Captured().log)
        assert path in str(e.exception)
        assert "short" not in str(e.exception)

    def test_data_dir_that_cannot_be_made_is_an_error_naming_it(self) -> None:
        tmp_path = self.tmp_path()
        (tmp_path / "blocked").write_text("a file where the data directory's parent should be")
        config = load(write_config(tmp_path, data_dir="blocked/data"))
        with self.assertRaises(TokenError) as e:
            ensure_token(config, Captured().log)
        assert config.data_dir in str(e.exception)

    def test_find_token(self) -> None:
        tmp_path = self.tmp_path()
        config_path = write_config(tmp_path)
        assert find_token(config_path) is None
        assert find_token() is None
        token = ensure_token(load(config_path), Captured().log)
        assert find_token(config_path) == token
        assert find_token(data_dir=str(tmp_path / "data")) == token
        (tmp_path / "other").mkdir()
        assert find_token(write_config(tmp_path / "other", token=CONFIGURED)) == CONFIGURED
