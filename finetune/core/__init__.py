"""finetune's base layer: what every other layer builds on, importing nothing above it.

- ``config``: ``FinetuneConfig`` and its options table; ``errors``: the error hierarchy;
- ``io``: atomic writes, YAML, safetensors headers; ``tempfiles``: their temp files' names and writers;
- ``seeding``: per-epoch and per-sample seeds;
- ``metrics``: accuracy, confusion, paired tests; ``monitor``: curves and the lecture's advice;
- ``confusion``: confusion.csv and what a page shows of a matrix too big to show whole;
- ``checkpoint``: last.pt / best weights, resume; ``distributed``: torchrun + DDP helpers; ``launch``: how this
  process was started (``zoo`` or torchrun's counts), for the resume command ``io.resume_command`` names;
- ``policy``: freeze depth from the data size; ``surgery``: head replacement, freezing, BatchNorm;
- ``optim``: parameter groups, optimizers, schedules; ``recipe``: the prepared model; ``ema``;
- ``signals``: SIGTERM taken as Ctrl-C (a run's and the CLI's one signal policy);
- ``threads``: the one ordered thread map; ``progress``: the one progress bar;
- ``devices``: what a device kind can do (float64 sums, non_blocking copies): CPU, CUDA, Apple MPS.
"""
