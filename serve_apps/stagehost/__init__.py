"""A provider's stage host: the project's own StageWorker behind gRPC over TLS (stage.proto).

`wire` is the codec (also used by the operator's direct links), `server` the provider's end, `client`
the coordinator's. The generated modules come from stage.proto:

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        serve_apps/stagehost/stage.proto
"""
