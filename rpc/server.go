package rpc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"matchlock.dev/matchlock/sandbox"
)

// ProtocolVersion is returned by create and ping. It changes only when a
// method or field changes meaning; additions keep the version.
const ProtocolVersion = 1

// Defaults for Config's limits.
const (
	DefaultMaxLine         = 4 << 20  // bytes in one input line
	DefaultMaxInFlight     = 64       // requests being handled at once
	DefaultMaxSandboxes    = 8        // sandboxes alive (or booting) at once
	DefaultMaxHandles      = 16       // open write_file handles
	DefaultMaxBacklogBytes = 64 << 20 // stdin and write_file data queued, not yet taken by a guest
)

// DefaultImages supplies the image source when Config.Images is nil. The
// CLI sets it to the image store.
var DefaultImages func() (sandbox.ImageSource, error)

// Config configures a session. The zero value is usable once DefaultImages
// is set.
type Config struct {
	// Images resolves create's image references; nil means DefaultImages.
	Images sandbox.ImageSource
	// Kernel, Agent and Accel are passed to every sandbox.New.
	Kernel, Agent, Accel string
	// Log receives one-line notices (for example that KVM is unusable).
	Log io.Writer

	MaxLine         int
	MaxInFlight     int
	MaxSandboxes    int
	MaxHandles      int
	MaxBacklogBytes int64

	// ShutdownGrace bounds how long Serve waits, after closing every
	// sandbox, for handlers to write their last responses. Default 10 s.
	ShutdownGrace time.Duration

	// NewSandbox boots a sandbox; nil means a real VM (sandbox.New).
	NewSandbox func(context.Context, sandbox.Options) (Sandbox, error)
}

func (c *Config) setDefaults() {
	if c.MaxLine <= 0 {
		c.MaxLine = DefaultMaxLine
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.MaxSandboxes <= 0 {
		c.MaxSandboxes = DefaultMaxSandboxes
	}
	if c.MaxHandles <= 0 {
		c.MaxHandles = DefaultMaxHandles
	}
	if c.MaxBacklogBytes <= 0 {
		c.MaxBacklogBytes = DefaultMaxBacklogBytes
	}
	if c.ShutdownGrace <= 0 {
		c.ShutdownGrace = 10 * time.Second
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
	if c.NewSandbox == nil {
		c.NewSandbox = bootVM
	}
}

// Serve runs one session: it reads requests from r, one JSON object per
// line, and writes responses and notifications to w, one per line. It
// returns when r reaches EOF (or fails, or w fails, or ctx is done), after
// closing every sandbox the session created. The returned error is nil on
// a clean EOF.
func Serve(ctx context.Context, r io.Reader, w io.Writer, cfg Config) error {
	cfg.setDefaults()
	s := newSession(ctx, w, cfg)
	lines := make(chan error, 1)
	go func() { lines <- s.readLoop(r) }()
	var err error
	select {
	case err = <-lines:
	case <-s.ctx.Done():
		err = s.writeErr()
		if err == nil {
			err = ctx.Err()
		}
	}
	s.shutdown()
	return err
}

// session is the state of one Serve call.
//
// Lock order: session.mu, then sink state (sinks never call back into the
// session with their lock held). lineWriter.mu is a leaf: it is never held
// while taking another lock.
type session struct {
	cfg    Config
	out    *lineWriter
	ctx    context.Context // cancelled (with a cause) when the session ends
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup // every handler goroutine

	mu sync.Mutex
	// The fields below are guarded by mu.
	closing   bool
	active    int               // handler goroutines running (requests and notifications)
	creating  int               // sandboxes being booted
	calls     map[string]*call  // in-flight requests by compacted id
	sandboxes map[string]*entry // by sandbox id
	handles   map[string]*writeHandle
	nextH     int
	backlog   int64 // bytes queued in sinks
}

// entry is one sandbox owned by the session.
type entry struct {
	sb     Sandbox
	opts   createParams // the session-level defaults for exec
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// call is one in-flight request.
type call struct {
	key    string
	id     json.RawMessage
	method string
	ctx    context.Context
	cancel context.CancelCauseFunc

	// For exec_pipe and exec_tty; guarded by session.mu.
	stdin   *sink
	proc    Process
	resize  *[2]uint16    // exec_tty: the latest window size asked for
	resized chan struct{} // exec_tty: cap 1, signalled when resize changes
}

func newSession(parent context.Context, w io.Writer, cfg Config) *session {
	s := &session{
		cfg:       cfg,
		calls:     map[string]*call{},
		sandboxes: map[string]*entry{},
		handles:   map[string]*writeHandle{},
	}
	s.ctx, s.cancel = context.WithCancelCause(parent)
	s.out = &lineWriter{w: w, onError: func(err error) {
		s.cancel(fmt.Errorf("rpc: write: %w", err))
	}}
	return s
}

func (s *session) writeErr() error {
	s.out.mu.Lock()
	defer s.out.mu.Unlock()
	return s.out.err
}

func (s *session) readLoop(r io.Reader) error {
	lr := newLineReader(r, s.cfg.MaxLine)
	for {
		line, tooLong, err := lr.next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("rpc: read: %w", err)
		}
		if s.ctx.Err() != nil {
			return nil
		}
		if tooLong {
			s.out.error(nullID, errorf(CodeTooLarge, "message too large: lines are limited to %d bytes; the line was discarded", s.cfg.MaxLine))
			continue
		}
		if len(trimSpace(line)) == 0 {
			continue
		}
		req, id, perr := parseRequest(line)
		if perr != nil {
			s.out.error(id, perr)
			continue
		}
		s.dispatch(req)
	}
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

// method describes one RPC method. Inline methods run on the read loop
// (they never block on a guest or the client) so that they stay ordered
// with respect to each other and keep working when the in-flight limit is
// reached; the others run in their own goroutine.
type method struct {
	inline func(s *session, req *request)
	run    func(ctx context.Context, s *session, c *call, params json.RawMessage) (any, error)
	// needsID: the method streams notifications naming its request id, so
	// a notification (no id) cannot use it.
	needsID bool
	// pipe: the request owns a stdin sink, created before the handler runs
	// so that stdin sent right after the request is never lost.
	pipe bool
	// unlimited: not refused at the in-flight limit, so that a client at
	// the limit can still close a sandbox (bounded by the sandbox count).
	unlimited bool
}

var methods map[string]method

func init() {
	methods = map[string]method{
		"ping":              {inline: handlePing},
		"cancel":            {inline: handleCancel},
		"stdin":             {inline: handleStdin},
		"resize":            {inline: handleResize},
		"write_file_chunk":  {inline: handleWriteChunk},
		"write_file_close":  {inline: handleWriteClose},
		"create":            {run: handleCreate},
		"close":             {run: handleClose, unlimited: true},
		"exec":              {run: handleExec},
		"exec_stream":       {run: handleExecStream, needsID: true},
		"exec_pipe":         {run: handleExecPipe, needsID: true, pipe: true},
		"exec_tty":          {run: handleExecTTY, needsID: true, pipe: true},
		"signal":            {run: handleSignal},
		"write_file_open":   {run: handleWriteOpen},
		"read_file":         {run: handleReadFile, needsID: true},
		"list_files":        {run: handleListFiles},
		"allow_list_add":    {run: handleAllowListAdd},
		"allow_list_delete": {run: handleAllowListDelete},
		"port_forward":      {run: handlePortForward},
	}
}

func (s *session) dispatch(req *request) {
	m, ok := methods[req.Method]
	if !ok {
		s.reply(req, nil, errorf(CodeMethodNotFound, "method not found: %q", req.Method))
		return
	}
	if !req.isNotification() {
		s.mu.Lock()
		dup := s.calls[string(req.ID)] != nil
		s.mu.Unlock()
		if dup {
			s.reply(req, nil, errorf(CodeInvalidRequest, "invalid request: id %s is already in flight", req.ID))
			return
		}
	}
	if m.inline != nil {
		m.inline(s, req)
		return
	}
	if m.needsID && req.isNotification() {
		return // nothing could name its output; nothing to answer
	}
	c := &call{id: req.ID, method: req.Method}
	if !req.isNotification() {
		c.key = string(req.ID)
	}
	c.ctx, c.cancel = context.WithCancelCause(s.ctx)

	s.mu.Lock()
	var rerr *Error
	switch {
	case s.closing:
		rerr = errSessionEnded
	case s.active >= s.cfg.MaxInFlight && !m.unlimited:
		rerr = errorf(CodeLimit, "too many requests in flight (limit %d): wait for some to finish", s.cfg.MaxInFlight)
	}
	if rerr != nil {
		s.mu.Unlock()
		c.cancel(nil)
		s.reply(req, nil, rerr)
		return
	}
	s.active++
	if c.key != "" {
		s.calls[c.key] = c
	}
	if m.pipe {
		c.stdin = newSink(s)
		c.resized = make(chan struct{}, 1)
	}
	s.wg.Add(1)
	s.mu.Unlock()

	go func() {
		defer s.wg.Done()
		res, err := s.safeRun(m, c, req.Params)
		s.mu.Lock()
		s.active--
		if c.key != "" {
			delete(s.calls, c.key)
		}
		stdin := c.stdin
		c.stdin, c.proc = nil, nil
		s.mu.Unlock()
		if stdin != nil {
			stdin.close(errorf(CodeUnknownRequest, "the process has ended"))
		}
		var rerr *Error
		if err != nil {
			rerr = s.toError(c.ctx, err)
		}
		c.cancel(nil)
		s.reply(req, res, rerr)
	}()
}

// safeRun runs a handler, turning a panic into an internal error so one
// bad request cannot take the session (and its VMs) down.
func (s *session) safeRun(m method, c *call, params json.RawMessage) (res any, err error) {
	defer func() {
		if p := recover(); p != nil {
			fmt.Fprintf(s.cfg.Log, "matchlock rpc: panic in %s: %v\n", c.method, p)
			res, err = nil, errorf(CodeInternal, "internal error in %s", c.method)
		}
	}()
	return m.run(c.ctx, s, c, params)
}

// reply answers a request; notifications get nothing.
func (s *session) reply(req *request, res any, e *Error) {
	if req.isNotification() {
		return
	}
	if e != nil {
		s.out.error(req.ID, e)
		return
	}
	s.out.result(req.ID, res)
}

// toError converts a handler error into a wire error, once.
func (s *session) toError(ctx context.Context, err error) *Error {
	var re *Error
	if errors.As(err, &re) {
		return re
	}
	if ctx.Err() != nil {
		if errors.As(context.Cause(ctx), &re) {
			return re
		}
		if s.ctx.Err() != nil {
			return errSessionEnded
		}
		return errCancelled
	}
	var ge *sandbox.GuestError
	if errors.As(err, &ge) {
		code := CodeGuestError
		switch {
		case errors.Is(err, sandbox.ErrNotFound):
			code = CodeNotFound
		case errors.Is(err, sandbox.ErrPermission):
			code = CodePermission
		}
		return &Error{Code: code, Message: err.Error(), Data: map[string]string{"guest_code": ge.Code}}
	}
	if errors.Is(err, sandbox.ErrClosed) {
		return &Error{Code: CodeSandboxClosed, Message: err.Error()}
	}
	return &Error{Code: CodeSandboxError, Message: err.Error()}
}

// lookup finds a sandbox and ties ctx's request to its lifetime: closing
// the sandbox cancels the request. The returned stop undoes the tie.
func (s *session) lookup(c *call, id string) (*entry, func(), error) {
	if id == "" {
		return nil, nil, errorf(CodeInvalidParams, `invalid params: "id" (the sandbox id) is required`)
	}
	s.mu.Lock()
	e := s.sandboxes[id]
	s.mu.Unlock()
	if e == nil {
		return nil, nil, errorf(CodeUnknownSandbox, "no sandbox %q in this session", id)
	}
	stop := context.AfterFunc(e.ctx, func() { c.cancel(context.Cause(e.ctx)) })
	return e, func() { stop() }, nil
}

// shutdown ends the session: no new requests, every request cancelled,
// every sandbox closed (concurrently), then a bounded wait for handlers.
func (s *session) shutdown() {
	s.mu.Lock()
	s.closing = true
	var all []*entry
	for id, e := range s.sandboxes {
		all = append(all, e)
		delete(s.sandboxes, id)
	}
	s.mu.Unlock()
	s.cancel(errSessionEnded)
	var wg sync.WaitGroup
	for _, e := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.cancel(errSessionEnded)
			e.sb.Close()
		}()
	}
	wg.Wait()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	t := time.NewTimer(s.cfg.ShutdownGrace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		fmt.Fprintf(s.cfg.Log, "matchlock rpc: %d handlers still running at shutdown (client not reading?)\n", s.activeCount())
	}
}

func (s *session) activeCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active
}

// --- inline methods --------------------------------------------------------

func handlePing(s *session, req *request) {
	var p struct{}
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	s.reply(req, map[string]int{"protocol_version": ProtocolVersion}, nil)
}

type requestRef struct {
	RequestID json.RawMessage `json:"request_id"`
}

func (r requestRef) key() (string, *Error) {
	if r.RequestID == nil || !validID(r.RequestID) || string(r.RequestID) == "null" {
		return "", errorf(CodeInvalidParams, `invalid params: "request_id" (the id of an in-flight request) is required`)
	}
	var buf bytes.Buffer
	json.Compact(&buf, r.RequestID)
	return buf.String(), nil
}

func handleCancel(s *session, req *request) {
	var p requestRef
	if err := decodeParams(req.Params, &p); err != nil {
		s.reply(req, nil, err.(*Error))
		return
	}
	key, kerr := p.key()
	if kerr != nil {
		s.reply(req, nil, kerr)
		return
	}
	s.mu.Lock()
	c := s.calls[key]
	s.mu.Unlock()
	if c != nil {
		c.cancel(errCancelled)
	}
	s.reply(req, map[string]bool{"cancelled": c != nil}, nil)
}
