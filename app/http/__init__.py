"""The HTTP edge: raw-path routing, the gate, validation, views and the OpenAPI document."""
