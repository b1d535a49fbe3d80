"""``uncomp serve``: the OpenAI HTTP API over one model, with compressed caches per request.

``protocol`` (requests, responses, errors), ``prompts`` (tokens and the reusable-context split),
``server`` (a request checked into a job), ``worker`` (the thread that owns the model: admission,
batching, decoding), ``store`` (compressed contexts kept for reuse), ``metrics`` and ``app``
(FastAPI). Needs the ``serve`` extra: ``pip install 'uncomp[serve]'``.
"""
