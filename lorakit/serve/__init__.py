"""Serving many adapters on one base over HTTP: an OpenAI-compatible server with mixed-adapter continuous batching.

    engine.py    one thread decodes a batch whose rows join and leave between steps, each row with its own adapter
    adapters.py  the adapters a server may use: names, directories, the base check and an LRU cap on those in memory
    app.py       the FastAPI app: OpenAI's routes and shapes, runtime adapter loading, /health and /metrics
    limits.py    what a request may ask for: body size, prompt length, max_tokens, the API key
"""
