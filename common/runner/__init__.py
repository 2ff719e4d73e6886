"""The runner's machinery: what turns a lesson into a run that is resumable, recorded and summarized.

results.py (LevelRun: setup, metrics.json, checkpoints, model.pt, how a run ends), cli.py (the flags),
summary.py (summary.md and its checklist), readme.py (the README's generated blocks), filing.py (kept records in
results/), report.py (Level 4's report), predict.py (`run.py predict`), bench*.py (`run.py bench`).
It may import the lesson core (common/*.py); the core never imports it.
"""
