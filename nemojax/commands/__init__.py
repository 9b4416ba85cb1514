"""One module per `nemojax` subcommand (see nemojax/cli.py)."""
