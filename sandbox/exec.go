package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"matchlock.dev/matchlock/guest/proto"
)

// ExecOptions describes a process to start in the guest.
type ExecOptions struct {
	Argv  []string `json:"argv"`
	Env   []string `json:"env,omitempty"` // full environment, KEY=VALUE
	Dir   string   `json:"dir,omitempty"`
	User  string   `json:"user,omitempty"`
	Stdin bool     `json:"stdin,omitempty"` // the caller will write to Process.Stdin
	TTY   bool     `json:"tty,omitempty"`
	Rows  uint16   `json:"rows,omitempty"`
	Cols  uint16   `json:"cols,omitempty"`
}

// ExitStatus is how a guest process ended.
type ExitStatus struct {
	Code   int // exit code, or 128+signal when killed by a signal
	Signal int // terminating signal, 0 if it exited
}

// GuestError is a request the guest agent refused or could not carry out.
type GuestError struct {
	Code    string // proto.ErrCode*
	Message string
}

func (e *GuestError) Error() string { return e.Message }

// Is lets callers test errors.Is(err, fs.ErrNotExist)-style via sentinels.
func (e *GuestError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Code == proto.ErrCodeNotFound
	case ErrPermission:
		return e.Code == proto.ErrCodePermission
	}
	return false
}

// Sentinels matched by GuestError.
var (
	ErrNotFound   = errors.New("not found in the guest")
	ErrPermission = errors.New("permission denied in the guest")
)

func guestError(m *proto.StreamMsg) error {
	return &GuestError{Code: m.ErrorCode, Message: m.Error}
}

// Process is a running guest process.
type Process struct {
	st      *proto.Stream
	started *proto.StreamMsg

	waitOnce sync.Once
	status   ExitStatus
	err      error
}

// Exec starts a process. Its output must be read from Stdout and Stderr
// (or the process will block once the flow-control window fills).
func (s *Sandbox) Exec(ctx context.Context, o ExecOptions) (*Process, error) {
	if len(o.Argv) == 0 {
		return nil, errors.New("exec: empty command")
	}
	st, err := s.OpenStream(ctx, proto.Encode(proto.OpenHeader{Kind: proto.KindExec, Exec: &proto.ExecRequest{
		Argv: o.Argv, Env: o.Env, Dir: o.Dir, User: o.User, Stdin: o.Stdin, TTY: o.TTY, Rows: o.Rows, Cols: o.Cols,
	}}))
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	b, err := st.RecvMsg(ctx)
	if err != nil {
		st.Reset("cancelled")
		return nil, fmt.Errorf("exec: %w", err)
	}
	m, err := proto.DecodeStreamMsg(b)
	if err != nil {
		st.Reset("bad message")
		return nil, fmt.Errorf("exec: %w", err)
	}
	switch m.Type {
	case proto.MsgStarted:
	case proto.MsgError:
		st.Close()
		return nil, guestError(m)
	default:
		st.Reset("unexpected message")
		return nil, fmt.Errorf("exec: unexpected %q before start", m.Type)
	}
	return &Process{st: st, started: m}, nil
}

// Pid is the guest pid.
func (p *Process) Pid() int { return p.started.Pid }

// Stdout reads the process's standard output (the PTY with TTY).
func (p *Process) Stdout() io.Reader { return p.st.Reader(proto.Stdout) }

// Stderr reads the process's standard error (empty with TTY).
func (p *Process) Stderr() io.Reader { return p.st.Reader(proto.Stderr) }

// Stdin writes the process's standard input; Close sends EOF.
func (p *Process) Stdin() io.WriteCloser { return p.st.Writer(proto.Stdin) }

// Signal delivers a signal to the process.
func (p *Process) Signal(sig syscall.Signal) error {
	return p.st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgSignal, Signal: int(sig)}))
}

// Resize sets the PTY window size.
func (p *Process) Resize(rows, cols uint16) error {
	return p.st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResize, Rows: rows, Cols: cols}))
}

// Wait blocks until the process exits. Output already sent by the guest is
// still readable from Stdout/Stderr after Wait returns: the guest sends the
// exit status only after the end of both streams.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	p.waitOnce.Do(func() {
		for {
			b, err := p.st.RecvMsg(ctx)
			if err != nil {
				p.err = fmt.Errorf("wait: %w", err)
				return
			}
			m, err := proto.DecodeStreamMsg(b)
			if err != nil {
				p.err = err
				return
			}
			switch m.Type {
			case proto.MsgExit:
				p.status = ExitStatus{Code: m.Code, Signal: m.Signal}
				if m.Signal > 0 {
					p.status.Code = 128 + m.Signal
				}
				return
			case proto.MsgError:
				p.err = guestError(m)
				return
			}
		}
	})
	return p.status, p.err
}

// Close releases the stream. A process still running keeps running.
func (p *Process) Close() error { return p.st.Close() }

// Output runs argv and returns its collected output; a convenience for
// tests and the SDK's buffered exec.
func (s *Sandbox) Output(ctx context.Context, o ExecOptions) (stdout, stderr []byte, st ExitStatus, dur time.Duration, err error) {
	t0 := time.Now()
	p, err := s.Exec(ctx, o)
	if err != nil {
		return nil, nil, st, 0, err
	}
	defer p.Close()
	if o.Stdin {
		p.Stdin().Close()
	}
	var wg sync.WaitGroup
	var ob, eb limitedBuffer
	wg.Add(2)
	go func() { defer wg.Done(); io.Copy(&ob, p.Stdout()) }()
	go func() { defer wg.Done(); io.Copy(&eb, p.Stderr()) }()
	st, err = p.Wait(ctx)
	wg.Wait()
	return ob.b, eb.b, st, time.Since(t0), err
}

// maxOutput bounds buffered exec output kept in host memory.
const maxOutput = 64 << 20

type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := maxOutput - len(l.b); room > 0 {
		if len(p) > room {
			l.b = append(l.b, p[:room]...)
		} else {
			l.b = append(l.b, p...)
		}
	}
	return len(p), nil
}
