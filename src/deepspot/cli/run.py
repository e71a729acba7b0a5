"""``python -m deepspot.cli.run`` = the ``deepspot`` console script."""
from deepspot.cli import main

if __name__ == "__main__":
    main()
