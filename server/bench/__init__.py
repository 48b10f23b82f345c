"""Benchmarks of the server that print figures: `python -m server.bench reliability` (issue 19)."""
