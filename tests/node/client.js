// A Node.js client of StreamFlow Serving that knows the contract only from the repo: the .proto files under
// protos/ (vendored google/rpc and grpc/health included) or the committed FileDescriptorSet.
//
//   node client.js ADDRESS protos|descriptor-set PROTOS_DIR KNOWN_USER UNKNOWN_USER
//
// Calls Predict, BatchPredict and ModelInfo, then a Predict that fails, and prints one JSON object: the three
// responses as proto-loader decodes them and the failure's status decoded from its `grpc-status-details-bin`
// trailer (google.rpc.Status, each detail unpacked by its type URL). Exits non-zero on any other failure.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");
require("protobufjs/ext/descriptor"); // Root.fromDescriptor, for the descriptor set

const [address, source, protosDir, knownUser, unknownUser] = process.argv.slice(2);
const CONTRACT = "streamflow/serving/v1/prediction_service.proto";
const ERROR_DETAILS = "google/rpc/error_details.proto";
const DESCRIPTOR_SET = "streamflow_serving_v1.binpb";
// Proto field names (`user_id`): loadFileDescriptorSetFromBuffer keeps them whatever keepCase says, so the
// .proto files are loaded with keepCase too and both sources give the same objects. Enums by name, int64 as
// strings, unset fields with their defaults, and each oneof's chosen field named in `outcome` / `value`.
const OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

// Two views of the same files: proto-loader's for grpc-js, protobufjs's to decode the error details.
function load() {
  if (source === "protos") {
    const root = new protobuf.Root();
    root.resolvePath = (origin, target) => path.join(protosDir, target); // like protoc -I protos
    return {
      definition: protoLoader.loadSync([CONTRACT, ERROR_DETAILS], { ...OPTIONS, includeDirs: [protosDir] }),
      root: root.loadSync([CONTRACT, ERROR_DETAILS], { keepCase: true }), // as Root.fromDescriptor names them
    };
  }
  if (source === "descriptor-set") {
    const bytes = fs.readFileSync(path.join(protosDir, DESCRIPTOR_SET));
    return {
      definition: protoLoader.loadFileDescriptorSetFromBuffer(bytes, OPTIONS),
      root: protobuf.Root.fromDescriptor(bytes),
    };
  }
  throw new Error(`unknown source ${source}: protos or descriptor-set`);
}

const { definition, root } = load();
const Status = root.lookupType("google.rpc.Status");
const { PredictionService } = grpc.loadPackageDefinition(definition).streamflow.serving.v1;
const client = new PredictionService(address, grpc.credentials.createInsecure());

// A google.rpc.Status as plain JSON, each `Any` detail unpacked into its message by its type URL.
function decodeStatus(status) {
  return {
    code: status.code,
    message: status.message,
    details: status.details.map((any) => {
      const type = root.lookupType(any.type_url.split("/").pop());
      return { "@type": type.fullName.slice(1), ...type.toObject(type.decode(any.value), OPTIONS) };
    }),
  };
}

function call(method, request) {
  const deadline = new Date(Date.now() + 30000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function main() {
  const predict = await call("Predict", { user_id: knownUser });
  const batch = await call("BatchPredict", { user_ids: [knownUser, unknownUser] });
  // A per-result error is a google.rpc.Status that proto-loader decoded, its details still packed.
  for (const result of batch.results) {
    if (result.error) {
      result.error = decodeStatus(result.error);
    }
  }
  const modelInfo = await call("ModelInfo", {});
  let failure = null;
  try {
    await call("Predict", { user_id: unknownUser });
  } catch (error) {
    const [details] = error.metadata.get("grpc-status-details-bin");
    failure = { grpcCode: error.code, status: decodeStatus(Status.decode(details)) };
  }
  client.close();
  process.stdout.write(JSON.stringify({ predict, batch, modelInfo, failure }));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
