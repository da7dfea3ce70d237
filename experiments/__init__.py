"""Experiment scripts: thin command-line interfaces over the library (``python -m experiments.<script>``)."""
