// Package rpc is matchlock's JSON-RPC 2.0 server: one session per line
// stream (standard input and output for `matchlock rpc`), a thin face over
// package sandbox. docs/rpc.md is the protocol's contract: every method,
// param, notification and error code.
//
// A session reads one JSON object per line (at most Config.MaxLine bytes;
// a longer line is discarded and answered CodeTooLarge) and handles each
// request in its own goroutine; writes are serialised whole lines. Methods
// that must stay ordered or must work at the in-flight limit (cancel,
// stdin, write_file_chunk, ...) run on the read loop without blocking.
// Client-sent bytes (stdin, file chunks) go through a bounded, ordered
// queue per stream (sink) to the guest, answered once the guest's flow
// control accepts them, so memory is bounded by Config's limits, not by
// what the client sends or the size of a file. File and output bytes are
// base64 in JSON.
//
// Every request's context is cancelled by `cancel`, by closing its
// sandbox, or by the end of the session (EOF on the input, or the context
// given to Serve); a cancelled exec's process is sent SIGKILL before the
// answer is written. At the end of a session every sandbox it created is
// closed.
//
// Sandbox and Process are the small interfaces the server needs;
// *sandbox.Sandbox provides them (bootVM), the tests also use an in-process
// fake. Network features (allow-list changes, port forwarding) are found
// on the sandbox by interface assertion and answered CodeNotSupported when
// missing.
package rpc
