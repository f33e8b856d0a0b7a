"""The tracing layer: trace plans and edits, the bodies that run inside nnsight traces,
trace jobs and their executors, and memory measurement. It knows nothing of experiment
kinds (`nnexp.kinds`), which build on it."""
