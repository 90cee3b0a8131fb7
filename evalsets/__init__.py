"""Evaluation sets kept in the repository: never trained on (each folder's README says how it was made)."""
