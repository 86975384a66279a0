"""`python -m vqar ...` and `accelerate launch -m vqar ...`."""

from .cli import main

main()
