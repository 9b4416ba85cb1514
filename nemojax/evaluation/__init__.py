"""`nemojax eval`: evaluation suites (suites.py) run against a checkpoint or an endpoint (runner.py)."""
