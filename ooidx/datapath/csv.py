"""csv: a dataset, or its constrained part, as CSV (issue 4; docs/data-path.md).

proxyng posts C{render(url=BASE.dods?CE, dataset=NAME, address=L,
request_id=RID)} for C{GET /datasets/NAME.csv?CE}. The csv component gets
the C{.dods} through the data path like the proxy (C{controller.route} by
URL, to a listen address of its own, so cache hits count), decodes it with
pydap's own parsers (C{pydap.parsers.dds.dds_to_dataset},
C{pydap.handlers.dap.unpack_dap2_data}), and streams CSV to C{L}: status
200, C{Content-Type: text/csv; charset=utf-8}, a header row of variable
names, then one row per element.

Formula cells (CSV injection): a text cell the upstream sent that starts
with C{=}, C{+}, C{-} or C{@}, a tab or a CR (or C{= + - @} after leading
blanks, or their fullwidth forms) would be read as a formula by a
spreadsheet opening the file: C{=HYPERLINK(...)} a live link,
C{+cmd|' /C calc'!A0} a DDE prompt. Such a cell goes out with a C{'} in front
(OWASP's rule; L{escape_cell}), and text cells holding C{;} or a tab are
quoted, so that a spreadsheet whose list separator is one of those does not
split a formula out of them. Numbers stay numbers: numeric variables are
never touched, and a text cell that is a plain decimal number (C{-1.5},
C{+3}, C{-2e-3}) is left alone, since a spreadsheet reads it as that number
and nothing else. C{components.csv.formula_escape: false} in the config
writes every cell as the upstream sent it (no per-request switch: the query
string is the DAP constraint, passed upstream byte for byte).

Layout: every variable is laid out over the dimensions of the variable
with the most dimensions (a Grid counts as its array and its maps). The
others must use a subset of those dimensions (by name, with the same sizes)
and are repeated along the rest, so a 2-D C{sst(time, lat)} with its
coordinates C{time} and C{lat} gives rows C{time,lat,sst}; 1-D variables of
one dimension sit side by side. Variables that do not share dimensions that
way are refused (C{InvalidURL}: ask for them separately).

The C{.dods} is spooled to a temporary file (at most C{max_bytes}), and the
CSV goes out in blocks of rows with the stream's backpressure. Every
failure is answered as an error reply to C{L} (render never raises, so the
post is not retried).
"""
from __future__ import annotations

import csv as _csv
import io
import re
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import RemoteError, StreamError, Timeout, operation
from magnet.rpc import error_reply

from ooidx.datapath.answer import StreamAnswer
from ooidx import dap
from ooidx.component import Component
from ooidx.config import CsvOptions
from ooidx.errors import InvalidURL, UpstreamError, UpstreamTimeout

__all__ = ["CSV", "to_rows", "decode_dods", "escape_cell", "FORMULA_START"]

#: The largest .dods the csv component decodes.
MAX_BYTES = 256 * 1024 * 1024
#: Rows per block written to the stream.
BLOCK_ROWS = 2048
#: How long to wait for the .dods to start arriving.
DEFAULT_ANSWER_TIMEOUT = 75.0
DATA_MARKER = dap.DATA_MARKER
#: What a cell must not start with to be read as text by a spreadsheet (OWASP,
#: "CSV Injection"): = + - @, tab, CR, and the fullwidth = + - @ some
#: spreadsheets fold into them.
FORMULA_START = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
#: A plain decimal number: a spreadsheet reads it as the number, never a formula.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
#: Cells quoted when formulas are escaped: the CSV specials, and ; and tab, the
#: list separators of other locales.
_QUOTE_ESCAPED = re.compile(r'[,"\r\n;\t]')
#: numpy kinds whose cells are text from the upstream (bytes, str, objects)
_TEXT_KINDS = "SUO"


def escape_cell(text: str) -> str:
    """C{text} with a C{'} in front if a spreadsheet would read it as a
    formula: it starts with a tab or a CR, or, after leading blanks, with
    one of C{= + - @} (or their fullwidth forms), and it is not a plain
    decimal number (C{-1.5} stays C{-1.5}: numeric data, not a formula)."""
    if not text:
        return text
    if text[0] in "\t\r":
        return "'" + text
    stripped = text.lstrip()
    if not stripped or stripped[0] not in FORMULA_START or _NUMBER.match(stripped):
        return text
    return "'" + text


def decode_dods(dods: Any) -> Tuple[Any, List[Any]]:
    """(pydap dataset, unpacked data) of a .dods response in a binary file."""
    try:
        return dap.decode_dods(dods, max_dds=1024 * 1024, errors="replace")
    except dap.DodsError as e:
        raise UpstreamError({
            "marker": "the .dods answer has no 'Data:' marker (not a DAP 2 data response)",
            "dds": f"the .dods answer's DDS does not parse: {e.detail}",
        }.get(e.part, f"the .dods answer's data does not decode: {e.detail}")) from None


def _columns(dataset: Any, data: List[Any]) -> List[Tuple[str, Any, Tuple[str, ...]]]:
    """(name, numpy array, dimension names) of every variable, Grids as array + maps."""
    import numpy as np
    from pydap.model import BaseType, GridType, SequenceType, StructureType

    columns: List[Tuple[str, Any, Tuple[str, ...]]] = []
    for var, value in zip(dataset.children(), data):
        if isinstance(var, GridType):
            parts = list(var.children())
            for part, part_value in zip(parts, value):
                columns.append((part.name, np.asarray(part_value), tuple(part.dims or ())))
        elif isinstance(var, BaseType):
            columns.append((var.name, np.asarray(value), tuple(var.dims or ())))
        elif isinstance(var, (SequenceType, StructureType)):
            raise InvalidURL(f"{var.name} is a {type(var).__name__[:-4].lower()}: CSV takes arrays and grids only")
        else:
            raise InvalidURL(f"{getattr(var, 'name', '?')}: not a variable CSV can lay out")
    return columns


def to_rows(dataset: Any, data: List[Any], formula_escape: bool = True) -> Tuple[List[str], Any, int]:
    """(header, an iterator of row blocks (lists of lists of str), row count).
    C{formula_escape}: text cells and the header's names through L{escape_cell}."""
    import numpy as np

    columns = _columns(dataset, data)
    if not columns:
        raise InvalidURL("the constraint selects no variable")
    # the same name twice (a map asked for on its own too): keep the first
    seen: Dict[str, int] = {}
    unique = []
    for name, array, dims in columns:
        if name in seen:
            continue
        seen[name] = len(unique)
        if len(dims) != array.ndim:
            dims = tuple(f"{name}_dim{i}" for i in range(array.ndim))
        unique.append((name, array, dims))
    widest = max(unique, key=lambda c: c[1].ndim)
    dims, shape = widest[2], widest[1].shape
    sizes = dict(zip(dims, shape))
    laid_out = []
    for name, array, own in unique:
        if any(d not in sizes or sizes[d] != n for d, n in zip(own, array.shape)):
            raise InvalidURL(f"{name}{list(own)} does not share the dimensions of {widest[0]}{list(dims)}: "
                             "ask for them separately")
        # put the array's axes in the order of dims, with length-1 axes for the others
        order = sorted(range(len(own)), key=lambda i: dims.index(own[i]))
        moved = np.transpose(array, order) if own else array
        present = [own[i] for i in order]
        reshape = [sizes[d] if d in present else 1 for d in dims]
        laid_out.append(np.reshape(moved, reshape) if dims else np.reshape(moved, ()))
    total = int(np.prod(shape)) if dims else 1
    header = [escape_cell(name) if formula_escape else name for name, _, _ in unique]

    def blocks() -> Any:
        flat = [np.broadcast_to(a, shape).reshape(-1) if dims else np.reshape(a, (1,)) for a in laid_out]
        for start in range(0, total, BLOCK_ROWS):
            texts = [_as_text(column[start:start + BLOCK_ROWS], formula_escape) for column in flat]
            yield [list(row) for row in zip(*texts)]

    return header, blocks(), total


def _as_text(values: Any, formula_escape: bool = False) -> List[str]:
    kind = values.dtype.kind
    if kind == "S":
        texts = [v.decode("utf-8", "replace") for v in values.tolist()]
    elif kind in _TEXT_KINDS:
        texts = [str(v) for v in values.tolist()]
    else:  # numbers (and dates): digits, signs, dots, e, nan, inf; never a formula
        return values.astype(str).tolist()
    return [escape_cell(t) for t in texts] if formula_escape else texts


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if _QUOTE_ESCAPED.search(cell) else cell


def _csv_bytes(rows: List[List[str]], formula_escape: bool = False) -> bytes:
    """Rows as CSV (CRLF line ends). With C{formula_escape}, cells holding C{;}
    or a tab are quoted too (the cells themselves are escaped by L{to_rows})."""
    if formula_escape:
        lines = []
        for row in rows:
            lines.append('""' if row == [""] else ",".join(map(_quoted, row)))
        return ("\r\n".join(lines) + "\r\n").encode("utf-8") if lines else b""
    out = io.StringIO()
    writer = _csv.writer(out, lineterminator="\r\n")
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


class CSV(Component):
    """Datasets as CSV, decoded with pydap's parsers."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, options: Optional[CsvOptions] = None, fetch_timeout: Optional[float] = None,
                 max_bytes: int = MAX_BYTES, answer_timeout: Optional[float] = None,
                 formula_escape: Optional[bool] = None) -> None:
        """C{options}: the config's C{components.csv}; C{fetch_timeout}: the
        fetcher's (the answer may take that long to start, and 15 s more)."""
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        self.max_bytes = max_bytes
        if formula_escape is None:  # components.csv.formula_escape, default true
            formula_escape = (options or CsvOptions()).formula_escape
        #: text cells a spreadsheet would read as formulas get a ' in front (escape_cell)
        self.formula_escape = bool(formula_escape)
        if answer_timeout is None:
            answer_timeout = max(DEFAULT_ANSWER_TIMEOUT, (fetch_timeout or 0) + 15.0)
        self.answer_timeout = answer_timeout
        self.rendered = 0

    @operation
    def render(self, url: Any = None, address: Any = None, request_id: Any = None, dataset: Any = None,
               method: Any = "GET") -> Deferred:
        """Stream C{url} (a .dods URL) as CSV to C{address}; errors go there as error replies."""
        if not isinstance(address, str) or not address:
            self.log.warn("{component}: render without an address; dropped", component=self.name)
            return _done()
        d = self._render(url, address, request_id, dataset, method)
        d.addErrback(self._failed, address, request_id, url)
        return d

    def _failed(self, failure: Failure, address: str, request_id: Optional[str], url: Any) -> Deferred:
        exc = failure.value
        if isinstance(exc, Timeout):
            failure = Failure(UpstreamTimeout(f"no .dods answer within {self.answer_timeout:g} s"))
        elif isinstance(exc, StreamError):
            failure = Failure(UpstreamError(f"the .dods answer broke: {exc}"))
        elif not isinstance(exc, (RemoteError, InvalidURL, UpstreamError, UpstreamTimeout)):
            self.log.failure("{component}: rendering {url}", failure, component=self.name, url=url)
        else:
            self.log.info("{component}: {url} not rendered: {kind}: {reason}", component=self.name, url=url,
                          kind=getattr(exc, "remote_type", type(exc).__name__), reason=failure.getErrorMessage())
        d = self.bus.send(address, error_reply(failure, request_id), mandatory=False)
        d.addErrback(lambda f: self.log.info("{component}: error reply to {address} lost: {reason}",
                                             component=self.name, address=address, reason=f.getErrorMessage()))
        return d

    @inlineCallbacks
    def _render(self, url: Any, address: str, request_id: Optional[str], dataset: Optional[str],
                method: Any) -> Any:
        if not isinstance(url, str) or ".dods" not in url.split("?", 1)[0]:
            raise InvalidURL(f"csv renders .dods URLs, got {url!r}")
        spool = tempfile.SpooledTemporaryFile(max_size=4 * 1024 * 1024)
        try:
            status, size = yield self._fetch(url, spool)
            if status != 200:
                spool.seek(0)
                first = spool.read(200).decode("utf-8", "replace").strip().splitlines()
                raise UpstreamError(f"the upstream answered {status} for the .dods"
                                    + (f": {first[0]}" if first else ""))
            dataset_model, data = yield self._decode(spool)
            header, blocks, total = to_rows(dataset_model, data, self.formula_escape)
        finally:
            spool.close()
        meta = {"status": 200, "reason": "OK",
                "headers": [["Content-Type", "text/csv; charset=utf-8"],
                            ["Content-Disposition", f'inline; filename="{dataset or "dataset"}.csv"']],
                "url": url, "source": "csv", "length": None}
        writer = self.bus.open_stream(address, meta, correlation_id=request_id)
        try:
            if method != "HEAD":
                yield writer.write(_csv_bytes([header], self.formula_escape))
                for block in blocks:
                    yield writer.write(_csv_bytes(block, self.formula_escape))
            yield writer.finish()
        except Exception as e:
            writer.abort(e)
            self.log.info("{component}: CSV stream to {address} broke: {reason}", component=self.name,
                          address=address, reason=str(e))
            return None
        self.rendered += 1
        self.log.info("{component}: {url} as CSV ({rows} rows, {bytes} bytes of .dods)", component=self.name,
                      url=url, rows=total, bytes=size)
        return None

    def _decode(self, spool: Any) -> Deferred:
        pool = getattr(self.clock, "getThreadPool", None)
        if pool is not None:
            from twisted.internet.threads import deferToThreadPool
            return deferToThreadPool(self.clock, pool(), decode_dods, spool)
        from twisted.internet.defer import maybeDeferred
        return maybeDeferred(decode_dods, spool)

    @inlineCallbacks
    def _fetch(self, url: str, spool: Any) -> Any:
        """Get C{url} through the data path into C{spool}; (status, bytes)."""
        request_id = uuid.uuid4().hex
        answer = StreamAnswer(request_id)
        listener = yield self.bus.listen(answer.on_message, on_stream=answer.on_stream)
        try:
            # by URL: the controller finds the dataset the URL is under (route takes a url or a name)
            yield self.bus.tell("controller", "route", listener.address, correlation_id=request_id, url=url,
                                method="GET", address=listener.address, request_id=request_id)
            def timed_out(result: Any, t: float) -> None:
                raise UpstreamTimeout(f"no .dods answer within {t:g} s")

            answer.answer.addTimeout(self.answer_timeout, self.clock, onTimeoutCancel=timed_out)
            stream = yield answer.answer
            status = stream.metadata.get("status") if isinstance(stream.metadata, dict) else None
            size = [0]

            def sink(data: bytes) -> None:
                size[0] += len(data)
                if size[0] > self.max_bytes:
                    raise UpstreamError(f"the .dods is larger than {self.max_bytes} bytes, too large for CSV")
                spool.write(data)

            yield stream.deliver(sink)
            return status, size[0]
        finally:
            listener.close().addErrback(lambda _: None)


def _done() -> Deferred:
    d: Deferred = Deferred()
    d.callback(None)
    return d
