"""Generates Python gRPC stubs for Envoy's RLS v3 and tallyd.quota.v1 with grpcio-tools, from
the .proto files themselves (Envoy's as the `envoy-types` crate ships them, tallyd's from
proto/): a client independent of tallyd's build. Every imported file is generated too.

usage: gen_stubs.py OUT_DIR ENVOY_PROTO_ROOT TALLYD_PROTO_ROOT
"""

import os
import re
import sys

import grpc_tools
from grpc_tools import protoc

ROOTS = ["data-plane-api", "xds", "protoc-gen-validate", "googleapis", "cel-spec", "opentelemetry-proto",
         "client_model", "ratelimit"]
WANTED = ["envoy/service/ratelimit/v3/rls.proto", "envoy/service/rate_limit_quota/v3/rlqs.proto",
          "tallyd/quota/v1/quota.proto"]


def main():
    out, envoy, tallyd = sys.argv[1:4]
    builtin = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    includes = [tallyd] + [os.path.join(envoy, root) for root in ROOTS if os.path.isdir(os.path.join(envoy, root))]

    def locate(name):
        for root in includes:
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        return None  # google/protobuf: grpc_tools has it

    todo, seen = list(WANTED), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = locate(name)
        if path is None:
            continue
        seen.add(name)
        with open(path) as source:
            todo.extend(re.findall(r'^import\s+(?:public\s+)?"([^"]+)";', source.read(), re.M))
    os.makedirs(out, exist_ok=True)
    args = ["protoc", f"-I{builtin}"] + [f"-I{root}" for root in includes]
    args += [f"--python_out={out}", f"--grpc_python_out={out}"] + sorted(seen)
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    main()
