"""imgclf: the command-line client of the service."""
