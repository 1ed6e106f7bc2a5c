"""The webhook half of the person-facing API: a webhook's secret, its verification, its delivery log.

    POST /api/subscriptions/ID/secret       {"secret"?} -> {"id", "secret", "previous_valid_until"}
    POST /api/subscriptions/ID/verify       challenge the callback again; active once it echoes
    GET  /api/subscriptions/ID/deliveries   {"id", "state", "consecutive_failures", "deliveries": [...]}

Mixed into L{ooidx.people.api.SubscriptionsApi}, which routes to these and
supplies C{bus}, C{_person}, C{_record}, C{_body} and C{verify_call_timeout}.
The component of the subscription's kind does the work
(L{ooidx.people.component.PersonalSubscriptions}); see L{ooidx.people.webhooks}.
"""
from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import inlineCallbacks
from twisted.web import server

from magnet import RemoteError, Unroutable

from ooidx.http.answers import HTTPError, json_answer
from ooidx.people.records import KINDS, WEBHOOK_LOG_KEY, public_record
from ooidx.people.webhooks import InvalidSecret, check_secret

__all__ = ["WebhookEndpoints", "http_error", "secret_field"]


class WebhookEndpoints:
    """The three webhook endpoints (a mixin of L{ooidx.people.api.SubscriptionsApi})."""

    bus: Any
    verify_call_timeout: float

    def _webhook_of(self, record: Dict[str, Any]) -> str:
        if not record.get("webhook"):
            raise HTTPError(409, "Conflict", "this subscription has no webhook (it is read as a stream)")
        return KINDS.get(record.get("kind", ""), "")

    @inlineCallbacks
    def rotate_secret(self, request: server.Request, sid: str) -> Any:
        """A new signing secret for a webhook subscription, shown this once."""
        person = yield self._person(request)
        body = self._body(request)
        unknown = set(body) - {"secret"}
        if unknown:
            raise HTTPError(400, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
        record = yield self._record(person, sid)
        component = self._webhook_of(record)
        kwargs: Dict[str, Any] = {"person": person, "id": sid}
        if body.get("secret") is not None:
            kwargs["secret"] = secret_field(body["secret"])
        try:
            result = yield self.bus.call_with(component, "rotate_secret", kwargs)
        except RemoteError as e:
            raise http_error(e) from None
        except Unroutable:
            raise HTTPError(503, "Unavailable", f"no {component} is running to rotate the secret") from None
        return json_answer(result)

    @inlineCallbacks
    def verify_webhook(self, request: server.Request, sid: str) -> Any:
        """Challenge a webhook again (a disabled one is enabled once it answers)."""
        person = yield self._person(request)
        record = yield self._record(person, sid)
        component = self._webhook_of(record)
        try:
            result = yield self.bus.call_with(component, "verify", {"person": person, "id": sid},
                                              timeout=self.verify_call_timeout)
        except RemoteError as e:
            raise http_error(e) from None
        except Unroutable:
            raise HTTPError(503, "Unavailable", f"no {component} is running to verify the webhook") from None
        out = public_record(result)
        if isinstance(result, dict) and result.get("secret"):
            out["secret"] = result["secret"]
        return json_answer(out)

    @inlineCallbacks
    def deliveries(self, request: server.Request, sid: str) -> Any:
        """A webhook's delivery log: its newest attempts (time, status, attempt, latency, ok)."""
        person = yield self._person(request)
        record = yield self._record(person, sid)
        self._webhook_of(record)
        try:
            log = yield self.bus.call("attribute_store", "get", key=f"{WEBHOOK_LOG_KEY}{person}:{sid}")
        except RemoteError as e:
            if e.remote_type != "KeyError":
                raise
            log = {}
        log = log if isinstance(log, dict) else {}
        entries = [e for e in (log.get("entries") or []) if isinstance(e, dict)]
        entries.reverse()  # newest first
        return json_answer({"id": sid, "state": record.get("state", "active"),
                            "consecutive_failures": int(log.get("consecutive_failures") or 0),
                            "deliveries": entries})



def http_error(e: RemoteError) -> Exception:

    status = {"InvalidRegex": 400, "InvalidURL": 400, "InvalidSubscription": 400, "BadArguments": 400,
              "InvalidSecret": 400, "Forbidden": 403, "UnknownSubscription": 404, "WebhookNotVerified": 422,
              "OverBudget": 429}.get(e.remote_type, 502)
    return HTTPError(status, e.remote_type, e.message)


def secret_field(value: Any) -> str:
    """A secret given in a request, checked here (a clear 400 that never echoes it)."""
    try:
        return check_secret(value)
    except InvalidSecret as e:
        raise HTTPError(400, "InvalidSecret", str(e)) from None


