#!/usr/bin/env node
// A caller not written in Python: one Converse call to the gateway with @grpc/grpc-js, the API loaded
// from protos/ at run time (@grpc/proto-loader; no generated code), so a proto change that breaks
// foreign callers shows here. It speaks one push-to-talk utterance (G.711 mu-law, 8 kHz, paced in
// 20 ms frames like a phone), waits for the answer, hangs up, and prints one JSON line on stdout:
//   {"status": "OK"|<grpc status name>, "details", "session_id", "output_format", "audio_bytes",
//    "audio_chunks", "audio_formats", "text", "turn_finished", "errors"}
// and exits 0 only when the call ended OK.
//
// Usage: node client.js --target HOST:PORT --audio FILE [--ca FILE [--cert FILE --key FILE]
//                       [--server-name NAME] | --plaintext] [--max-new-tokens N] [--timeout-s S]
// The API key comes from $VITA_API_KEY (sent as x-api-key metadata), never from argv: `ps` shows argv.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const FRAME_BYTES = 160; // 20 ms of mu-law at 8 kHz (one byte per sample)
const FRAME_MS = 20;

function parseArgs(argv) {
  const args = {maxNewTokens: 0, timeoutS: 120};
  const flags = {"--target": "target", "--audio": "audio", "--ca": "ca", "--cert": "cert", "--key": "key",
                 "--server-name": "serverName", "--max-new-tokens": "maxNewTokens", "--timeout-s": "timeoutS"};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--plaintext") { args.plaintext = true; continue; }
    const name = flags[argv[i]];
    if (!name || i + 1 >= argv.length) throw new Error(`unknown flag or missing value: ${argv[i]}`);
    args[name] = argv[++i];
  }
  if (!args.target || !args.audio) throw new Error("--target and --audio are required");
  if (!args.plaintext === !args.ca) throw new Error("give --ca FILE (TLS) or --plaintext, one of them");
  if (!args.cert !== !args.key) throw new Error("--cert and --key go together (a client certificate)");
  args.maxNewTokens = Number(args.maxNewTokens);
  args.timeoutS = Number(args.timeoutS);
  return args;
}

function channelCredentials(args) {
  if (args.plaintext) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(fs.readFileSync(args.ca),
                                    args.key ? fs.readFileSync(args.key) : null,
                                    args.cert ? fs.readFileSync(args.cert) : null);
}

function conversationStub(args) {
  const definition = protoLoader.loadSync("vita/audio/v1/conversation.proto",
    {includeDirs: [PROTOS], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true});
  const api = grpc.loadPackageDefinition(definition).vita.audio.v1;
  const options = args.serverName ? {"grpc.ssl_target_name_override": args.serverName} : {};
  return new api.Conversation(args.target, channelCredentials(args), options);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const audio = fs.readFileSync(args.audio);
  const metadata = new grpc.Metadata();
  if (process.env.VITA_API_KEY) metadata.set("x-api-key", process.env.VITA_API_KEY);

  const result = {status: "OK", details: "", session_id: "", output_format: null, audio_bytes: 0,
                  audio_chunks: 0, audio_formats: [], text: "", turn_finished: null, errors: []};
  const deadline = new Date(Date.now() + args.timeoutS * 1000);
  const call = conversationStub(args).Converse(metadata, {deadline});
  const formats = new Set();
  let timer = null;

  call.write({config: {input_format: {codec: "AUDIO_CODEC_MULAW", sample_rate: 8000}, push_to_talk: true,
                       max_new_tokens: args.maxNewTokens}});
  let offset = 0;
  const started = Date.now();
  // paced like a phone: frame n leaves at n x 20 ms (the gateway bounds how far audio may run ahead)
  function sendFrame() {
    if (offset >= audio.length) {
      call.write({control: {action: "END_OF_UTTERANCE"}});
      return;
    }
    call.write({audio: {data: audio.subarray(offset, offset + FRAME_BYTES)}});
    offset += FRAME_BYTES;
    timer = setTimeout(sendFrame, Math.max(0, started + (offset / FRAME_BYTES) * FRAME_MS - Date.now()));
  }

  call.on("data", (msg) => {
    if (msg.session_started) {
      result.session_id = msg.session_started.session_id;
      result.output_format = msg.session_started.output_format;
      sendFrame();
    } else if (msg.audio) {
      result.audio_bytes += msg.audio.data.length;
      result.audio_chunks += 1;
      formats.add(`${msg.audio.format.codec}/${msg.audio.format.sample_rate}`);
    } else if (msg.text) {
      result.text += msg.text.text;
    } else if (msg.error) {
      result.errors.push({code: msg.error.code, message: msg.error.message, turn: msg.error.turn});
      call.write({control: {action: "HANG_UP"}});
      call.end();
    } else if (msg.turn_finished) {
      result.turn_finished = {turn: msg.turn_finished.turn, audio_tokens: msg.turn_finished.audio_tokens,
                              text_tokens: msg.turn_finished.text_tokens};
      call.write({control: {action: "HANG_UP"}});
      call.end();
    }
  });
  call.on("error", (err) => {
    result.status = grpc.status[err.code] || String(err.code);
    result.details = err.details || err.message;
  });
  call.on("status", () => {
    clearTimeout(timer);
    result.audio_formats = [...formats];
    process.stdout.write(JSON.stringify(result) + "\n");
    process.exitCode = result.status === "OK" ? 0 : 1;
    // the channel keeps the event loop alive; nothing else is pending once the call has a status
    setImmediate(() => process.exit());
  });
}

try {
  main();
} catch (err) {
  process.stderr.write(`client.js: ${err.message}\n`);
  process.exit(2);
}
