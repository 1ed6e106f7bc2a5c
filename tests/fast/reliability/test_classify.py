"""What the reliability suite counts a client's outcome as
(tests/reliability/faultlib.classify), on made-up results: a request the
node never had (refused, or reset before it was handed to the socket) is
not a fault; a request sent and answered by a close or a reset is."""
from __future__ import annotations

from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from tests.reliability.faultlib import classify


def result(status: Any = None, error: Any = None, sent: Any = True, ok: bool = False,
           complete: bool = False) -> Dict[str, Any]:
    return {"url": "http://u/x", "status": status, "error": error, "sent": sent, "ok": ok, "complete": complete,
            "bytes": 0}


class ClassifyTests(SynchronousTestCase):
    def kind(self, r: Dict[str, Any]) -> str:
        counts = classify([r])
        (kind,) = [k for k, n in counts.items() if n]
        return kind

    def test_never_had_by_the_node(self) -> None:
        self.assertEqual(self.kind(result(error="ConnectionRefusedError: [Errno 111]", sent=False)), "refused")
        for error in ("ConnectionResetError: [Errno 104] Connection reset by peer", "BrokenPipeError: [Errno 32]"):
            self.assertEqual(self.kind(result(error=error, sent=False)), "refused", error)

    def test_sent_then_no_answer_is_wrong(self) -> None:
        for error in ("ConnectionResetError: [Errno 104] Connection reset by peer",
                      "RemoteDisconnected: Remote end closed connection without response"):
            self.assertEqual(self.kind(result(error=error, sent=True)), "wrong", error)
        # a result without the flag (an older caller) is judged as sent
        self.assertEqual(self.kind({**result(error="ConnectionResetError: x"), "sent": None}), "wrong")
        self.assertEqual(self.kind(result(error="TimeoutError: timed out", sent=False)), "wrong")

    def test_answers(self) -> None:
        self.assertEqual(self.kind(result(status=200, ok=True, complete=True)), "ok")
        self.assertEqual(self.kind(result(status=503)), "5xx")
        self.assertEqual(self.kind(result(status=200, error="IncompleteRead")), "cut")
        self.assertEqual(self.kind(result(status=404)), "wrong")
