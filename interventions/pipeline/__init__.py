"""The pipeline: what a job runs (configuration, experiments, task runs, results, manifest,
probe) and in which order."""
