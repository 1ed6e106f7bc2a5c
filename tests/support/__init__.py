"""What the test suite shares, written once.

- L{tests.support.waiting}: bounded waits on the real reactor (C{wait},
  C{sleep}, C{eventually}), for the tiers that need a broker or sockets.
- L{tests.support.vhost}: a RabbitMQ virtual host of one's own on the shared
  broker (C{own_vhost}); the C{vhost} fixture of tests/conftest.py uses it.
- L{tests.support.nobroker}: C{OOIDX_TEST_BROKER=none}, the switch that makes
  every use of a broker fail at once (the fast tier runs under it).

The fast tier (tests/fast) needs none of this: it runs on L{magnet.testing}.
"""
