"""Sample Temporal workloads: the workflows that produce the runs the API reads, their activities,
the worker that runs them and the starter that launches them with the project's search attributes."""
