"""``python -m cli``: the same as the ``imgclf`` command."""

from cli.main import app

app(prog_name="imgclf")
