"""`python -m smelt` (and `torchrun -m smelt`) enters the same CLI as the `smelt` script."""

from smelt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
