"""Compressed contexts: compress a document once, ask it many questions, keep it in a file.

:func:`~uncomp_cli.contexts.compress.compress_context` and :func:`~uncomp_cli.contexts.compress.ask`
in ``compress``; :func:`~uncomp_cli.contexts.file.save_context` and
:func:`~uncomp_cli.contexts.file.load_context` in ``file``. Built on the engine and the policies.
"""
