// Package sdk is the Go client of matchlock: it runs `matchlock rpc` as a
// child process and speaks its JSON-RPC protocol (docs/rpc.md) to create
// sandboxes, run commands in them and move files.
//
//	client, err := sdk.NewClient(sdk.DefaultConfig())
//	if err != nil { ... }
//	defer client.Close()
//	if _, err := client.Launch(sdk.New("alpine:latest").WithCPUs(2)); err != nil { ... }
//	res, err := client.Exec("echo hello")
//	fmt.Print(res.Stdout)
//
// A Client owns one server process; every sandbox it launched is removed
// when the Client is closed (or the program exits: the server sees EOF).
// The Client's Exec, WriteFile, ... act on the sandbox launched last;
// Client.VM gives a handle on any sandbox, with the same methods.
//
// All methods are safe for concurrent use. Methods without a context wait
// as long as the server takes; the ...Context variants cancel the request
// (and kill its guest process) when the context is done.
package sdk

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"matchlock.dev/matchlock/internal/tailbuf"
)

// ProtocolVersion is the protocol version this SDK speaks.
const ProtocolVersion = 1

// maxLine bounds one line from the server (exec results are at most about
// 12 MiB); a longer line is a protocol error.
const maxLine = 64 << 20

// Config says how to start the server.
type Config struct {
	// BinaryPath is the matchlock binary. Empty: $MATCHLOCK_BIN, else
	// "matchlock" found in $PATH.
	BinaryPath string
	// Args are added after `matchlock rpc` (for example "--pull=never").
	Args []string
	// Env is added to the server's environment (KEY=VALUE).
	Env []string
	// Stderr receives the server's standard error (notices, such as that
	// KVM is unusable). Nil: os.Stderr.
	Stderr io.Writer
	// StartTimeout bounds the server's start-up handshake. Default 30 s.
	StartTimeout time.Duration
}

// DefaultConfig returns the configuration NewClient normally wants: the
// binary from $MATCHLOCK_BIN or $PATH, stderr passed through.
func DefaultConfig() Config {
	return Config{BinaryPath: os.Getenv("MATCHLOCK_BIN")}
}

// Client is a connection to one `matchlock rpc` process.
type Client struct {
	cmd    *exec.Cmd
	w      io.WriteCloser
	wmu    sync.Mutex // held for one whole line
	tail   *tailbuf.Buffer
	closer sync.Once
	exited chan struct{} // closed when the server process has been reaped

	mu sync.Mutex
	// The fields below are guarded by mu.
	next    int64
	pending map[int64]*pending
	err     error         // why the connection ended; nil while it is up
	done    chan struct{} // closed once err is set
	current *VM
}

// pending is a request waiting for its answer.
type pending struct {
	method string
	ch     chan *wireMsg // capacity 1: the reader never blocks on it
	// nmu serialises notification delivery with abandonment, so that a
	// caller that has returned never gets another callback.
	nmu       sync.Mutex
	onNote    func(method string, params json.RawMessage)
	abandoned bool
}

type wireMsg struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *RPCError       `json:"error"`
}

// NewClient starts `matchlock rpc` and checks that it speaks this SDK's
// protocol. On error the returned Client is not nil: every method on it
// returns that error.
func NewClient(cfg Config) (*Client, error) {
	c, err := startClient(cfg)
	if err != nil {
		c = brokenClient(err)
	}
	return c, err
}

func startClient(cfg Config) (*Client, error) {
	bin := cfg.BinaryPath
	if bin == "" {
		bin = os.Getenv("MATCHLOCK_BIN")
	}
	if bin == "" {
		p, err := exec.LookPath("matchlock")
		if err != nil {
			return nil, fmt.Errorf("matchlock: the matchlock binary is not in $PATH (set MATCHLOCK_BIN or Config.BinaryPath): %w", err)
		}
		bin = p
	}
	cmd := exec.Command(bin, append([]string{"rpc"}, cfg.Args...)...)
	cmd.Env = append(os.Environ(), cfg.Env...)
	stderr := cfg.Stderr
	if stderr == nil {
		stderr = os.Stderr
	}
	tail := tailbuf.New(4 << 10)
	cmd.Stderr = io.MultiWriter(stderr, tail)
	w, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	r, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("matchlock: start %s rpc: %w", bin, err)
	}
	c := newConn(r, w)
	c.cmd, c.tail = cmd, tail
	go func() {
		cmd.Wait()
		close(c.exited)
	}()

	timeout := cfg.StartTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var pong struct {
		ProtocolVersion int `json:"protocol_version"`
	}
	if err := c.call(ctx, "ping", nil, nil, &pong); err != nil {
		c.Close()
		return nil, fmt.Errorf("matchlock: %s rpc did not start: %w%s", bin, err, stderrSuffix(c.tail))
	}
	if pong.ProtocolVersion != ProtocolVersion {
		c.Close()
		return nil, fmt.Errorf("%w: server speaks protocol %d, this SDK %d", ErrProtocol, pong.ProtocolVersion, ProtocolVersion)
	}
	return c, nil
}

// newConn makes a Client over any line stream (tests use pipes).
func newConn(r io.Reader, w io.WriteCloser) *Client {
	c := &Client{w: w, pending: map[int64]*pending{}, done: make(chan struct{}), exited: make(chan struct{}), tail: tailbuf.New(0)}
	go c.readLoop(r)
	return c
}

func brokenClient(err error) *Client {
	c := &Client{pending: map[int64]*pending{}, done: make(chan struct{}), exited: make(chan struct{}), tail: tailbuf.New(0)}
	c.err = err
	close(c.done)
	close(c.exited)
	return c
}

// Close ends the session: the server closes every sandbox of this Client
// and exits. It waits up to 30 s for that, then kills the server.
func (c *Client) Close() error {
	if c == nil {
		return nil
	}
	c.closer.Do(func() {
		c.fail(ErrClosed)
		if c.w != nil {
			c.w.Close() // EOF: the server tears every sandbox down
		}
		if c.cmd != nil {
			select {
			case <-c.exited:
			case <-time.After(30 * time.Second):
				c.cmd.Process.Kill()
				<-c.exited
			}
		}
	})
	return nil
}

// fail ends the connection with err (the first reason wins) and fails
// every waiting request.
func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	close(c.done)
}

func (c *Client) connErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) readLoop(r io.Reader) {
	br := bufio.NewReaderSize(r, 256<<10)
	for {
		line, err := readLine(br)
		if err != nil {
			if err == io.EOF {
				err = fmt.Errorf("%w: the server exited%s", ErrClosed, stderrSuffix(c.tail))
			}
			c.fail(err)
			return
		}
		var m wireMsg
		if err := json.Unmarshal(line, &m); err != nil {
			c.fail(fmt.Errorf("%w: bad line from the server: %v", ErrProtocol, err))
			return
		}
		if m.Method != "" {
			c.deliverNote(&m)
			continue
		}
		id, err := strconv.ParseInt(string(m.ID), 10, 64)
		if err != nil {
			continue // an answer to nothing of ours (id null: a line we sent was refused whole)
		}
		c.mu.Lock()
		p := c.pending[id]
		delete(c.pending, id)
		c.mu.Unlock()
		if p != nil {
			p.ch <- &m
		}
	}
}

func (c *Client) deliverNote(m *wireMsg) {
	var ref struct {
		RequestID json.RawMessage `json:"request_id"`
	}
	json.Unmarshal(m.Params, &ref)
	id, err := strconv.ParseInt(string(ref.RequestID), 10, 64)
	if err != nil {
		return // sandbox_exited and future notifications: requests fail on their own
	}
	c.mu.Lock()
	p := c.pending[id]
	c.mu.Unlock()
	if p == nil {
		return
	}
	p.nmu.Lock()
	defer p.nmu.Unlock()
	if !p.abandoned && p.onNote != nil {
		p.onNote(m.Method, m.Params)
	}
}

func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if err == nil || err == io.EOF && len(frag) > 0 {
			if line == nil {
				return frag, nil // valid until the next read: decoded at once
			}
			return append(line, frag...), nil
		}
		if err != bufio.ErrBufferFull {
			return nil, err
		}
		line = append(line, frag...)
		if len(line) > maxLine {
			return nil, fmt.Errorf("%w: a line from the server is longer than %d bytes", ErrProtocol, maxLine)
		}
	}
}

// send writes a request and registers its answer.
func (c *Client) send(method string, params any, onNote func(string, json.RawMessage)) (int64, *pending, error) {
	if params == nil {
		params = struct{}{}
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, nil, err
	}
	c.next++
	id := c.next
	p := &pending{method: method, ch: make(chan *wireMsg, 1), onNote: onNote}
	c.pending[id] = p
	c.mu.Unlock()
	if err := c.writeLine(map[string]any{"jsonrpc": "2.0", "id": id, "method": method, "params": params}); err != nil {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
		return 0, nil, err
	}
	return id, p, nil
}

func (c *Client) notify(method string, params any) error {
	return c.writeLine(map[string]any{"jsonrpc": "2.0", "method": method, "params": params})
}

func (c *Client) writeLine(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("matchlock: encode request: %w", err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.connErr(); err != nil {
		return err
	}
	if _, err := c.w.Write(b); err != nil {
		err = fmt.Errorf("%w: write to the server: %v%s", ErrClosed, err, stderrSuffix(c.tail))
		c.fail(err)
		return err
	}
	return nil
}

// await waits for a request's answer and decodes its result into out.
// When ctx ends first it cancels the request on the server and waits
// briefly for the server to confirm, so that a guest process is gone when
// await returns.
func (c *Client) await(ctx context.Context, id int64, p *pending, out any) error {
	var m *wireMsg
	select {
	case m = <-p.ch:
	case <-ctx.Done():
		p.nmu.Lock()
		p.abandoned = true
		p.nmu.Unlock()
		c.notify("cancel", map[string]int64{"request_id": id})
		select {
		case <-p.ch:
		case <-c.done:
		case <-time.After(2 * time.Second):
		}
		return ctx.Err()
	case <-c.done:
		return c.connErr()
	}
	if m.Error != nil {
		return m.Error
	}
	if out != nil {
		if err := json.Unmarshal(m.Result, out); err != nil {
			return fmt.Errorf("%w: %s result: %v", ErrProtocol, p.method, err)
		}
	}
	return nil
}

// call is send then await.
func (c *Client) call(ctx context.Context, method string, params any, onNote func(string, json.RawMessage), out any) error {
	id, p, err := c.send(method, params, onNote)
	if err != nil {
		return err
	}
	return c.await(ctx, id, p, out)
}

// stderrSuffix quotes what is kept of the server's stderr for an error
// message ("" when nothing was).
func stderrSuffix(tail *tailbuf.Buffer) string {
	s := tail.String()
	if s == "" {
		return ""
	}
	return " (server stderr: " + strings.TrimRight(s, "\r\n") + ")"
}
