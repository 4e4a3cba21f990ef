"""The OpenAI-compatible HTTP API on Ray Serve (see docs/serving.md and CONTRACT.md "Serving").

* ``protocol`` — request bodies (pydantic), response shapes, OpenAI-shaped errors.
* ``models``   — a model name -> the durable version that answers it, and a bounded cache keyed by version.
* ``batcher``  — the replica's decode thread: concurrent requests of one version decoded together.
* ``ingress``  — served completions kept for feedback; feedback and HTTP-published interactions into the stream.
* ``exports``  — the current generation's exported files, listed and downloaded.
* ``stats``    — the serving metrics, gathered from every replica by one named actor.
* ``app``      — the FastAPI routes and the Serve deployment (a thin wrapper over the above).
* ``runner``   — starting and stopping Serve in the daemon's Ray, and ``cascade serve``.
"""
