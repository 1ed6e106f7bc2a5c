"""ooidx benchmarks: how fast the layers are, each against a baseline measured in the same run.

Not part of the test run. Needs a RabbitMQ broker (default: the local one,
``amqp://guest:guest@127.0.0.1:5672/``).

Run::

    python -m bench                       # every group
    python -m bench magnet                # one group
    python -m bench magnet --seconds 1    # a quick pass
    python -m bench magnet --json bench.json --plot bench-plots/
    python -m bench --help

Options: ``--broker URL`` (or ``OOIDX_BENCH_BROKER``), ``--seconds N``
(measured time per run, default 3, after ``--warmup`` 0.5 s), ``--rounds N``
(runs per side, default 3), ``--row TEXT`` (only
the rows whose name contains TEXT), ``--json PATH`` (the rows as a JSON list of
``{name, value, unit, baseline, baseline_value, ratio}``), ``--plot DIR``
(one PNG per group of the ratios; needs matplotlib, the ``bench`` extra),
``-v`` (every run's figure, tracebacks).

How it measures (see ``bench/harness.py``): every side (the subject, e.g.
magnet, and each baseline, e.g. raw txAMQP) is set up for a row, then
measured ``--rounds`` times in alternating order (baseline, subject, subject,
baseline, ...). A run warms up, then counts completed operations over
``--seconds``, then stops issuing and drains what is in flight. A side's
figure is its **best** run (noise on a shared machine only slows runs down).
``ratio`` is subject / baseline from the same invocation.

Groups:

- ``magnet`` (``bench/magnet_bench.py``): sequential RPC, RPC with 10 in
  flight, worker queue (persistent, confirmed, acked), fanout to 10
  subscribers; magnet against raw txAMQP (``bench/raw_txamqp.py``) doing the
  same work with the same spec file, acks and publisher confirms.

Every queue and exchange a run declares has a unique ``bench.*`` name and is
deleted afterwards.
"""
