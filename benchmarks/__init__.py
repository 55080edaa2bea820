"""Benchmarks: one module per benchmark, each run as `python -m benchmarks.<name>` from the project
root and writing its own section of the docs. They call medtriage's public API only; nothing in
`src/` imports them, and they are not part of the installed package."""
