"""Schemathesis against the live server (`make contract-test`)."""
