"""The training loop shared by both stages, and what plugs into it."""
