"""Streamgate: a streaming gateway for LLM chat (the app, its routes, streaming core and edge)."""
