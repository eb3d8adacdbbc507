"""``python -m scrutiny``: the `scrutiny` command, where the console script is not on PATH."""

from scrutiny.cli import main

if __name__ == "__main__":
    main(prog_name="scrutiny")
