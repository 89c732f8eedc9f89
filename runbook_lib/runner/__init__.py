"""The headless runner: executes the notebooks with papermill and keeps the records of a run."""
