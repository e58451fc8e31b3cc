"""``python -m detseg ...`` (and ``torchrun -m detseg ...``) runs the command line."""

from detseg.cli import main

main()
