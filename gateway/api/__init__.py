"""The HTTP routes, one module per resource, with the request and answer models they validate."""
