"""moa command line (typer): `moa run`, stage commands for DVC, `moa ui`, `moa serve`."""
