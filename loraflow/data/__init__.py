"""Data files shipped inside the loraflow package, read with importlib.resources."""
