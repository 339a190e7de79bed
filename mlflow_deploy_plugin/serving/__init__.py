"""The serving path: the ASGI app, model slots, batching, worker processes (which start capture)."""
