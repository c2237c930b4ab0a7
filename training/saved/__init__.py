"""Saved folders: loading them safely, writing them, their model card and figures, pushing them to the Hub."""
