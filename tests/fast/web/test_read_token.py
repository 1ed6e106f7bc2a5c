"""Reading the management API needs the token by default when the web port is not on loopback."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ooidx.web.app import Web


def web(interface: str, read_token: Optional[bool]) -> Web:
    config: Any = SimpleNamespace(http=SimpleNamespace(web_port=0, interface=interface, allowed_hosts=()),
                                  security=SimpleNamespace(read_token=read_token), components={},
                                  logging=SimpleNamespace(access=False))
    return Web.from_config("web", SimpleNamespace(clock=Clock()), config, node="n", token="t" * 20)  # type: ignore[arg-type]


class ReadTokenTests(SynchronousTestCase):
    def test_default_follows_the_interface(self) -> None:
        self.assertFalse(web("127.0.0.1", None).read_token)
        self.assertFalse(web("::1", None).read_token)
        self.assertTrue(web("0.0.0.0", None).read_token)
        self.assertTrue(web("", None).read_token)
        self.assertTrue(web("10.0.0.5", None).read_token)

    def test_the_config_decides_when_it_says(self) -> None:
        self.assertFalse(web("0.0.0.0", False).read_token)
        self.assertTrue(web("127.0.0.1", True).read_token)
