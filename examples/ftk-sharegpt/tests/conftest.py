# Every ftk.testing fixture (fresh_manager, register_plugin, tiny_model, run_tiny_recipe).
pytest_plugins = ["ftk.testing"]
