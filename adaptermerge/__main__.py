"""`python -m adaptermerge` runs the command line."""

from .cli import main

main()
