"""Generated Python stubs of the kubelet device-plugin API v1beta1 (../api.proto).

Do not edit the generated modules; regenerate them from the repository root with

    python -m grpc_tools.protoc \\
        -Igpucluster/agent/_proto=operator/gpucluster/agent \\
        --python_out=operator --grpc_python_out=operator --pyi_out=operator \\
        operator/gpucluster/agent/api.proto

The `-I<virtual>=<real>` mapping makes protoc see the proto as if it lived in
this package, so the generated `api_pb2_grpc` imports `api_pb2` by its full
package path and the modules import without any sys.path change. The generated
code checks at import that the installed grpcio and protobuf are at least the
versions that generated it (see the headers of the modules).
"""
