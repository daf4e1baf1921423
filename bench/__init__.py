"""Benchmarks for hetlora (DESIGN.md section 6): programs, never timed tests.

``python -m bench kernels|e2e|report ...``; see ``python -m bench --help``.
Results go to ``bench/results/<device-slug>/`` (or ``--out DIR``) as JSON, markdown
and PNG plots; ``bench/report.py`` turns committed results into the README section.
"""
