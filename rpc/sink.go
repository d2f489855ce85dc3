package rpc

import (
	"encoding/json"
	"io"
	"sync"
)

// sinkDepth is how many chunks one sink queues before refusing more. A
// client that waits for each chunk's answer never gets near it.
const sinkDepth = 16

// sink delivers client-sent bytes (exec stdin, write_file chunks) to a
// writer in the order the read loop received them. The read loop enqueues
// without blocking; one goroutine per sink writes, which blocks on the
// guest's flow control, and answers each chunk once the guest has taken it.
// Queued bytes count against the session's backlog budget.
type sink struct {
	s *session
	q chan sinkItem

	once    sync.Once
	started chan struct{} // closed by start or close
	done    chan struct{} // closed by close
	w       io.WriteCloser
	// finish runs on the worker after an item with fin set (write_file_close).
	finish func(it sinkItem)

	mu       sync.Mutex
	closeErr *Error // guarded by mu: why items can no longer be taken
	failed   *Error // guarded by mu: first write error, reported for later items
}

type sinkItem struct {
	req  *request // answered once the item is taken; nil for a notification
	data []byte
	eof  bool // close the writer after data
	fin  bool // hand to finish after data (implies eof)
}

func newSink(s *session) *sink {
	return &sink{s: s, q: make(chan sinkItem, sinkDepth), started: make(chan struct{}), done: make(chan struct{})}
}

// enqueue queues an item sent by req, to be answered once the writer has
// taken it (a notification gets no answer). The caller holds s.mu (which
// also guards the backlog counter) and has checked that the sink's owner is
// still alive.
func (k *sink) enqueue(req *request, it sinkItem) *Error {
	if !req.isNotification() {
		it.req = req
	}
	n := int64(len(it.data))
	if k.s.backlog+n > k.s.cfg.MaxBacklogBytes {
		return errorf(CodeLimit, "too much data queued (limit %d bytes per session): wait for the answers to earlier chunks", k.s.cfg.MaxBacklogBytes)
	}
	select {
	case k.q <- it:
		k.s.backlog += n
		return nil
	default:
		return errorf(CodeLimit, "more than %d chunks queued for one stream: wait for the answers to earlier chunks", sinkDepth)
	}
}

// start begins delivery to w.
func (k *sink) start(w io.WriteCloser) {
	k.w = w
	close(k.started)
	go k.run()
}

// close stops delivery; items still queued, and any later ones, are
// answered with why. Safe to call more than once and before start.
func (k *sink) close(why *Error) {
	k.once.Do(func() {
		k.mu.Lock()
		k.closeErr = why
		k.mu.Unlock()
		close(k.done)
		select {
		case <-k.started:
		default:
			// Never started: nobody else will drain the queue.
			close(k.started)
			go k.drain()
		}
	})
}

func (k *sink) run() {
	for {
		select {
		case it := <-k.q:
			k.deliver(it)
		case <-k.done:
			k.drain()
			return
		}
	}
}

func (k *sink) drain() {
	for {
		select {
		case it := <-k.q:
			k.release(it)
			k.mu.Lock()
			e := k.closeErr
			k.mu.Unlock()
			k.answer(it, nil, e)
		default:
			return
		}
	}
}

func (k *sink) release(it sinkItem) {
	k.s.mu.Lock()
	k.s.backlog -= int64(len(it.data))
	k.s.mu.Unlock()
}

func (k *sink) deliver(it sinkItem) {
	k.mu.Lock()
	failed := k.failed
	k.mu.Unlock()
	if failed == nil && len(it.data) > 0 {
		if _, err := k.w.Write(it.data); err != nil {
			failed = k.fail(err)
		}
	}
	k.release(it)
	if it.fin {
		k.finish(it)
		return
	}
	if failed == nil && it.eof {
		if err := k.w.Close(); err != nil {
			failed = k.fail(err)
		}
	}
	if failed != nil {
		k.answer(it, nil, failed)
		return
	}
	k.answer(it, struct{}{}, nil)
}

func (k *sink) fail(err error) *Error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.failed == nil {
		if k.closeErr != nil {
			k.failed = k.closeErr
		} else {
			k.failed = errorf(CodeSandboxError, "write failed: %v", err)
		}
	}
	return k.failed
}

func (k *sink) answer(it sinkItem, res any, e *Error) {
	if it.req == nil {
		return
	}
	k.s.reply(it.req, res, e)
}

// --- stdin, resize and signal ----------------------------------------------

type stdinParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Data      []byte          `json:"data"` // base64
	EOF       bool            `json:"eof"`
}

func handleStdin(s *session, req *request) {
	var p stdinParams
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	key, kerr := requestRef{p.RequestID}.key()
	if kerr != nil {
		s.reply(req, nil, kerr)
		return
	}
	s.mu.Lock()
	c := s.calls[key]
	if c == nil || c.stdin == nil {
		s.mu.Unlock()
		s.reply(req, nil, errorf(CodeUnknownRequest, "no exec_pipe or exec_tty request %s in flight", key))
		return
	}
	err := c.stdin.enqueue(req, sinkItem{data: p.Data, eof: p.EOF})
	s.mu.Unlock()
	if err != nil {
		if req.isNotification() {
			// Data the client believes sent was dropped: the process
			// must not go on with a hole in its input.
			c.cancel(err)
			return
		}
		s.reply(req, nil, err)
	}
}

type resizeParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Rows      uint16          `json:"rows"`
	Cols      uint16          `json:"cols"`
}

func handleResize(s *session, req *request) {
	var p resizeParams
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	key, kerr := requestRef{p.RequestID}.key()
	if kerr != nil {
		s.reply(req, nil, kerr)
		return
	}
	if p.Rows == 0 || p.Cols == 0 {
		s.reply(req, nil, errorf(CodeInvalidParams, `invalid params: "rows" and "cols" must be positive`))
		return
	}
	s.mu.Lock()
	c := s.calls[key]
	if c == nil || c.method != "exec_tty" {
		s.mu.Unlock()
		s.reply(req, nil, errorf(CodeUnknownRequest, "no exec_tty request %s in flight", key))
		return
	}
	// The latest size wins; the exec's resizer goroutine applies it (and
	// one that arrives before the process starts is applied at start).
	c.resize = &[2]uint16{p.Rows, p.Cols}
	select {
	case c.resized <- struct{}{}:
	default:
	}
	s.mu.Unlock()
	s.reply(req, nil, nil)
}
