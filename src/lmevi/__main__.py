"""``python -m lmevi``: the same command line as the ``lmevi`` script (see :mod:`lmevi.cli`)."""

from lmevi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
