"""One module per scenario; each has ``run(opts) -> dict`` returning plain data for the report."""
