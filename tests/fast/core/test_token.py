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


class TokenEdgeTests(FastCase):
    """The token file's rarer paths: unreadable, not ASCII, a race with
    another process, no hard links, a file system that refuses the write."""

    def config(self) -> Any:
        return load(write_config(self.tmp_path()), environ={})

    def test_an_unreadable_token_file_is_an_error(self) -> None:
        from ooidx.node.token import read_token_file

        path = self.tmp_path() / "token"
        path.mkdir()  # a directory: open() fails with IsADirectoryError
        with self.assertRaises(TokenError) as e:
            read_token_file(str(path))
        assert str(e.exception).startswith(f"{path}: cannot read the operator token: ")

    def test_a_token_file_that_is_not_ascii_is_an_error(self) -> None:
        from ooidx.node.token import read_token_file

        path = self.tmp_path() / "token"
        path.write_bytes("é".encode() * 20)
        with self.assertRaises(TokenError) as e:
            read_token_file(str(path))
        assert str(e.exception) == f"{path}: the operator token file is not ASCII text"

    def test_another_process_made_it_first(self) -> None:
        from ooidx.node import token as token_module

        config = self.config()
        theirs = "their-token-0123456789abcdef"

        def link(src: str, dst: str) -> None:
            with open(dst, "w") as f:
                f.write(theirs + "\n")
            raise FileExistsError(dst)

        self.patch(token_module.os, "link", link)
        assert ensure_token(config, Captured().log) == theirs
        assert sorted(os.listdir(config.data_dir)) == [TOKEN_FILE]  # the temporary file is gone

    def test_the_token_file_vanishing_while_being_made_is_an_error(self) -> None:
        from ooidx.node import token as token_module

        config = self.config()
        self.patch(token_module, "_create", lambda data_dir, path: None)
        with self.assertRaises(TokenError) as e:
            ensure_token(config, Captured().log)
        assert "vanished while it was being made" in str(e.exception)

    def test_without_hard_links_the_file_is_made_exclusively(self) -> None:
        from ooidx.node import token as token_module

        config = self.config()

        def no_links(src: str, dst: str) -> None:
            raise OSError(1, "Operation not permitted")

        self.patch(token_module.os, "link", no_links)
        made = ensure_token(config, Captured().log)
        path = os.path.join(config.data_dir, TOKEN_FILE)
        assert open(path).read() == made + "\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert sorted(os.listdir(config.data_dir)) == [TOKEN_FILE]

    def test_without_hard_links_and_a_race_the_other_token_wins(self) -> None:
        from ooidx.node import token as token_module

        config = self.config()
        path = os.path.join(config.data_dir, TOKEN_FILE)
        theirs = "their-token-0123456789abcdef"

        def no_links(src: str, dst: str) -> None:
            with open(path, "w") as f:
                f.write(theirs + "\n")
            raise OSError(1, "Operation not permitted")

        self.patch(token_module.os, "link", no_links)
        assert ensure_token(config, Captured().log) == theirs

    def test_a_write_that_fails_is_an_error_and_leaves_nothing(self) -> None:
        from ooidx.node import token as token_module

        config = self.config()

        def full(fd: int, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        self.patch(token_module.os, "write", full)
        with self.assertRaises(TokenError) as e:
            ensure_token(config, Captured().log)
        assert str(e.exception).endswith("cannot write the operator token: No space left on device")
        assert os.listdir(config.data_dir) == []

    def test_permissions_that_cannot_be_checked_are_logged(self) -> None:
        from ooidx.node import token as token_module

        captured = Captured()
        token_module._tighten(str(self.tmp_path() / "absent"), captured.log)
        assert "cannot check the permissions of" in captured.text()

    def test_find_token_by_data_dir_and_without_anything(self) -> None:
        tmp_path = self.tmp_path()
        assert find_token() is None
        assert find_token(data_dir=str(tmp_path)) is None
        (tmp_path / TOKEN_FILE).write_text("kept-token-0123456789abcdef\n")
        assert find_token(data_dir=str(tmp_path)) == "kept-token-0123456789abcdef"
