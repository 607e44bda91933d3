"""Running pipeshift on one machine: stage agents as local processes, `serve` and the demo.

Nothing here imports torch; the processes it starts do.
"""
