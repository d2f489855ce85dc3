package rpc

import (
	"context"
	"encoding/json"
	"io"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"matchlock.dev/matchlock/sandbox"
)

// maxBufferedOutput bounds what exec keeps of each of stdout and stderr;
// the rest is read and dropped (and the result says so). With base64 the
// result line stays under 12 MiB.
const maxBufferedOutput = 4 << 20

// outputChunk is the most one exec_output notification carries.
const outputChunk = 64 << 10

// defaultPath is used when neither the image nor the request sets PATH
// (Docker's choice).
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

type execMode int

const (
	modeBuffered execMode = iota // exec
	modeStream                   // exec_stream
	modePipe                     // exec_pipe
	modeTTY                      // exec_tty
)

type execParams struct {
	ID      string            `json:"id"`
	Command string            `json:"command"`
	Argv    []string          `json:"argv"`
	Env     map[string]string `json:"env"`
	Workdir string            `json:"workdir"`
	User    string            `json:"user"`
	// Stdin is the whole standard input (base64), for exec and exec_stream.
	Stdin []byte `json:"stdin"`
	// Rows and Cols are the initial window size, for exec_tty.
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

type execResult struct {
	ExitCode   int   `json:"exit_code"`
	Signal     int   `json:"signal"`
	DurationMS int64 `json:"duration_ms"`
	// Buffered exec only (base64).
	Stdout          *[]byte `json:"stdout,omitempty"`
	Stderr          *[]byte `json:"stderr,omitempty"`
	StdoutTruncated bool    `json:"stdout_truncated,omitempty"`
	StderrTruncated bool    `json:"stderr_truncated,omitempty"`
}

type outputParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Stream    string          `json:"stream"` // "stdout" or "stderr"
	Data      []byte          `json:"data"`   // base64
}

func handleExec(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.runExec(ctx, c, raw, modeBuffered)
}

func handleExecStream(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.runExec(ctx, c, raw, modeStream)
}

func handleExecPipe(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.runExec(ctx, c, raw, modePipe)
}

func handleExecTTY(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	return s.runExec(ctx, c, raw, modeTTY)
}

func (p *execParams) argv(mode execMode) ([]string, *Error) {
	switch {
	case p.Command != "" && len(p.Argv) > 0:
		return nil, errorf(CodeInvalidParams, `invalid params: give "command" or "argv", not both`)
	case strings.IndexByte(p.Command, 0) >= 0:
		return nil, errorf(CodeInvalidParams, `invalid params: "command" contains a NUL byte`)
	case p.Command == "" && len(p.Argv) == 0:
		return nil, errorf(CodeInvalidParams, `invalid params: "command" (a shell command line) or "argv" is required`)
	}
	if len(p.Argv) > 0 && p.Argv[0] == "" {
		return nil, errorf(CodeInvalidParams, `invalid params: "argv"[0] is empty`)
	}
	if p.Stdin != nil && (mode == modePipe || mode == modeTTY) {
		return nil, errorf(CodeInvalidParams, `invalid params: "stdin" is for exec and exec_stream; send input with the stdin method`)
	}
	if (p.Rows != 0 || p.Cols != 0) && mode != modeTTY {
		return nil, errorf(CodeInvalidParams, `invalid params: "rows" and "cols" are for exec_tty`)
	}
	for _, a := range p.Argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, errorf(CodeInvalidParams, `invalid params: "argv" contains a NUL byte`)
		}
	}
	if p.Command != "" {
		return []string{"/bin/sh", "-c", p.Command}, nil
	}
	return p.Argv, nil
}

func (s *session) runExec(ctx context.Context, c *call, raw json.RawMessage, mode execMode) (any, error) {
	var p execParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	argv, aerr := p.argv(mode)
	if aerr != nil {
		return nil, aerr
	}
	if err := validEnv("env", p.Env); err != nil {
		return nil, err
	}
	e, untie, err := s.lookup(c, p.ID)
	if err != nil {
		return nil, err
	}
	defer untie()

	img := e.sb.ImageConfig()
	opts := sandbox.ExecOptions{
		Argv:  argv,
		Env:   execEnv(e, p.Env, mode == modeTTY),
		Dir:   first(p.Workdir, e.opts.Workdir, img.WorkingDir),
		User:  first(p.User, e.opts.User, img.User),
		Stdin: mode == modePipe || mode == modeTTY || p.Stdin != nil,
		TTY:   mode == modeTTY,
		Rows:  p.Rows, Cols: p.Cols,
	}
	t0 := time.Now()
	proc, err := e.sb.Exec(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer proc.Close()
	// Cancellation (cancel, close, session end) kills the process: SIGKILL
	// goes out before the stream is dropped, so the guest acts on it.
	var killOnce sync.Once
	kill := func() {
		killOnce.Do(func() {
			proc.Signal(syscall.SIGKILL)
			proc.Close()
		})
	}
	stopKill := context.AfterFunc(ctx, kill)
	defer stopKill()

	s.mu.Lock()
	c.proc = proc
	stdin := c.stdin
	s.mu.Unlock()
	switch {
	case stdin != nil:
		stdin.start(proc.Stdin())
		if mode == modeTTY {
			go s.resizer(ctx, c, proc)
		}
	case p.Stdin != nil:
		go func() {
			w := proc.Stdin()
			w.Write(p.Stdin)
			w.Close()
		}()
	}

	var wg sync.WaitGroup
	var outBuf, errBuf capBuffer
	wg.Add(2)
	if mode == modeBuffered {
		go func() { defer wg.Done(); io.Copy(&outBuf, proc.Stdout()) }()
		go func() { defer wg.Done(); io.Copy(&errBuf, proc.Stderr()) }()
	} else {
		go func() { defer wg.Done(); s.pump(c.id, "stdout", proc.Stdout()) }()
		go func() { defer wg.Done(); s.pump(c.id, "stderr", proc.Stderr()) }()
	}
	st, werr := proc.Wait(ctx)
	if ctx.Err() != nil {
		kill()
		wg.Wait()
		return nil, ctx.Err()
	}
	wg.Wait()
	if werr != nil {
		return nil, werr
	}
	res := &execResult{ExitCode: st.Code, Signal: st.Signal, DurationMS: time.Since(t0).Milliseconds()}
	if mode == modeBuffered {
		if outBuf.b == nil {
			outBuf.b = []byte{}
		}
		if errBuf.b == nil {
			errBuf.b = []byte{}
		}
		res.Stdout, res.Stderr = &outBuf.b, &errBuf.b
		res.StdoutTruncated, res.StderrTruncated = outBuf.truncated, errBuf.truncated
	}
	return res, nil
}

// pump sends r's bytes as exec_output notifications until EOF or error.
func (s *session) pump(id json.RawMessage, stream string, r io.Reader) {
	buf := make([]byte, outputChunk)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if s.out.notify("exec_output", outputParams{RequestID: id, Stream: stream, Data: buf[:n]}) != nil {
				io.Copy(io.Discard, r) // the client is gone: keep the guest unblocked
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// resizer applies the latest requested window size whenever it changes.
func (s *session) resizer(ctx context.Context, c *call, proc Process) {
	for {
		select {
		case <-c.resized:
			s.mu.Lock()
			r := c.resize
			s.mu.Unlock()
			if r != nil {
				proc.Resize(r[0], r[1])
			}
		case <-ctx.Done():
			return
		}
	}
}

// capBuffer keeps the first maxBufferedOutput bytes written to it.
type capBuffer struct {
	b         []byte
	truncated bool
}

func (c *capBuffer) Write(p []byte) (int, error) {
	n := len(p) // the rest is read and dropped: the guest must not block
	room := maxBufferedOutput - len(c.b)
	if len(p) > room {
		c.truncated = true
		p = p[:max(room, 0)]
	}
	c.b = append(c.b, p...)
	return n, nil
}

// execEnv is the image's environment (which holds the secrets'
// placeholders), then create's env, then the request's; later keys win,
// order kept.
func execEnv(e *entry, extra map[string]string, tty bool) []string {
	env := append([]string(nil), e.sb.ImageConfig().Env...)
	env = mergeEnv(env, mapEnv(e.opts.Env))
	env = mergeEnv(env, mapEnv(extra))
	if envLookup(env, "PATH") == "" {
		env = append(env, defaultPath)
	}
	if tty && envLookup(env, "TERM") == "" {
		env = append(env, "TERM=xterm")
	}
	return env
}

func mapEnv(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]string, 0, len(m))
	for _, k := range keys {
		out = append(out, k+"="+m[k])
	}
	return out
}

func mergeEnv(base, extra []string) []string {
	out := append([]string(nil), base...)
	idx := map[string]int{}
	for i, kv := range out {
		k, _, _ := strings.Cut(kv, "=")
		idx[k] = i
	}
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func envLookup(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

func validEnv(field string, m map[string]string) *Error {
	for k, v := range m {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return errorf(CodeInvalidParams, "invalid params: %q: bad variable name %q", field, k)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return errorf(CodeInvalidParams, "invalid params: %q: the value of %s contains a NUL byte", field, k)
		}
	}
	return nil
}

func first(vals ...string) string {
	for _, v := range vals {
		if v != "" {
			return v
		}
	}
	return ""
}

// --- signal ----------------------------------------------------------------

type signalParams struct {
	RequestID json.RawMessage `json:"request_id"`
	Signal    json.RawMessage `json:"signal"` // a number, or a name: "TERM", "SIGTERM"
}

var signalNames = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT, "KILL": syscall.SIGKILL,
	"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "PIPE": syscall.SIGPIPE, "ALRM": syscall.SIGALRM,
	"TERM": syscall.SIGTERM, "CONT": syscall.SIGCONT, "STOP": syscall.SIGSTOP, "TSTP": syscall.SIGTSTP,
	"WINCH": syscall.SIGWINCH,
}

func parseSignal(raw json.RawMessage) (syscall.Signal, *Error) {
	bad := errorf(CodeInvalidParams, `invalid params: "signal": want a number from 1 to 64 or a name such as "TERM"`)
	var name string
	if json.Unmarshal(raw, &name) == nil {
		if sig, ok := signalNames[strings.TrimPrefix(strings.ToUpper(name), "SIG")]; ok {
			return sig, nil
		}
		n, err := strconv.Atoi(name)
		if err != nil {
			return 0, bad
		}
		raw = json.RawMessage(strconv.Itoa(n))
	}
	var n int
	if json.Unmarshal(raw, &n) != nil || n < 1 || n > 64 {
		return 0, bad
	}
	return syscall.Signal(n), nil
}

func handleSignal(ctx context.Context, s *session, c *call, raw json.RawMessage) (any, error) {
	var p signalParams
	if err := decodeParams(raw, &p); err != nil {
		return nil, err
	}
	key, kerr := requestRef{p.RequestID}.key()
	if kerr != nil {
		return nil, kerr
	}
	sig, serr := parseSignal(p.Signal)
	if serr != nil {
		return nil, serr
	}
	s.mu.Lock()
	target := s.calls[key]
	var proc Process
	if target != nil {
		proc = target.proc
	}
	s.mu.Unlock()
	if proc == nil {
		return nil, errorf(CodeUnknownRequest, "no running exec request %s", key)
	}
	if err := proc.Signal(sig); err != nil {
		return nil, errorf(CodeUnknownRequest, "request %s: the process has ended", key)
	}
	return struct{}{}, nil
}
