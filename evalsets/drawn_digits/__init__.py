"""Digits drawn with the mouse on the service's own page: README.md."""
