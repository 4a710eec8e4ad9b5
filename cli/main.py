"""Placeholder; the CLI is built in issue #8."""

import typer

app = typer.Typer()
