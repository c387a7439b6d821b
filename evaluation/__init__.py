"""difill.evaluation: fill-in-the-middle regression tests (difill eval)."""
