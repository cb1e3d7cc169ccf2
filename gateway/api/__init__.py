"""The HTTP routes, one module per resource; ``schemas`` holds the request models they validate, ``openapi``
the answer models and the description of every route."""
