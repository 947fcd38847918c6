"""Where the pyfunc model class lived before it moved to tasks/pyfunc.py. Model versions registered before
the move name `moa_cli.pyfunc.MoAPyfunc` in their pickled python_model; this alias keeps them loading."""

from tasks.pyfunc import MoAPyfunc, signature  # noqa: F401
