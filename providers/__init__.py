"""Model providers: one adapter per vendor behind one Protocol, the built-in fake, and the HTTP client
and SSE decoder they share."""
