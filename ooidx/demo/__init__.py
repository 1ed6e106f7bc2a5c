"""The demo: a first dataset through the exchange with no internet.

C{ooidx demo} (L{ooidx.demo.run}) serves the sample netCDF files shipped in
C{ooidx/demo/data/} (made by C{scripts/make-demo-data} with
L{ooidx.demo.sample}) from a small DAP upstream on loopback
(L{ooidx.demo.upstream}: pydap's netCDF handler under twisted.web), registers
them with a daemon whose config allows that one upstream explicitly
(C{security.allow_hosts}), and gives them new values every minute so that
versions and notices happen.
"""
