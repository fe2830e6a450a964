"""The ``graphopt`` command line (``graphopt.tools.cli``)."""
