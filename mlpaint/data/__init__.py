"""MNIST ingestion: sources, integrity, formats, the feature-label join and exploration.

Everything here is plain, typed Python with no Prefect dependency; `tasks/` and `flows/`
wrap it for orchestration.
"""
