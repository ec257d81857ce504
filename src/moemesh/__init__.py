"""moemesh: Mixture-of-Experts transformer training with data, expert and tensor parallelism on one mesh."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here
