"""pydap's own answers (.das, .dds, .dods) for the test datasets of
tests/ooidx/dap_upstream.make_files, from pydap's WSGI app called in this
process: no port, no subprocess. Made once per test run, in a directory
removed at exit."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

from webob import Request

from tests.ooidx.dap_upstream import make_files

#: The upstream URL the answers are said to come from (nothing listens there).
UPSTREAM = "http://upstream.test"


@functools.lru_cache(maxsize=None)
def pydap_responses() -> Dict[str, Any]:
    """name -> {"das", "dds", "dods", "source", "url"} for sst and series."""
    from pydap.wsgi.app import DapServer

    directory = Path(tempfile.mkdtemp(prefix="ooidx-fast-pydap-"))
    atexit.register(shutil.rmtree, str(directory), True)
    files = make_files(directory)
    app = DapServer(str(directory))
    out: Dict[str, Any] = {}
    for name in ("sst", "series"):
        parts = {}
        for suffix in ("das", "dds", "dods"):
            answer = Request.blank(f"/{name}.nc.{suffix}").get_response(app)
            assert answer.status_int == 200, answer.status
            parts[suffix] = answer.body
        out[name] = dict(parts, source=files[name], url=f"{UPSTREAM}/{name}.nc")
    return out
