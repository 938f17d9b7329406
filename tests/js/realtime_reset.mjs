// The JS `openai` SDK's Node class OpenAIRealtimeWS, used unchanged against the proxy's TLS listener.
// Usage: node realtime_reset.mjs <base URL, e.g. https://127.0.0.1:8443/v1>
// The key comes from OPENAI_API_KEY and the test CA from NODE_EXTRA_CA_CERTS. The SDK turns the base URL into
// wss://.../v1/realtime?model=gpt-realtime. The script creates one item, sends session.reset, waits for
// session.reset.completed and prints one JSON line: the URL, the item id, every event type it received and
// the completion event. Any error or a 10 s stall prints {"ok": false, ...} and exits 1.
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const baseURL = process.argv[2];
const client = new OpenAI({ apiKey: process.env.OPENAI_API_KEY, baseURL });
const rt = new OpenAIRealtimeWS({ model: 'gpt-realtime' }, client);
const received = [];
let itemId = null;

function finish(code, result) {
  clearTimeout(timer);
  console.log(JSON.stringify({ ...result, url: String(rt.url), item_id: itemId, received }));
  process.exitCode = code;
  rt.close();
}

const timer = setTimeout(() => finish(1, { ok: false, error: 'timed out after 10 s' }), 10_000);

rt.on('error', (err) => finish(1, { ok: false, error: String(err?.message ?? err) }));
rt.on('event', (event) => {
  received.push(event.type);
  if (event.type === 'session.created') {
    rt.send({
      type: 'conversation.item.create',
      item: { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'from node' }] },
    });
  } else if (event.type === 'conversation.item.added') {
    itemId = event.item.id;
    rt.send({ type: 'session.reset', event_id: 'js-reset' });
  } else if (event.type === 'session.reset.completed') {
    finish(0, { ok: true, completed: event });
  }
});
