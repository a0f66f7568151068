"""ftk's built-in plugins. Each module is loaded through the `ftk` entry-point group,
exactly like a third-party plugin, and uses only the public hooks in `ftk.hookspecs`."""
