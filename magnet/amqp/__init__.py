"""The AMQP 0-9-1 transport: magnet on RabbitMQ, through txAMQP.

    transport = from_url("amqp://guest:guest@127.0.0.1:5672/", reactor)
    transport.start()

One thing per module:

  - L{magnet.amqp.wire}: the spec file, broker URLs, field tables, content
    properties and frame bytes (pure data, no reactor);
  - L{magnet.amqp.protocol}: frames in and out over txAMQP's client, the
    fast-path frame reader, heartbeats;
  - L{magnet.amqp.channels}: a consumer's channel and the publishing
    channel (deliveries, publisher confirms);
  - L{magnet.amqp.tls}: the TLS options of an C{amqps://} URL, and why a TLS
    link was refused;
  - L{magnet.amqp.connection}: the link (connect, reconnect with backoff
    across a cluster's URLs, waiting for the link, close);
  - L{magnet.amqp.publishing}: confirmed publishes, refused ones published
    again, publishes held while the broker blocks publishers;
  - L{magnet.amqp.transport}: L{AMQPTransport}, what the bus uses
    (declarations replayed after every reconnect, consumers).

This package exports what the rest of the code uses; the private names below
are for the tests and fuzzers that drive the frame reader directly.
"""
from magnet.amqp.channels import AMQPConsumer, AMQPDelivery, _ConsumerChannel, _PublishChannel  # noqa: F401
from magnet.amqp.protocol import CLIENT_PROPERTIES, ChannelError, _AMQPProtocol  # noqa: F401
from magnet.amqp.transport import AMQPTransport, from_url
from magnet.amqp.wire import BrokerURL, decode_properties, decode_table, encode_table, load_spec, parse_url

__all__ = ["AMQPTransport", "AMQPConsumer", "AMQPDelivery", "BrokerURL", "ChannelError", "CLIENT_PROPERTIES",
           "from_url", "load_spec", "parse_url", "decode_table", "encode_table", "decode_properties"]
