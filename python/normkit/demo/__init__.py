"""`python -m normkit demo`: the small-batch study (see docs/demo.md)."""
