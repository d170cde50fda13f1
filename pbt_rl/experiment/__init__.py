"""Experiments: arms x seeds of ordinary runs, and the statistics a paper would print.

:mod:`~pbt_rl.experiment.spec` (the spec file, checked whole), :mod:`~pbt_rl.experiment.runner`
(train / resume every run), :mod:`~pbt_rl.experiment.results` (results.json / results.md) and
:mod:`~pbt_rl.experiment.figures` (the plots). docs/experiments.md describes the format.
"""
