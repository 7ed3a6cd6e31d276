"""Backend adapters: Temporal for runs, Redis for run updates, behind the Protocols of `protocol`."""
