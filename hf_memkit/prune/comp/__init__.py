"""See config.py for the recipe key, the paper and when (not) to use it."""
