"""What crosses to a worker and runs there: messages, pickling, the worker's context, cores.

Nothing here imports from above (backends, the run's machinery, the public face): a worker
process imports this package and the backend's worker loop, nothing more.
"""
