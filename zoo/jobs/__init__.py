"""What each long-running ``zoo`` command does behind its click command, one module per command:
``finetune`` (scan, resolve, build, fit, export), ``doctor`` (build a model, run the data checks, write the
findings), ``report`` (predict the validation set, draw the run page). Library code: raises, never prints;
imported by ``zoo.cli`` inside the commands, so ``zoo --help`` stays fast.
"""
