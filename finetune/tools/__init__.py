"""finetune's tools: what a user runs, each driving the engine.

- ``train``: ``fit`` (the phase loop over one setup); ``features``: the cached-feature head path;
- ``diagnostics``: the LR range test and the overfit check; ``sweep``: grid search in log space;
- ``doctor``: leaks, duplicates, likely wrong labels, outliers; ``pages`` (on ``htmlpage``): the run and
  doctor HTML pages.
"""
