"""moa command line (typer): `moa run`, `moa stage ...` (what dvc.yaml runs), `moa evaluate`, `moa onboard`,
`moa ui`, `moa deploy`. Serving is MLflow's own: `mlflow models serve -m models:/moa-model@champion`."""
