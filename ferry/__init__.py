"""The `ferry` command: serve everything on one box, or run the web and worker processes."""
