"""DAP 2 URLs: a dataset's base URL, the response suffix, the constraint.

A DAP 2 request URL (OPeNDAP DAP 2.0, ESE-RFC-004, section 6) is the
dataset's URL, a suffix naming the response, and an optional constraint
expression after C{?}:

    http://server/dods/nc/fnoc1.nc.dds?u[0:1:1][0:1:2][0:1:3]
    \\_______ base ___________/\\sfx/\\_______ constraint ______/

The constraint is kept exactly as the client sent it (percent-escapes,
commas, brackets, quotes, C{&} selections, function calls): the exchange
never decodes or re-encodes it, so the upstream sees the same bytes.
"""
from __future__ import annotations

import re
from typing import IO, Any, List, NamedTuple, Optional, Tuple

#: The DAP 2 responses (.asc is the short form of .ascii), and DAP 4's (.dmr, .dmr.xml: the
#: metadata; .dap: the data), so a DAP 4 client's requests pass to an upstream that speaks it.
DAP2_SUFFIXES = (".das", ".dds", ".dods", ".asc", ".ascii", ".html", ".info", ".ver")
DAP4_SUFFIXES = (".dmr", ".dmr.xml", ".dap")
DAP_SUFFIXES = DAP2_SUFFIXES + DAP4_SUFFIXES
#: .csv, our own.
CSV_SUFFIX = ".csv"
SUFFIXES = DAP_SUFFIXES + (CSV_SUFFIX,)

#: The three responses that make up a dataset (metadata, structure, data).
DATASET_PARTS = ("das", "dds", "dods")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class DapURL(NamedTuple):
    """A DAP request URL taken apart.

    C{base}: the dataset's URL (no suffix, no constraint). C{suffix}: one of
    L{SUFFIXES} with its dot, or C{None} for a URL without one (the base URL
    itself, or any other URL under it). C{constraint}: the raw query string
    after C{?}, byte-for-byte, or C{None} when the URL has no C{?} (an empty
    string when it ends in a bare C{?})."""

    base: str
    suffix: Optional[str]
    constraint: Optional[str]

    @property
    def url(self) -> str:
        return dataset_url(self.base, self.suffix, self.constraint)


def split_url(url: str) -> DapURL:
    """Take a DAP URL apart into base, suffix and raw constraint.

    The suffix is recognized only at the end of the path (before the C{?}),
    so a dataset file named C{x.dds.nc} keeps its name; a path without a
    known suffix comes back with C{suffix=None} and the whole path as base.
    A fragment (C{#...}) is not part of a request and is dropped."""
    if not isinstance(url, str):
        raise TypeError(f"a DAP URL is a string, got {type(url).__name__}")
    head, sep, query = url.partition("?")
    if not sep:
        head = head.partition("#")[0]
    constraint: Optional[str] = query if sep else None
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if head.endswith(suffix) and len(head) > len(suffix) and not head[: -len(suffix)].endswith("/"):
            return DapURL(head[: -len(suffix)], suffix, constraint)
    return DapURL(head, None, constraint)


def dataset_url(base: str, suffix: Optional[str] = None, constraint: Optional[str] = None) -> str:
    """The request URL for a response of the dataset at C{base}: the inverse of L{split_url}.

    C{suffix} may be given with or without its dot (C{"dds"} or C{".dds"});
    C{constraint} is appended unchanged after C{?}."""
    url = base
    if suffix:
        if not suffix.startswith("."):
            suffix = "." + suffix
        if suffix not in SUFFIXES:
            raise ValueError(f"not a DAP response suffix: {suffix!r} (known: {', '.join(SUFFIXES)})")
        url += suffix
    if constraint is not None:
        url += "?" + constraint
    return url


def valid_name(name: object) -> bool:
    """Whether C{name} is a safe dataset name: 1-64 characters of letters,
    digits, C{_ . -}, starting with a letter or digit (so never C{.} or C{..},
    never a path)."""
    return isinstance(name, str) and name not in (".", "..") and _NAME.match(name) is not None


# .dods responses ------------------------------------------------------------------

#: What separates a .dods response's DDS from its XDR data.
DATA_MARKER = b"\nData:\n"


class DodsError(ValueError):
    """A .dods response that cannot be decoded; C{part} says where: C{"marker"}
    (no C{Data:} line), C{"dds"} (the structure) or C{"data"} (the values)."""

    def __init__(self, part: str, detail: str = "") -> None:
        super().__init__(f"{part}: {detail}" if detail else part)
        self.part = part
        self.detail = detail


def decode_dods(dods: IO[bytes], das: Optional[str] = None, max_dds: int = 16 * 1024 * 1024,
                errors: str = "strict") -> Tuple[Any, List[Any]]:
    """(pydap dataset, unpacked data) of a .dods response in a binary file.

    The CSV answer and the persister's netCDF both start here, so a DAP 2
    response is taken apart one way. With C{das}, its attributes are added
    to the dataset (a .das that does not parse is noted as the attribute
    C{ooidx_das_error}: the data is what counts). C{errors} is how the DDS's
    bytes are decoded. Raises L{DodsError}."""
    from pydap.handlers.dap import unpack_dap2_data
    from pydap.parsers.das import add_attributes, parse_das
    from pydap.parsers.dds import dds_to_dataset

    dods.seek(0)
    head = dods.read(max_dds)
    at = head.find(DATA_MARKER)
    if at < 0:
        raise DodsError("marker")
    try:
        dataset = dds_to_dataset(head[:at].decode("utf-8", errors))
    except Exception as e:  # noqa: BLE001 - pydap raises what it raises
        raise DodsError("dds", str(e)) from None
    if das:
        try:
            add_attributes(dataset, parse_das(das))
        except Exception as e:  # noqa: BLE001 - attributes are a nicety; the data is what counts
            dataset.attributes["ooidx_das_error"] = f"the .das does not parse: {e}"[:500]
    dods.seek(at + len(DATA_MARKER))
    try:
        data = unpack_dap2_data(dods, dataset)
    except Exception as e:  # noqa: BLE001
        raise DodsError("data", str(e)) from None
    return dataset, data
