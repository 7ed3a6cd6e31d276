"""Helpers shared by test modules (a test module never imports another): fakes for the unit tests,
and for the tests on the real stack the processes, run starting, waits and update clients."""
