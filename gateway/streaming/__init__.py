"""The streaming core: a turn from its admission to its last event: admission (quotas), dispatch (to the first
token), turns, registry (running turns, leases, stop, checkpoints), sse and writer (the response), replay (a
resumer's stream), titles (a chat's title by a model)."""
