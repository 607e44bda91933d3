"""The Kubernetes operator for `LLMPipeline` resources (`pipeshift operator`).

Domain code (`spec`, `manifests`, `status`, `reconcile`) is plain Python that a test drives without a
cluster; `kube` is the only module that talks to the API server and `handlers` the only one that
knows kopf. Nothing here imports torch or `pipeshift.runtime`: the operator image has neither.
"""
