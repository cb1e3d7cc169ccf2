"""The edge: authentication, the request middleware, the error envelope, logs and metrics."""
