"""Fuzz the URL handling that proxy requests reach (they come from anyone):
ooidx.datapath.proxy.parse_target, ooidx.urlpolicy (check_registered, check_url,
is_under, host_allowed, parse_ip), ooidx.dap (split_url, dataset_url) and
ooidx.datapath.controller.check_base_url.

An input is lines (split at b"\\n"): the request target as it comes on the
request line (bytes), a dataset's base URL, then allow_hosts entries.

Asserts:
  - parse_target: a Target, or ProxyError
  - check_registered / check_url / check_base_url: a value, or InvalidURL or
    Forbidden (for the request's URL, the target's URL and the base URL)
  - split_url never raises on a string, and dataset_url is its inverse
    (dataset_url(*split_url(u)) == u for a URL without a fragment)
  - is_under, host_allowed and parse_ip never raise
and that each input finishes within libFuzzer's -timeout.

    .venv/bin/python fuzz/fuzz_url.py -max_total_time=60 fuzz/corpus-run/url fuzz/corpus/url
"""
from __future__ import annotations


import _harness  # noqa: F401  (sys.path)
import atheris

with atheris.instrument_imports(include=["ooidx.urlpolicy", "ooidx.dap", "ooidx.datapath.proxy", "ooidx.datapath.proxy_url", "ooidx.datapath.controller",
                                         "urllib.parse", "ipaddress"]):
    from ooidx import dap, urlpolicy
    from ooidx.datapath.controller import check_base_url
    from ooidx.errors import Forbidden, InvalidURL
    from ooidx.datapath.proxy_url import ProxyError, parse_target

OWN = ("127.0.0.1:8100", "localhost:8100", "dx.example.org:8100")


def strings(url: str, base: str, hosts: list) -> None:
    split = dap.split_url(url)
    if "#" not in url:
        assert dap.dataset_url(*split) == url, (url, split)
    assert split.url == dap.dataset_url(split.base, split.suffix, split.constraint)
    for allow_private in (False, True):
        try:
            target = urlpolicy.check_url(url, allow_private, hosts)
        except (InvalidURL, Forbidden):
            target = None
        if target is not None:
            urlpolicy.host_allowed(hosts, target.host, target.port, target.ip)
        try:
            urlpolicy.check_registered(url, {"d": base, "e": base + "/"}, hosts, allow_private)
        except (InvalidURL, Forbidden):
            pass
        try:
            check_base_url(base, hosts, allow_private)
        except (InvalidURL, Forbidden):
            pass
    urlpolicy.is_under(url, base)
    urlpolicy.is_under(base, url)
    urlpolicy.parse_ip(url)


def TestOneInput(data: bytes) -> None:
    lines = data.split(b"\n")
    raw = lines[0]
    base = lines[1].decode("utf-8", "replace") if len(lines) > 1 else "http://dap.example.org/dods/x.nc"
    hosts = [line.decode("utf-8", "replace") for line in lines[2:6]]
    try:
        target = parse_target(raw, OWN)
    except ProxyError:
        target = None
    if target is not None and target.url is not None:
        strings(target.url, base, hosts)
    strings(raw.decode("utf-8", "replace"), base, hosts)


if __name__ == "__main__":
    _harness.run(TestOneInput)
