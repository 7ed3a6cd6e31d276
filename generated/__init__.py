"""Written by `make generate` from openapi/: never edit by hand."""
