"""ftk-sharegpt: an ftk plugin package (the worked example of ftk's plugin docs).

Provides ``dataset:sharegpt`` (ShareGPT ``conversations`` and OpenAI ``messages`` files) and the
metrics ``metric:distinct_n`` and ``metric:exact_match``. ftk finds it through the entry point in
group ``ftk`` declared in pyproject.toml; nothing in ftk names this package.
"""
__version__ = "0.1.0"
