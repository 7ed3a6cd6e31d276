"""Server-Sent Events for run updates, in three modules: `framing` (the bytes of each frame), `frames`
(the generator of one stream's frames) and `response` (the response that sends them).

Frames (what an EventSource reads)
    An update:        `id: <stream id>` then `data: <stored JSON>` (one line), default `message`
                      event, so `onmessage` receives it and the browser remembers the id for its
                      `Last-Event-ID` on reconnect.
    Lost updates:     `event: truncated` with data `{"reason":"truncated","oldest_id":"<id>"}`, no
                      `id:` (the client's resume point does not move), before the oldest kept one.
    End of the run:   `event: end` with data `{"reason":"run_closed","status":"<STATUS>"}`, then the
                      response ends; clients should close their EventSource on it.
    Server stopping:  `event: end` with data `{"reason":"server_shutdown"}`, then the response ends;
                      the client reconnects (to another replica) with `Last-Event-ID`, losing nothing.
    Token expired:    `event: end` with data `{"reason":"token_expired"}` once the stream's token
                      (its `exp` plus the leeway every request gets) is no longer accepted, then the
                      response ends; the client reconnects with a fresh token and `Last-Event-ID`.
    Heartbeat:        the comment line `: ping` after `heartbeat_seconds` without a frame.
    Opening:          `retry: <ms>` (the client's reconnection delay) and the comment `: open`, sent
                      at once, before anything else: the client knows the stream is up, and has the
                      delay, even if nothing happens for a while.

Which task ends the stream
    - The run closed: the frame generator (`update_frames`). It learns it at open or from a poll of
      `closed_status` on its own schedule (every `poll_seconds`, heartbeat interval by default,
      whether or not updates flow), then asks the stream to `finish()`: the stream hands over what
      is stored after the last update sent, and the generator sends `end` and returns.
    - The client disconnected: under the server's protocol (`web.abortable`), `connection_lost`
      calls the response's callback (`on_disconnect` in the `ABORT_EXTENSION`), which expires the
      stream's deadline: its one task stops wherever it waits, with no second task on `receive()`.
      Elsewhere (TestClient, another server), or for a request with a body, Starlette's
      `listen_for_disconnect` task cancels the streaming task (ASGI < 2.4); under ASGI 2.4 `send`
      raises instead. Either way `EventStreamResponse.stream_response` closes the generator in its
      `finally`, whose own `finally` unsubscribes from the hub at once (synchronously: nothing to
      await while cancelled).
    - The client stopped reading: `EventStreamResponse` bounds every `send` by `send_timeout`; on
      expiry it stops sending, closes the generator the same way and aborts the connection (the
      server's `ABORT_EXTENSION`, see `web.abortable`): a plain close would wait, forever, for
      the client to read what is still buffered.
    - The hub dropped the subscription (its queue overflowed: the client read too slowly; or the
      process is shutting down): the generator returns without `end`; the client reconnects with
      `Last-Event-ID` and loses nothing, every update being stored.
    - Redis failed while reading stored updates: the generator returns without `end`, likewise.
    - The token expired: the generator's wait for the next event is bounded by the time the token
      has left (no timer of its own); it then sends `end` with `token_expired` and returns.
    - The server is stopping (SIGTERM): `cli.main` triggers the app's `core.shutdown.ServerShutdown`
      from uvicorn's signal handler, before uvicorn waits for open connections; every generator
      waiting for its next event is interrupted at once, sends `end` with `server_shutdown` and returns, so
      uvicorn's graceful shutdown finds only in-flight requests to finish.

How updates are sent
    While the generator waits for its next event, live updates do not wake it: the hub hands each
    one to the stream's sink, which writes its frame straight to the connection with the server's
    direct writer (`web.direct_write`, through `frames.DirectWrites`, which the response fills in).
    What the writer cannot take (the connection's writes are paused: the client reads slowly) is
    returned to the generator and sent through `send` under the send deadline, as every other frame
    is. Writing only while the generator waits keeps the frames in order: none of its own is then
    on its way.

However it ends, the response is completed when it can be and carries `Connection: close`, so the
server closes the connection with it rather than keeping it alive for another request.

Limits
    The streams open at once are capped per caller and per process (`handlers.stream_limits`); the
    stream's slot is released by `EventStreamResponse` when the response is over, however it ends.
"""
