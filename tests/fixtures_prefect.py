"""Prefect server fixture (a real `prefect server start` on 127.0.0.1), shared by flow and deployment tests."""
