"""What the test suite shares, written once.

- L{tests.support.waiting}: bounded waits on the real reactor (C{wait},
  C{sleep}, C{eventually}), for the tiers that need a broker or sockets.
- L{tests.support.vhost}: a RabbitMQ virtual host of one's own on the shared
  broker (C{own_vhost}); the C{vhost} fixture of tests/conftest.py uses it.
- L{tests.support.nobroker}: C{OOIDX_TEST_BROKER=none}, the switch that makes
  every use of a broker fail at once (the fast tier runs under it).
- L{tests.support.node}: a running C{twistd -n ooidx} seen from outside, and
  plain HTTP to it (C{http_get}, C{http_request}, C{api_call}), never through
  a proxy from the environment.
- L{tests.support.amqp_link}: magnet's AMQP link over a C{StringTransport}
  (C{frame}, C{link}, C{linked}), for the fast tier's tests of what the
  transport does with a broker's frames.
- L{tests.support.doubles}: components' operations in memory to serve on a
  bus (C{FakeStore}, C{FakePubSub}, C{EchoStore}, C{CallTarget},
  C{PubSubListing}, C{FakeNotificationApi}), for either tier.
- L{tests.support.attribute_store}: the attribute store's checks, run on
  SQLite by the fast tier and on PostgreSQL by tests/ooidx.

The fast tier (tests/fast) otherwise runs on L{magnet.testing}; what only it
shares is in tests/fast/core/support.py (C{FastCase}, C{drive}, C{bus_up},
C{bus_down}), tests/fast/magnet/base.py and tests/fast/web/edge_support.py.
"""
