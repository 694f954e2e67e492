"""Developer tools run as `python -m ldm.tools.<name>`."""
