"""`python -m zoo ...`: the `zoo` command; `python -m zoo fit -c ...` trains like `lightning fit`."""

from zoo.cli import zoo_main

if __name__ == "__main__":
    zoo_main()
