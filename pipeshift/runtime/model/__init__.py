"""A Llama-family decoder in plain torch, its checkpoint format, tokenizer and random-model maker.

Import submodules directly; this package keeps its import light for the CLI.
"""
