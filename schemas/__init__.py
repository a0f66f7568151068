"""JSON Schemas shipped with ftk (read with importlib.resources)."""
