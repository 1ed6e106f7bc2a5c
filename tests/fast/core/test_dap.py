"""ooidx.dap: DAP 2 URLs, with the examples of the DAP 2 specification and
the OPeNDAP documentation."""
from __future__ import annotations


from ooidx.dap import SUFFIXES, DapURL, dataset_url, split_url, valid_name

from tests.fast.core.support import FastCase, cases, expand

# (url, base, suffix, constraint): each must split so, and join back byte-for-byte.
EXAMPLES = [
    # ESE-RFC-004 (DAP 2.0): a hyperslab of one array
    ("http://server/dods/nc/fnoc1.nc.dds?u[0:1:1][0:1:2][0:1:3]",
     "http://server/dods/nc/fnoc1.nc", ".dds", "u[0:1:1][0:1:2][0:1:3]"),
    # the three responses of a dataset, unconstrained
    ("http://test.opendap.org/opendap/data/nc/fnoc1.nc.das",
     "http://test.opendap.org/opendap/data/nc/fnoc1.nc", ".das", None),
    ("http://test.opendap.org/opendap/data/nc/fnoc1.nc.dods",
     "http://test.opendap.org/opendap/data/nc/fnoc1.nc", ".dods", None),
    # a projection of several variables
    ("http://test.opendap.org/opendap/data/nc/fnoc1.nc.dods?u,v",
     "http://test.opendap.org/opendap/data/nc/fnoc1.nc", ".dods", "u,v"),
    ("http://test.opendap.org/opendap/data/nc/fnoc1.nc.ascii?u[0][0:5][0:5]",
     "http://test.opendap.org/opendap/data/nc/fnoc1.nc", ".ascii", "u[0][0:5][0:5]"),
    # a Grid and one of its members / maps
    ("http://test.opendap.org/opendap/data/nc/coads_climatology.nc.dds?SST",
     "http://test.opendap.org/opendap/data/nc/coads_climatology.nc", ".dds", "SST"),
    ("http://test.opendap.org/opendap/data/nc/coads_climatology.nc.dods?SST.SST[0][0:10]",
     "http://test.opendap.org/opendap/data/nc/coads_climatology.nc", ".dods", "SST.SST[0][0:10]"),
    ("http://test.opendap.org/opendap/data/nc/coads_climatology.nc.asc?SST.COADSX",
     "http://test.opendap.org/opendap/data/nc/coads_climatology.nc", ".asc", "SST.COADSX"),
    # selections: '&' is a prefix operator, also with no projection
    ("http://oceans.univ.edu/cgi-bin/nc/expl/buoys.nc.dods?u&lat>15.0",
     "http://oceans.univ.edu/cgi-bin/nc/expl/buoys.nc", ".dods", "u&lat>15.0"),
    ("http://oceans.univ.edu/cgi-bin/nc/expl/buoys.nc.dods?station&station.temp<15.0",
     "http://oceans.univ.edu/cgi-bin/nc/expl/buoys.nc", ".dods", "station&station.temp<15.0"),
    ("http://server/dods/seq.dat.dods?&lat>10.0&lon<20.0",
     "http://server/dods/seq.dat", ".dods", "&lat>10.0&lon<20.0"),
    ("http://test.opendap.org/dods/dts/test.32.dods?windW[0:10:2]&CS02.light>0",
     "http://test.opendap.org/dods/dts/test.32", ".dods", "windW[0:10:2]&CS02.light>0"),
    # a string value in quotes, raw and percent-escaped (kept as sent)
    ('http://server/dods/cruise.dat.dods?temp&site="Woods Hole"',
     "http://server/dods/cruise.dat", ".dods", 'temp&site="Woods Hole"'),
    ("http://server/dods/cruise.dat.dods?temp&site=%22Woods%20Hole%22",
     "http://server/dods/cruise.dat", ".dods", "temp&site=%22Woods%20Hole%22"),
    # a server function call in the projection
    ('http://test.opendap.org/dap/data/nc/coads_climatology.nc.dods?grid(SST,"4000<TIME<5000")',
     "http://test.opendap.org/dap/data/nc/coads_climatology.nc", ".dods", 'grid(SST,"4000<TIME<5000")'),
    ("http://test.opendap.org/dap/data/nc/coads_climatology.nc.dods?grid(SST,%224000%3CTIME%3C5000%22)",
     "http://test.opendap.org/dap/data/nc/coads_climatology.nc", ".dods", "grid(SST,%224000%3CTIME%3C5000%22)"),
    # escaped brackets (what some clients send)
    ("http://server/dods/nc/fnoc1.nc.dods?u%5B0:1:1%5D%5B0:1:2%5D",
     "http://server/dods/nc/fnoc1.nc", ".dods", "u%5B0:1:1%5D%5B0:1:2%5D"),
    # the other responses
    ("http://server/dods/nc/fnoc1.nc.html", "http://server/dods/nc/fnoc1.nc", ".html", None),
    ("http://server/dods/nc/fnoc1.nc.info", "http://server/dods/nc/fnoc1.nc", ".info", None),
    ("http://server/dods/nc/fnoc1.nc.ver", "http://server/dods/nc/fnoc1.nc", ".ver", None),
    ("http://server/dods/nc/fnoc1.nc.csv?u[0]", "http://server/dods/nc/fnoc1.nc", ".csv", "u[0]"),
    # a port, an empty constraint, and a base URL with no suffix
    ("http://127.0.0.1:8001/data/sst.nc.dds?", "http://127.0.0.1:8001/data/sst.nc", ".dds", ""),
    ("http://server/dods/nc/fnoc1.nc", "http://server/dods/nc/fnoc1.nc", None, None),
    # a file whose name holds a suffix in the middle keeps it
    ("http://server/data/x.dds.nc.das", "http://server/data/x.dds.nc", ".das", None),
]


@expand
class DapTests(FastCase):
    @cases("url,base,suffix,constraint", EXAMPLES)
    def test_split_and_join_spec_examples(self, url, base, suffix, constraint):
        parts = split_url(url)
        assert parts == DapURL(base, suffix, constraint)
        assert dataset_url(*parts) == url
        assert parts.url == url

    def test_ascii_is_not_taken_for_asc(self):
        assert split_url("http://h/a.nc.ascii").suffix == ".ascii"
        assert split_url("http://h/a.nc.asc").suffix == ".asc"

    def test_suffix_only_at_end_of_path_not_in_constraint(self):
        assert split_url("http://h/a.nc?x.dds") == DapURL("http://h/a.nc", None, "x.dds")

    def test_a_bare_suffix_as_a_directory_entry_is_not_a_suffix(self):
        assert split_url("http://h/dir/.dds") == DapURL("http://h/dir/.dds", None, None)

    def test_suffixes_listed(self):
        assert set(SUFFIXES) == {".das", ".dds", ".dods", ".asc", ".ascii", ".html", ".info", ".ver", ".csv",
                                 ".dmr", ".dmr.xml", ".dap"}

    def test_dataset_url_takes_suffix_with_or_without_dot(self):
        assert dataset_url("http://h/sst.nc", "dds") == "http://h/sst.nc.dds"
        assert dataset_url("http://h/sst.nc", ".dods", "sst[0:1:3]") == "http://h/sst.nc.dods?sst[0:1:3]"
        with self.assertRaises(ValueError):
            dataset_url("http://h/sst.nc", ".exe")

    def test_fragment_dropped_without_query(self):
        assert split_url("http://h/sst.nc.dds#x") == DapURL("http://h/sst.nc", ".dds", None)

    @cases("name", ["sst", "SST_2024", "a", "0", "ooi.ctd-01", "a" * 64, "x..y"])
    def test_valid_names(self, name):
        assert valid_name(name)

    @cases("name", [
        "", ".", "..", ".hidden", "-x", "_x", "a" * 65, "a/b", "../etc", "a\\b", "a b", "a\n", "sst\x00",
        "é", "a:b", "a%2fb", None, 5, b"sst",
    ])
    def test_invalid_names(self, name):
        assert not valid_name(name)
