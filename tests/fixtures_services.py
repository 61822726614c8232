"""Service fixtures shared by integration tests (Prefect server, Ray clusters). Filled in by the pipeline tests."""
