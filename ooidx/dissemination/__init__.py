"""Dissemination: publications routed to subscribers, events, notices, the persister."""
