"""`python -m kogcupy`: the `kogcupy` command."""
from .cli import main

main()
