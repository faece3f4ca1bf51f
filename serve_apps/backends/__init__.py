"""Model replicas behind one contract (`protocol.ModelReplica`): the sharded transformers engine
(`serve_apps.server.pipeline_server.PipelineServer`), llama.cpp, vLLM and proxies to external APIs.

The gateway talks to every one of them the same way; `deployments.backend_deployment` picks the Serve
deployment of a catalogue entry by its `backend`.
"""
