"""``python -m deepspot``: the same command line as the ``deepspot`` script."""
from deepspot.cli import main

if __name__ == "__main__":
    main()
