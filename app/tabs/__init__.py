"""UI pieces of the web app, one module per tab; each ``build(service, ctx)`` only wires I/O to the service."""
