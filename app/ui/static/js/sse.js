// Server-Sent Events over a streaming fetch(), because EventSource cannot send an Authorization
// header. Parses the text/event-stream format of the HTML standard and, when the connection drops,
// reconnects with Last-Event-ID so that the stream resumes after the last event received.

import { ApiError, authHeaders, formatDetail } from "./api.js";

/** Incremental parser: push() text as it arrives; onEvent({id, event, data}) per complete event. */
export class SSEParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.lastEventId = "";
  }

  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A lone "\r" at the very end may be the first half of "\r\n": wait for the next chunk.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return; // comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }

  dispatch() {
    if (this.data.length === 0) {
      this.event = "";
      return;
    }
    const event = { id: this.lastEventId, event: this.event || "message", data: this.data.join("\n") };
    this.data = [];
    this.event = "";
    this.onEvent(event);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Follow an SSE endpoint of this API. onEvent({id, event, data}) for each event (data as text);
 * onState("open" | "reconnecting" | "closed", error?) as the connection changes. The stream is
 * over when the server ends it after an event for which isFinal(event) is true, or on an HTTP
 * 4xx (not retried). Returns {close()}.
 */
export function followEvents(path, { onEvent, onState = () => {}, isFinal = () => false }) {
  const controller = new AbortController();
  let closed = false;
  let lastEventId = "";
  let delay = 500;

  async function run() {
    while (!closed) {
      let finished = false;
      try {
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (lastEventId) headers["Last-Event-ID"] = lastEventId;
        const res = await fetch(path, { headers, signal: controller.signal, cache: "no-store" });
        if (!res.ok) {
          let detail = res.statusText;
          try {
            detail = (await res.json()).detail;
          } catch {}
          const error = new ApiError(res.status, detail);
          if (res.status < 500) {
            onState("closed", error);
            return;
          }
          throw error;
        }
        onState("open");
        delay = 500;
        const parser = new SSEParser((event) => {
          lastEventId = event.id || lastEventId;
          if (isFinal(event)) finished = true;
          onEvent(event);
        });
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
        }
        if (finished) {
          onState("closed");
          return;
        }
      } catch (error) {
        if (closed || error.name === "AbortError") return;
        onState("reconnecting", error instanceof ApiError ? error : new Error(formatDetail(String(error))));
      }
      if (closed) return;
      onState("reconnecting");
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  }

  run();
  return {
    close() {
      closed = true;
      controller.abort();
    },
  };
}
