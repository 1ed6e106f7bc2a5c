"""People's subscriptions: their queues, webhooks and event streams."""
