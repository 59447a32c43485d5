"""Repository scripts; `python -m scripts.demo` runs the demo from the repository root."""
