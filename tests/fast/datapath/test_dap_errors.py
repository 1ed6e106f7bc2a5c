"""DAP clients get their errors as DAP error objects (issue 18): the dialect
from the request's suffix, the DAP 2 body with its quotes escaped."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ooidx.datapath.proxy_url import dap2_error_body, dap4_error_body, error_dialect


class ErrorDialectTests(SynchronousTestCase):
    def test_dap2_suffixes_by_name_and_forward(self) -> None:
        for uri in (b"/datasets/sst.dds", b"/datasets/sst.das", b"/datasets/sst.dods?time[0:1:2]",
                    b"/datasets/sst.ascii?x", b"/datasets/sst.csv?time", b"http://h:80/a/b.nc.DODS?x.y"):
            self.assertEqual(error_dialect(uri), "dap2", uri)

    def test_dap4_suffixes(self) -> None:
        for uri in (b"/datasets/ts.dmr", b"/datasets/ts.dap?dap4.ce=x", b"http://h/ts.nc.dmr.xml"):
            self.assertEqual(error_dialect(uri), "dap4", uri)

    def test_others_are_plain(self) -> None:
        for uri in (b"/datasets/sst", b"/elsewhere", b"http://h.dds/", b"http://host.das", b"/datasets/sst.html",
                    b"/x?y.dds"):
            self.assertIsNone(error_dialect(uri), uri)


class ErrorBodyTests(SynchronousTestCase):
    def test_dap2_body_escapes_quotes_and_backslashes_on_one_line(self) -> None:
        body = dap2_error_body(403, "Forbidden", 'a "b" c\\d\ne')
        self.assertEqual(body, b'Error {\n    code = 403;\n    message = "Forbidden: a \\"b\\" c\\\\d e";\n};\n')

    def test_dap4_body_escapes_xml(self) -> None:
        body = dap4_error_body(404, "UnknownDataset", "<x> & 'y'")
        self.assertIn(b'<Error httpcode="404">', body)
        self.assertIn(b"<Message>UnknownDataset: &lt;x&gt; &amp; 'y'</Message>", body)
