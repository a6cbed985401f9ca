"""The benchmark harness: ``python -m bench`` (``make bench``).

Every server runs as production does: gunicorn with the repository's ``gunicorn.conf.py``
on loopback, behind its own nginx front rendered by ``deploy/nginx/render.py`` (as
``make run-prod`` does), the service with the shipped production settings. Scenarios
(``--only``): ``first`` (first answers: URLs never answered before, for cached users,
against a bare Flask app under the same gunicorn settings; the old repeated-URL mix
beside it), ``stampede`` (bursts of 1,000 requests at once, each on its own connection,
half on cached users and half on cold ones, upstream at 300 ms, against a burst of the
cached half alone), both under each worker class of ``--worker-classes``;
``miss`` (cold users, latency added over a direct call to the simulator), ``campaign``
(a Braze send through the service and straight to the simulator), ``memory`` (resident
memory of cached profiles). Everything runs on 127.0.0.1, every load is bounded in
count and time, and every process started is stopped (process groups) when the harness
ends. Results go to ``docs/benchmarks.md`` and ``docs/benchmark-latency.png``.
"""
