"""The conformance engine: it compares an adapter's results with the references and grades them.

From a norm specification and a case (shape, dtype, distribution, seed) it derives the inputs, runs
the adapter in an isolated worker, and compares its output with the correctly rounded reference:
metrics, the tolerance model, grades, and a diagnosis that names the convention an implementation
matches. Results stream out one JSON line per check and are written up as reports (JSON, Markdown,
JUnit, HTML). The command line (``normconf certify``, ``python -m conformance``) and the pytest
plugin live here too.

The engine, its CLI and its pytest plugin arrive with the certification work.
"""
