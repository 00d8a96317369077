"""``python -m callbrain`` is the ``callbrain`` command."""

from callbrain.cli import app

app()
