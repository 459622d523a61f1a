"""The command-line entry points, one module each: `python -m mpp <command>` and the thin scripts in recipes/."""
