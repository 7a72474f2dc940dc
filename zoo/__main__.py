"""``python -m zoo`` (and ``torchrun -m zoo finetune ...``)."""
from zoo.cli import main

main()
