"""People's subscriptions: their queues, webhooks and event streams.

    records.py     what a person and a subscription are (names, ids, queue names, bounds)
    tickets.py     stream tickets (a browser's way to open a stream)
    webhooks.py    webhook POSTs (signed, Standard Webhooks), challenges, the delivery of one subscription's queue
    component.py   the component base user_pub_sub and user_notification share
    sse.py         one Server-Sent Events response
    api.py         the HTTP API the web edge mounts (people, subscriptions, streams, the event tail)
    webhook_api.py its webhook endpoints (secret rotation, verification, the delivery log)
"""
