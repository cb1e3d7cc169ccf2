"""The streaming core: a turn from its admission to its last event (admission, dispatch, turn, registry,
SSE writer)."""
