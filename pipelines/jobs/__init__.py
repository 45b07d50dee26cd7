"""Job declarations: each job says what it reads, its output key, its stages and its summary; pipelines/runner.py
does the rest. Adding a job is a new module here, not a new driver."""
