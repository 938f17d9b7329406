// The Node `ws` relay anchor for the benchmark (the design OpenAI's console relay uses): every client connection
// opens one upstream connection and each message is sent on as it came, nothing parsed.
// node bench/ws_relay.mjs PORT UPSTREAM_URL   (ws resolved from tests/js/node_modules, see NODE_PATH in procs.py)
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.resolve(process.env.WS_MODULES, "package.json"));
const { WebSocket, WebSocketServer } = require("ws");

const [port, upstream] = process.argv.slice(2);
const server = new WebSocketServer({ host: "127.0.0.1", port: Number(port), perMessageDeflate: false });
server.on("connection", (client, request) => {
  const query = request.url.includes("?") ? request.url.slice(request.url.indexOf("?")) : "";
  const up = new WebSocket(upstream + query, { perMessageDeflate: false });
  const early = [];
  client.on("message", (data, isBinary) => {
    if (up.readyState === WebSocket.OPEN) up.send(data, { binary: isBinary });
    else early.push([data, isBinary]);
  });
  up.on("open", () => {
    for (const [data, isBinary] of early) up.send(data, { binary: isBinary });
    early.length = 0;
  });
  up.on("message", (data, isBinary) => client.send(data, { binary: isBinary }));
  const end = () => { client.terminate(); up.terminate(); };
  client.on("close", end); up.on("close", end);
  client.on("error", end); up.on("error", end);
});
