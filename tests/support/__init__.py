"""Helpers shared by test modules (a test module never imports another): the in-memory backends
configured for the unit tests (`fakes`) and mock mode in the test process (`mock`), and for the tests
on the real stack the processes, run starting, waits and update clients."""
