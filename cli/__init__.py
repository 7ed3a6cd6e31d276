"""The `workflow-runs` command and the embedded development stack it starts."""
