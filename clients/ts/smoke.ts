// Smoke test of the TypeScript client generated from build/openapi.yaml (openapi-typescript types +
// openapi-fetch) against a live server: list runs, run details, signal, updates, and the SSE stream.
//
// Environment: BASE_URL (ends with /api/v1), API_TOKEN, SMOKE_WORKFLOW_ID / SMOKE_RUN_ID (an open
// AgentConversation run: the signal target), optionally SMOKE_CLOSED_WORKFLOW_ID / SMOKE_CLOSED_RUN_ID
// (a closed run whose stream is read to its `end` event). Prints one `ok ...` line per step and
// `SMOKE OK typescript` at the end; any failure exits 1.
//
// OpenAPI 3.1 gives text/event-stream no semantics and openapi-typescript has no SSE parser:
// the stream is fetched through the typed client with `parseAs: "stream"` and parsed by the small SSE
// consumer below; each `data` is then read as the generated `RunUpdate` / `StreamControl` type.
import createClient from "openapi-fetch";
import type { components, paths } from "workflow-runs-schema";

type Schemas = components["schemas"];
type RunUpdate = Schemas["RunUpdate"];
type StreamControl = Schemas["StreamControl"];

/** One dispatched Server-Sent Event, as the WHATWG EventSource algorithm builds it. */
interface SseEvent {
  event: string;
  data: string;
  id: string;
  retry?: number;
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`check failed: ${message}`);
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `probe` until it returns a value (services are eventually consistent), failing after `ms`. */
async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, ms = 30_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(300);
  }
}

/**
 * A minimal SSE parser (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
 * lines end with CRLF, LF or CR; `:` starts a comment (heartbeats); a blank line dispatches the event;
 * the last `id` persists across events, as EventSource keeps it for `Last-Event-ID`.
 */
async function* readSse(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent> {
  const decoder = new TextDecoder();
  let buffer = "";
  let lastId = "";
  let event = "";
  let data: string[] = [];
  let retry: number | undefined;
  let sawField = false;
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // A trailing CR may be the first half of CRLF: keep it until more text arrives.
      const lines = buffer.split(done ? /\r\n|\n|\r/ : /\r\n|\n|\r(?!$)/);
      buffer = done ? "" : (lines.pop() ?? "");
      for (const line of lines) {
        if (line === "") {
          if (sawField && data.length > 0) {
            const dispatched: SseEvent = { event: event || "message", data: data.join("\n"), id: lastId };
            if (retry !== undefined) dispatched.retry = retry;
            yield dispatched;
          }
          event = "";
          data = [];
          sawField = false;
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let text = colon === -1 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        sawField = true;
        if (field === "data") data.push(text);
        else if (field === "event") event = text;
        else if (field === "id" && !text.includes("\0")) lastId = text;
        else if (field === "retry" && /^\d+$/.test(text)) retry = Number(text);
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

function asRunUpdate(data: string, runId: string): RunUpdate {
  const update = JSON.parse(data) as RunUpdate;
  check(typeof update.timestamp === "number", "update.timestamp is a number");
  check(update.workflow_run_id === runId, "update.workflow_run_id is the run's id");
  check(typeof update.type === "string" && typeof update.message === "string", "update has type and message");
  return update;
}

async function main(): Promise<void> {
  const baseUrl = env("BASE_URL").replace(/\/+$/, "");
  const token = env("API_TOKEN");
  const workflowId = env("SMOKE_WORKFLOW_ID");
  const runId = env("SMOKE_RUN_ID");
  const client = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });
  const run = { params: { path: { workflowId, runId } } };

  // listWorkflowRuns: the run shows up (Temporal's visibility store can lag a little).
  const listed = await waitFor("the run in listWorkflowRuns", async () => {
    const { data, error, response } = await client.POST("/workflows/runs", { body: { page_size: 200 } });
    if (error) throw new Error(`listWorkflowRuns: ${response.status} ${error.message}`);
    const runs: Schemas["WorkflowRunSummary"][] = data.runs;
    return runs.some((r) => r.run_id === runId) ? runs : undefined;
  });
  console.log(`ok listWorkflowRuns: ${listed.length} runs, including ${runId}`);

  // getWorkflowRun: typed details of the open conversation.
  const details = await client.GET("/workflows/runs/{workflowId}/{runId}", run);
  if (details.error) throw new Error(`getWorkflowRun: ${details.response.status} ${details.error.message}`);
  const status: Schemas["WorkflowRunStatus"] = details.data.status;
  check(details.data.run_id === runId && details.data.workflow_id === workflowId, "details are the run's");
  check(status === "RUNNING", `the signal target is RUNNING (got ${status})`);
  console.log(`ok getWorkflowRun: ${details.data.type} ${status}, ${details.data.history.length} history events`);

  // The error shape is typed too: an unknown run answers 404 with an `Error` body.
  const missing = await client.GET("/workflows/runs/{workflowId}/{runId}", {
    params: { path: { workflowId, runId: "00000000-0000-4000-8000-000000000000" } },
  });
  check(missing.response.status === 404 && missing.error?.status === 404, "an unknown run answers 404");
  console.log(`ok getWorkflowRun (unknown run): 404 ${missing.error.errorCode ?? ""}`.trimEnd());

  // signalWorkflowRun: a UserInput signal with an extra field (SignalRequest allows additional properties).
  const text = `hello from typescript ${Date.now()}`;
  const signalled = await client.POST("/workflows/runs/{workflowId}/{runId}/signal/{signalName}", {
    params: { path: { workflowId, runId, signalName: "UserInput" } },
    body: { message: text, data: { client: "typescript" } },
  });
  if (signalled.error) throw new Error(`signalWorkflowRun: ${signalled.response.status} ${signalled.error.message}`);
  check(signalled.data.status === "success", "signal status is success");
  console.log(`ok signalWorkflowRun: ${signalled.data.message}`);

  // getWorkflowRunUpdates: the conversation answers the signal with an ANSWER update.
  const updates = await waitFor("the answer to the signal", async () => {
    const { data, error, response } = await client.GET("/workflows/runs/{workflowId}/{runId}/updates", {
      params: { path: { workflowId, runId }, query: { since: 0 } },
    });
    if (error) throw new Error(`getWorkflowRunUpdates: ${response.status} ${error.message}`);
    return data.messages.some((u) => u.type === "ANSWER" && u.message.includes(text)) ? data.messages : undefined;
  });
  console.log(`ok getWorkflowRunUpdates: ${updates.length} updates, the last: ${updates.at(-1)?.type ?? "none"}`);

  // streamWorkflowRunUpdates on the open run: the replay of the stored updates, then abort (it stays open).
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(new Error("stream read timed out")), 30_000);
  try {
    const opened = await client.GET("/workflows/runs/{workflowId}/{runId}/stream", {
      params: { path: { workflowId, runId }, query: { since: 0 } },
      parseAs: "stream",
      signal: abort.signal,
    });
    check(opened.response.status === 200, `stream answers 200 (got ${opened.response.status})`);
    check(opened.response.headers.get("content-type")?.startsWith("text/event-stream"), "stream content type");
    check(opened.data, "stream has a body");
    const received: RunUpdate[] = [];
    let retry: number | undefined;
    let lastId = "";
    for await (const event of readSse(opened.data)) {
      retry ??= event.retry;
      check(event.event === "message", `only update events while the run is open (got ${event.event})`);
      received.push(asRunUpdate(event.data, runId));
      lastId = event.id;
      if (received.length >= updates.length) break;
    }
    abort.abort();
    check(retry === 3000 || (retry !== undefined && retry > 0), "the first frame carries retry");
    check(
      JSON.stringify(received) === JSON.stringify(updates.slice(0, received.length)) && received.length === updates.length,
      "the stream replays exactly the stored updates",
    );
    check(/^\d+-\d+$/.test(lastId), "update events carry a log id");
    console.log(`ok streamWorkflowRunUpdates: retry ${retry}, ${received.length} update events, last id ${lastId}`);
  } finally {
    clearTimeout(timer);
  }

  // The stream of a closed run replays its updates, sends `end` and is closed by the server.
  const closedWorkflowId = process.env.SMOKE_CLOSED_WORKFLOW_ID;
  const closedRunId = process.env.SMOKE_CLOSED_RUN_ID;
  if (closedWorkflowId && closedRunId) {
    const opened = await client.GET("/workflows/runs/{workflowId}/{runId}/stream", {
      params: { path: { workflowId: closedWorkflowId, runId: closedRunId } },
      parseAs: "stream",
      signal: AbortSignal.timeout(30_000),
    });
    check(opened.response.status === 200 && opened.data, `closed-run stream answers 200 (got ${opened.response.status})`);
    let messages = 0;
    let end: StreamControl | undefined;
    for await (const event of readSse(opened.data)) {
      if (event.event === "message") {
        asRunUpdate(event.data, closedRunId);
        messages += 1;
      } else if (event.event === "end") {
        end = JSON.parse(event.data) as StreamControl;
      }
    }
    check(end?.reason === "run_closed" && end.status !== undefined && end.status !== "RUNNING", "an end event");
    console.log(`ok streamWorkflowRunUpdates (closed run): ${messages} update events, end ${end.reason} ${end.status}`);
  }

  console.log("SMOKE OK typescript");
}

main().catch((error: unknown) => {
  console.error(`SMOKE FAILED typescript: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  process.exit(1);
});
