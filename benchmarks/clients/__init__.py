"""Reusable load and fault clients for a stream2llm server.

They speak HTTP (the session API, the OpenAI-compatible endpoints, /health, /metrics) and, for the
Python API load, the ``stream2llm`` package's public names; none reads the server's internals.

- ``common``: texts, percentiles, SSE reading, outcome tallies;
- ``mix``: weighted scenarios run by concurrent workers, each with a deadline;
- ``http_load``: the HTTP scenario mix (sessions, completions, chat, aborts, hang-ups, bad input);
- ``api_load``: the same kinds of scenarios on a ``StreamingEngine`` (the Python API);
- ``abuse``: abusive connections (slowloris, trickled bodies, unread SSE, maximum-size appends);
- ``wellbehaved``: a client measuring /health latency and TTFT while others misbehave;
- ``probe``: resource snapshots of a server from outside (its /metrics, psutil on its pid);
- ``host``: an engine and its HTTP server in this process, started through the public API.

``benchmarks/soak.py`` and ``benchmarks/abusive_clients.py`` are thin drivers over them.
"""
