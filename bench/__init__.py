"""The benchmark harness: ``python -m bench`` (``make bench``).

Scenarios (``--only``): ``hit`` (cached profiles under wrk, against a bare Flask app on
the same gunicorn settings), ``miss`` (cold users, latency added over a direct call to
the simulator), ``campaign`` (a Braze send through the service and straight to the
simulator), ``memory`` (resident memory of 100,000 cached profiles). Everything runs on
127.0.0.1, every loop is bounded in count and time, and every process started is
stopped (process groups) when the harness ends. Results go to ``docs/benchmarks.md``
and ``docs/benchmark-latency.png``.
"""
