// Streams one chat completion through BASE_URL with the real openai Node SDK, printing one JSON line per
// thing seen: {"raw": "..."} for each chunk of bytes as it arrived (SSE comments included), {"delta": "..."}
// for each content delta the SDK yielded, then {"result": "done", "content": "..."} (exit 0), or
// {"result": "error", "name", "status", "message"} for an error the SDK raised (exit 1; 2 for anything else).
import OpenAI, { APIError } from "openai";

const [baseURL, model = "glm-4-9b-chat-1m", prompt = "Hello"] = process.argv.slice(2);
if (!baseURL) {
  console.error("usage: node stream.mjs BASE_URL [MODEL] [PROMPT]");
  process.exit(64);
}

const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");

// The SDK's own fetch, with the body teed so the bytes on the wire are printed as they arrive.
let rawDone = Promise.resolve();
async function teeFetch(url, init) {
  const response = await fetch(url, init);
  if (!response.body) return response;
  const [mine, theirs] = response.body.tee();
  rawDone = (async () => {
    const decoder = new TextDecoder();
    try {
      for await (const chunk of mine) say({ raw: decoder.decode(chunk, { stream: true }) });
    } catch {
      // the SDK's branch reports the failure
    }
  })();
  return new Response(theirs, { status: response.status, statusText: response.statusText, headers: response.headers });
}

const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60_000, fetch: teeFetch });
let content = "";
// every byte printed before the result, even when the SDK stopped reading first (bounded: a cut may hang)
const drained = () => Promise.race([rawDone, new Promise((resolve) => setTimeout(resolve, 2000))]);
try {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: prompt }],
    stream: true,
  });
  for await (const chunk of stream) {
    const delta = chunk.choices[0]?.delta?.content ?? "";
    if (delta) {
      content += delta;
      say({ delta });
    }
  }
  await drained();
  say({ result: "done", content });
  process.exit(0);
} catch (err) {
  await drained();
  const api = err instanceof APIError;
  say({ result: "error", name: err?.constructor?.name ?? "Error", status: api ? (err.status ?? null) : null, message: String(err?.message ?? err) });
  process.exit(api ? 1 : 2);
}
