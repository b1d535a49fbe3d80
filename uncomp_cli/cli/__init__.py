"""The ``uncomp`` command line: a thin Typer layer over the library (the only place typer is used)."""
