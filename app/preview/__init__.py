"""Preview Braze messages against this service: a Liquid engine with Braze's syntax, lints, a CLI and a page."""
