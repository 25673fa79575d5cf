"""The Dagster layer: thin asset, check, job and sensor wrappers over the stage modules."""
