"""What the four levels share.

Two parts, and the tree shows which is which (docs/layout.md gives the reading order):
- the lesson core, the modules directly in common/: data and splits, augmentation, models, the device and the
  training loop, metrics, plots, the live display, `cifarnet`. A learner reads these beside the levels.
- the runner's machinery, common/runner/: a level's run from start to end (LevelRun), the command line, kept
  records and filing, summary.md and the README's generated blocks, the benchmark, `run.py predict`.

The core never imports the runner, and no module imports a level; tests/test_layout.py holds both rules
(import-linter's contracts in .importlinter).
"""
