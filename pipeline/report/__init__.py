"""The build report: a data card of what a build holds, beside what its manifest asked for.

``make_report`` (``pipeline.report.report``) streams over a build's shards once, in
constant memory (counts and fixed-bin histograms, a bottom-k sample of rows for the
galleries), tests every degradation draw against the distribution the degrade settings
define, and writes an HTML page with matplotlib figures beside it. The training run and
held-out evaluation are read from the files the trainer and ``model/evaluate.py`` write:
``pipeline`` never imports ``model``.
"""
