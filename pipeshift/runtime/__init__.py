"""The serving engine: model, KV cache, stages and the processes that run them.

The only part of pipeshift that imports torch.
"""
