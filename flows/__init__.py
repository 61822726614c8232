"""Prefect flows: thin wrappers that call `pipelines`. Imports `pipelines` (and through it `ssjdn`)."""
