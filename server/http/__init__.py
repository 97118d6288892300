"""The HTTP edge: OpenAI-shaped requests in and responses out, errors, auth and backpressure.

It talks to the engine only through quiver.server.engine.async_engine.AsyncEngine."""
