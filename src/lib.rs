//! # Ivy
//!
//! Ivy is a hierarchical pub/sub server whose every event is kept in a persistent log. Clients
//! publish events to channels in a tree (`/rooms/abc/chat`); an event bubbles up to subscribers of
//! every ancestor channel; the log is readable by id, time range, glob and subtree. On disk, each
//! channel subtree (a **stream**) appends to CRC-checked **segment** files with a sparse timestamp
//! **index**; `storage-format.md` at the project root specifies every byte. The wire contract is
//! `../shared/ivy1-protocol.md` (ivy1, compatible with the original Go Ivy of 2014).
//!
//! This page is the map of the code for a newcomer. It names files, not lines, so it stays true.
//!
//! ## Entry points
//!
//! - `src/main.rs`: the `ivy` binary; parses the command line (`src/cli/`), starts logging, maps
//!   errors to exit codes (0 ok, 1 `verify` found problems, 2 could not run).
//! - `src/cli/serve.rs`: `ivy serve`: raises the descriptor limit and shares it out
//!   (`server/descriptors.rs`: connections, `StoreOptions::streams_max`), flags into
//!   `config::ServerOptions` and `storage::StoreOptions`, starts the thread that hands freed
//!   memory back to the system (`trim_memory_every`), then [`server::Server::serve`] until
//!   SIGINT/SIGTERM.
//! - [`server::Server`]: the server as a library type: `handle` answers one hyper request (to
//!   mount in a larger program), `serve` runs a listener.
//! - [`storage::Store::open`]: opens a data directory for writing (recovering each stream's tail);
//!   [`storage::Store::open_read_only`] for the offline tools.
//! - `src/cli/verify.rs`, `dump.rs`, `import.rs`, `stats.rs`: the offline tools, which need no server.
//! - `src/bin/ivy-bench/`: the load tool, a file per mode (publish, fan-out, history, idle
//!   connections, and the machine's own limits: `floor`, fan-out's clients against a bare socket
//!   writer; `history-floor`, history's readers against hyper with one fixed answer;
//!   `publish-floor`, publish's clients against a bare group commit to one file), beside the
//!   WebSocket client, the CPU report and the subscribers' receiver threads they share.
//!
//! ## Code map
//!
//! Layers, each using only the ones below it:
//!
//! ```text
//! binary   main.rs, cli/, bin/ivy-bench/                  clap, anyhow, indicatif, mio
//! serve    server/                                        hyper, fastwebsockets, tokio
//! config   config.rs  metrics.rs                          prometheus-client
//! core     storage/                wire/                  memmap2, crc32fast, parking_lot | pure
//! base     channel.rs  event_id.rs  clock.rs              std
//! ```
//!
//! ### `channel.rs`, `event_id.rs`, `clock.rs`
//! Channel paths (checked and normalised: `[0-9a-z._-]` segments, no `.`/`..`, 255 bytes, 32 deep),
//! globs and read selectors (one channel, `*` glob, `/**` subtree); event ids (`u64` ns since the
//! epoch, text `%010d.%09d`); the clock. **Architecture invariant:** only `clock.rs` reads the
//! system clock, and storage takes its clock as an option, so tests can make time stand still or
//! step back.
//!
//! ### `storage/` — the engine
//! - `mod.rs`: `StoreOptions`, `Durability`, the invariants of the engine.
//! - `store.rs`: the data directory: lock file, `IVY` metadata, routing a channel to its stream,
//!   appends (ids from the sequencer), readers, listings, stats, close.
//! - `commit.rs`: group commit: the sequencer that hands out ids, the writer thread that writes,
//!   syncs and publishes the **commit watermark**; after a failed round, the failed ids, the
//!   pause, and the resumption.
//! - `rollback.rs`: undoing a failed write in one stream: files cut back to the committed end,
//!   segments holding no committed event removed, the in-memory view rebuilt.
//! - `stream.rs`: one stream: its segments, the pending chunks, the in-memory channel heads and
//!   index of its live segment, snapshots for readers.
//! - `segment.rs`: one segment file: create (or take a spare), `pwrite`, the zeroes written a
//!   step ahead of a segment's records (so that commits overwrite, as in a spare), sync, seal,
//!   its sealed view and index.
//! - `spare.rs`: the zero-filled spare segment a background thread keeps ready, so that a stream
//!   that filled a segment writes its next one by overwriting (a faster `fdatasync`); its zeroes
//!   go out in small pieces paced by the writer's bytes, so the writer's syncs never wait behind
//!   a burst of them.
//! - `record.rs`: the byte codec (header, record, seal footer, trailer); no I/O.
//! - `index.rs`: the sparse index: which records get an entry, the file codec, seek.
//! - `read.rs`: `Reader` (a snapshot) and `Events` (lazy, merged by id, data borrowed from maps).
//! - `recovery.rs`: opening a stream: cut a torn tail, keep zeroes after the records as free space,
//!   refuse corruption in the middle, and tell the writer's seal from event data that ends like
//!   one (a rule `verify.rs` shares).
//! - `verify.rs`: the offline full check and the safe repairs.
//! - `io.rs`: `FileIo`, the writer's file operations (create, `pwrite`, `fdatasync`, directory
//!   sync, rename, the rollback's truncate and remove, and the spare's paced writeback) behind a
//!   trait, so
//!   `tests/power_loss.rs` can keep only what was made durable and `tests/faults.rs` can fail
//!   them.
//! - `tail.rs`: `Tail`, live reads of a selector bounded by the commit watermark.
//! - `layout.rs`: the only place that makes file names from channels and ids.
//! - `mmap.rs`: the crate's `unsafe` maps, under a written four-clause contract. (The one other
//!   `unsafe` is `io.rs`' call of `sync_file_range`, which takes no pointers.)
//!
//! **Architecture invariants:** storage knows nothing of HTTP, WebSocket, ivy1 text or tokio; it
//! stores raw event data, never escaped lines. Its waits (`event-listener`) serve threads and
//! async tasks alike. `verify`, `dump` and `stats` never write to a data directory.
//!
//! ### `wire/` — the ivy1 text forms
//! `line.rs`: event lines `@TS:/path:DATA` with the protocol's escaping (`%25`, `%0A`, `%0D`, a
//! final `%2E`, `%XX` for bytes outside UTF-8), and their parser (for `ivy import`).
//! `command.rs`: a WebSocket message into a command; `query.rs`: log query parameters;
//! `form.rs`: a POST body (urlencoded or multipart form, or raw) into data and sid;
//! `mask.rs`: the mask bit of a client's WebSocket frames, followed across reads (unmasked: 1002).
//! **Architecture invariant:** pure; no I/O, no storage, no clock; every function can be fuzzed.
//!
//! ### `server/` — ivy1 over WebSocket and HTTP
//! - `mod.rs`: `Server`: `listen` (a deep accept queue for connection bursts), accept loop,
//!   connection limit (a semaphore; past it, 503 and close), the budgets of POST bodies being
//!   received and of HTTP answers not yet written (`budget.rs`),
//!   WebSocket upgrade (Origin policy, `ivy1` subprotocol), graceful shutdown.
//! - `http/`: the hyper service. `mod.rs` routes, answers `/healthz` (503 once the store takes
//!   no writes until restart) and `/metrics`, and adds CORS. `read.rs` plans a log read and
//!   builds its inline part: on the async thread while it stays in live segments, on a blocking
//!   thread once it reaches sealed ones. `streamed.rs` sends a large answer (last-N included) a
//!   chunk at a time from blocking tasks, each read when the one before is taken, so a client
//!   that stops reading holds no thread, and past the inline part at most two chunks (a chunk
//!   ends before an event that would grow its buffer); each part of an answer carries its
//!   charge of the answer budget until hyper has written it. `cache.rs` keeps whole answers,
//!   and sends one again to the same request while it holds: an open read while its streams publish nothing
//!   (`Store::heads`), a range that ended for good (an answer is a function of the request and
//!   the events up to the watermark). `conditional.rs`: ETag, Cache-Control, 304, Range.
//!   `publish.rs`: HTTP publish (forms, multipart, raw).
//! - `ws.rs`: one connection: its reader task (frames, reassembly with the size limit, commands,
//!   the idle timeout: `Liveness`), run beside `writer.rs`, its writer task (drains the session
//!   into one write, sends acks once committed, pings, catches up from the log while lagging,
//!   gives back to the log what a stalled peer does not take, closes).
//! - `session.rs`: per-connection state: subscriptions, bounded queue, `Live`/`Lagging` mode,
//!   and the bound on replies not yet written, past which the reader stops reading frames.
//! - `tcp.rs`: the upgraded connection's socket, shared by its reader, its writer and the
//!   dispatcher (recovered from hyper's upgrade; an embedder's other streams take the plain
//!   path), what the kernel tells of its sending (`TCP_INFO`), which the idle timeout reads, and
//!   the optional bound on its kernel send buffer (`ws_send_buffer_bytes`).
//! - `budget.rs`: byte budgets shared by all connections: POST bodies being received, HTTP
//!   answers built and not yet written (a read waits for its share, 503 past `answer_wait`), and
//!   event bytes held for subscribers (queued, taken by a writer and not yet written, or read
//!   from the log to catch up): past that one, queues count as full and catch-up reads wait for
//!   their share (a quarter of the budget at most).
//! - `fanout.rs`: `Hub`: the subscription index (with the server-wide subscription cap),
//!   publish with sender exclusion, and the
//!   dispatcher thread that delivers committed events in id order, writing them to an idle
//!   connection's socket itself.
//! - `catchup.rs`: log reads for `+/path@TS` and for lagging sessions, a bounded batch at a
//!   time (events and bytes), however many subscriptions a session has (merged by id; one is
//!   read as it comes).
//! - `recent.rs`: the frames the dispatcher encoded last (8 MiB), which those reads take
//!   instead of encoding each event again for every session that fell behind.
//! - `linger.rs`: lingering close, so that an answer sent before the request was read whole (a
//!   413) reaches the client instead of being erased by a TCP reset; at most a 32nd of the
//!   descriptor limit lingers at once.
//! - `stall.rs`: `WriteStall`, the write timeout: a write the peer takes not one byte of for
//!   `write_timeout`, while it acknowledges nothing of what the socket holds (`tcp::sending`),
//!   ends the connection (HTTP and WebSocket), so a client that stopped reading does not hold
//!   its connection and buffers forever, and one that reads slowly is not taken for it.
//! - `descriptors.rs`: how the descriptor limit is shared out between connections, streams
//!   and lingering sockets, so that no client can take what the store needs to write.
//! - `error.rs`: store failures to HTTP statuses (507 disk full, 503 otherwise) and close codes
//!   (1013 while a write failure is temporary).
//!
//! **Architecture invariants:** only `server/` knows hyper and fastwebsockets. The dispatcher
//! never looks at a single stream's progress, only at the store's commit watermark, so every
//! connection sees strictly increasing, committed ids across streams written in parallel.
//!
//! `config.rs` holds the typed server limits (each with its unit; `StoreOptions` is storage's),
//! `metrics.rs` the Prometheus families (rendered by `prometheus-client`). The engine knows
//! nothing of Prometheus: metrics reads its running totals (`Store::totals`) and is told of each
//! commit round and fsync as its `CommitObserver` (`Store::observe_commits`), for histograms.
//!
//! ## One event's path through the engine
//!
//! 1. `Store::append` (`store.rs`) routes the channel to its stream (`ChannelPath::truncated` to
//!    the stream depth) and reserves room in the bounded pending budget (the thread waits while
//!    the writer is `pending_bytes_max` behind; async callers await `Store::room` instead and
//!    append with `append_batch_nowait_with`, which never blocks).
//! 2. Under the stream's lock it takes an id from the sequencer (`commit.rs`: strictly above the
//!    last, `+1 ns` when the clock stalls) and marks the stream dirty, then `StreamState::append`
//!    (`stream.rs`) rolls the segment if it is full or old (encoding the seal footer), and encodes
//!    the record (`record.rs`) into the pending chunk, linking it to the channel's previous record
//!    and feeding the sparse index (`index.rs`).
//! 3. The writer thread (`commit.rs`) takes every dirty stream's chunks in one round: one `pwrite`
//!    per chunk, one `fdatasync` per file under `always` (group commit), seals made durable before
//!    the next segment exists (made from the spare, `spare.rs`, when the sealed one was full). If any of it fails, nothing of the round is published: its ids are
//!    failed, the streams are cut back (`rollback.rs`), and appends pause for a second.
//! 4. Only then does it publish: each live segment's committed end and channel heads
//!    (`StreamState::mark_committed`), and the store's commit watermark; waiters wake
//!    (`Store::append` under `always` returns here).
//! 5. A reader (`read.rs`) snapshots the streams its selector touches and reads only committed
//!    bytes, through the maps (`segment.rs`, `mmap.rs`), checking every record's CRC.
//!
//! And through the server, for a WebSocket publish `#k#:/rooms/a:hi`:
//!
//! 1. `server/ws.rs` reads the frame (its bytes pass `wire/mask.rs` first), checks the message
//!    size, and `wire/command.rs` parses it (path checked by `ChannelPath`). A bad command is
//!    `#k#!reason`, or close 1008 unkeyed.
//! 2. A publish waits in the connection's batch (`Publishes` in `ws.rs`) while further messages
//!    are already read; before the reader would wait for the socket, or when another command
//!    comes, the reader awaits `Store::room` for the batch (so a disk far behind stops this
//!    connection's reads, never a runtime thread) and `Hub::publish_batch` (`server/fanout.rs`)
//!    appends the batch in one store call
//!    without waiting for the commit, recording each id as the publisher's own (sender
//!    exclusion) under the stream lock. Each ack `#k#@TS` is queued as pending.
//! 3. The engine commits it (steps 2–4 above). The connection's writer sends the ack once the
//!    watermark passes the id (durable under `always`).
//! 4. The dispatcher thread (`Hub::run_dispatcher`) reads the log up to the watermark, encodes
//!    the line once, walks `/rooms/a`, `/rooms`, `/` in the index and pushes the shared frame to
//!    each subscribed session once, except the publisher (consecutive events of one channel go
//!    as a run, under one lock of each session). A full queue (its own bound, or the
//!    server's outbound budget, `budget.rs`) turns the session `Lagging`: its writer reads
//!    the log itself (`catchup.rs`) and rejoins live under the hub
//!    lock, with no gap and no duplicate; past `lag_events_max` it is closed with 1013.
//! 5. Between deliveries, the dispatcher flushes the sessions whose queue turned non-empty,
//!    oldest first, 32 at a time, and looks at the watermark again in between, so an event
//!    committed during a long walk joins it (no session is given more than 256 events between
//!    two of its flushes). Flushing: if the connection's writer task is idle and nothing else
//!    waits to go out, it frames the queued events into one buffer and writes them to the
//!    socket without blocking; what the socket does not take (or everything, when the writer is
//!    busy) is left to the writer task, which formats every ready frame into one buffer and
//!    writes it in one call. A write of events the peer does not take for a second gives the
//!    events not yet begun back to the log (`give_back` in `writer.rs`; the catch-up writes alike):
//!    the session turns `Lagging` after the last event that reached the socket, so a peer that
//!    stopped reading holds one frame of the budget and of memory (`keep_only`), not its queue
//!    or a batch.
//!
//! ## Cross-cutting concerns
//!
//! - **Durability and acks.** `always`: an append returns once durable, and the server acks and
//!   delivers only then. `interval=MS` and `never`: an append returns once queued; readers see
//!   events once written. Seals are synced under every policy.
//! - **Errors.** One `thiserror` enum per layer (`storage::Error`, `wire::line::LineError`,
//!   `channel::PathError`); storage errors carry the file and byte offset. Only the binary uses
//!   `anyhow`. Corruption is an error, never "no data".
//! - **Limits.** Event size, segment size and age, index interval and pending bytes are options
//!   with their unit in their name (`StoreOptions`).
//! - **Tests.** Unit tests beside the code; `tests/server/` (a real server on 127.0.0.1:0,
//!   spoken to with a WebSocket client crate and raw HTTP: every row of the protocol page, the
//!   original JS client's behaviour, limits); `tests/storage.rs` (engine through its API),
//!   `tests/model.rs` (proptest against an in-memory model, with crash cuts), `tests/cli.rs` (the
//!   binary as a user runs it), `tests/storage_format.rs` (the format page's example and a
//!   committed format-1 archive), `tests/independent_reader.rs` (a Python reader and writer
//!   written from the format page alone, `independent_reader.py` and `independent_writer.py`,
//!   against the engine),
//!   `tests/crash.rs` (SIGKILL of a child server), `tests/power_loss.rs` (unsynced writes
//!   dropped), `tests/live_copy.rs` (a directory copied while written, then verified offline), `tests/faults.rs` and `tests/server/faults.rs` (full disk, read-only directory,
//!   descriptors shared out between connections and streams), `tests/load_tool.rs` (`ivy-bench` against a child server, its
//!   lost/duplicated/reordered checks and its resume after 1013); fuzz targets in `fuzz/` (bodies
//!   in `fuzzing.rs`, replayed by `tests/fuzz_regressions.rs`); benchmarks in `benches/`.
//! - **Observability.** `tracing`: warnings for cut tails and rebuilt indexes, errors for failed
//!   writes; nothing per event above `debug`. `GET /metrics`: appends, fsyncs, commit rounds,
//!   histograms of events per round, round time and fsync time, write failures, connections,
//!   subscriptions, deliveries, lagging sessions, HTTP requests by status.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod channel;
pub mod clock;
pub mod config;
pub mod event_id;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod wire;
