package sdk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// chunkSize is the payload of one stdin or write_file_chunk request; the
// base64 line stays far below the server's 4 MiB line limit.
const chunkSize = 512 << 10

// chunkWindow is how many chunk requests are in flight at once.
const chunkWindow = 4

// VM is a handle on one sandbox of a Client.
type VM struct {
	c     *Client
	id    string
	Image ImageInfo // the image's config (set by Launch)
}

// ID returns the sandbox id.
func (v *VM) ID() string { return v.id }

// ExecResult is how a command ended. It is never nil, also on error.
type ExecResult struct {
	ExitCode int // exit status, 128+N when killed by signal N
	Signal   int // the killing signal, 0 if the command exited
	// Stdout and Stderr are the output of Exec and ExecArgv (empty for
	// the streaming variants, whose output goes to the writers).
	Stdout, Stderr string
	// StdoutTruncated and StderrTruncated report output beyond the
	// server's 4 MiB per stream buffered limit (use ExecStream for more).
	StdoutTruncated, StderrTruncated bool
	Duration                         time.Duration
}

// Cmd describes a command for Start and Run.
type Cmd struct {
	// Command is a shell command line, run with /bin/sh -c; or set Argv.
	Command string
	Argv    []string
	Env     map[string]string // added to the image's and the sandbox's
	Dir     string            // default: the sandbox's, else the image's
	User    string            // default: the sandbox's, else the image's

	// Stdin, if set, is copied to the command (then EOF).
	Stdin io.Reader
	// Stdout and Stderr, if set, receive the output as it comes. When
	// both are nil and Stdin is nil, the output is buffered in the result.
	// They are called from the Client's reader goroutine: they must not
	// call the Client, and a slow writer slows every request.
	Stdout, Stderr io.Writer

	// TTY runs the command on a pseudo-terminal of Rows×Cols (its output,
	// stderr included, goes to Stdout).
	TTY        bool
	Rows, Cols uint16
}

type execParams struct {
	ID      string            `json:"id"`
	Command string            `json:"command,omitempty"`
	Argv    []string          `json:"argv,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Workdir string            `json:"workdir,omitempty"`
	User    string            `json:"user,omitempty"`
	Rows    uint16            `json:"rows,omitempty"`
	Cols    uint16            `json:"cols,omitempty"`
}

type execWire struct {
	ExitCode        int    `json:"exit_code"`
	Signal          int    `json:"signal"`
	DurationMS      int64  `json:"duration_ms"`
	Stdout          []byte `json:"stdout"`
	Stderr          []byte `json:"stderr"`
	StdoutTruncated bool   `json:"stdout_truncated"`
	StderrTruncated bool   `json:"stderr_truncated"`
}

// Process is a command started with Start.
type Process struct {
	v      *VM
	ctx    context.Context
	id     int64
	p      *pending
	werr   error // a writer's error, guarded by wmu
	wmu    sync.Mutex
	once   sync.Once
	res    *ExecResult
	err    error
	stdinE chan error // the stdin copier's outcome (nil without Stdin)
}

// Start starts cmd. The context governs the whole life of the process:
// when it is done, the process is killed.
func (v *VM) Start(ctx context.Context, cmd *Cmd) (*Process, error) {
	if v == nil {
		return nil, ErrNoSandbox
	}
	params := execParams{ID: v.id, Command: cmd.Command, Argv: cmd.Argv, Env: cmd.Env, Workdir: cmd.Dir, User: cmd.User}
	method := "exec"
	switch {
	case cmd.TTY:
		method, params.Rows, params.Cols = "exec_tty", cmd.Rows, cmd.Cols
	case cmd.Stdin != nil:
		method = "exec_pipe"
	case cmd.Stdout != nil || cmd.Stderr != nil:
		method = "exec_stream"
	}
	pr := &Process{v: v, ctx: ctx}
	onNote := func(m string, raw json.RawMessage) {
		if m != "exec_output" {
			return
		}
		var n struct {
			Stream string `json:"stream"`
			Data   []byte `json:"data"`
		}
		if json.Unmarshal(raw, &n) != nil {
			return
		}
		w := cmd.Stdout
		if n.Stream == "stderr" {
			w = cmd.Stderr
		}
		if w == nil {
			return
		}
		if _, err := w.Write(n.Data); err != nil {
			pr.wmu.Lock()
			if pr.werr == nil {
				pr.werr = err
			}
			pr.wmu.Unlock()
		}
	}
	id, p, err := v.c.send(method, params, onNote)
	if err != nil {
		return nil, err
	}
	pr.id, pr.p = id, p
	if method == "exec_pipe" || method == "exec_tty" && cmd.Stdin != nil {
		pr.stdinE = make(chan error, 1)
		go func() {
			pr.stdinE <- v.c.sendChunks(ctx, cmd.Stdin, func(b []byte, eof bool) (string, any) {
				return "stdin", map[string]any{"request_id": id, "data": b, "eof": eof}
			})
		}()
	}
	return pr, nil
}

// Wait waits for the process to end. A failure to copy stdin that is not
// caused by the process ending is returned as an error alongside the result.
func (pr *Process) Wait() (*ExecResult, error) {
	pr.once.Do(func() {
		var w execWire
		err := pr.v.c.await(pr.ctx, pr.id, pr.p, &w)
		res := &ExecResult{ExitCode: -1}
		if err == nil {
			res = &ExecResult{ExitCode: w.ExitCode, Signal: w.Signal, Stdout: string(w.Stdout), Stderr: string(w.Stderr),
				StdoutTruncated: w.StdoutTruncated, StderrTruncated: w.StderrTruncated,
				Duration: time.Duration(w.DurationMS) * time.Millisecond}
			pr.wmu.Lock()
			if pr.werr != nil {
				err = fmt.Errorf("matchlock: writing output: %w", pr.werr)
			}
			pr.wmu.Unlock()
		}
		if err == nil && pr.stdinE != nil {
			select {
			case serr := <-pr.stdinE:
				if serr != nil && !errors.Is(serr, errProcessEnded) {
					err = fmt.Errorf("matchlock: copying stdin: %w", serr)
				}
			default: // still blocked reading Stdin: the process did not need the rest
			}
		}
		pr.res, pr.err = res, err
	})
	return pr.res, pr.err
}

// Resize changes the terminal size of a TTY process.
func (pr *Process) Resize(rows, cols uint16) error {
	return pr.v.c.call(pr.ctx, "resize", map[string]any{"request_id": pr.id, "rows": rows, "cols": cols}, nil, nil)
}

// Signal sends sig to the process.
func (pr *Process) Signal(sig syscall.Signal) error {
	return pr.v.c.call(pr.ctx, "signal", map[string]any{"request_id": pr.id, "signal": int(sig)}, nil, nil)
}

var errProcessEnded = errors.New("the process has ended")

// sendChunks copies r as chunk requests, chunkWindow in flight, the last
// one flagged eof. mk builds a chunk's method and params.
func (c *Client) sendChunks(ctx context.Context, r io.Reader, mk func(b []byte, eof bool) (string, any)) error {
	type inflight struct {
		id int64
		p  *pending
	}
	var window []inflight
	drain := func(n int) error {
		for len(window) > n {
			f := window[0]
			window = window[1:]
			if err := c.await(ctx, f.id, f.p, nil); err != nil {
				var re *RPCError
				if errors.As(err, &re) && re.Code == CodeUnknownRequest {
					return errProcessEnded
				}
				return err
			}
		}
		return nil
	}
	buf := make([]byte, chunkSize)
	for {
		// Read, not ReadFull: interactive input goes out as it comes.
		n, rerr := r.Read(buf)
		eof := rerr == io.EOF
		if rerr != nil && !eof {
			return rerr
		}
		if n == 0 && !eof {
			continue
		}
		method, params := mk(append([]byte(nil), buf[:n]...), eof)
		id, p, err := c.send(method, params, nil)
		if err != nil {
			return err
		}
		window = append(window, inflight{id, p})
		if eof {
			return drain(0)
		}
		if err := drain(chunkWindow - 1); err != nil {
			return err
		}
	}
}

// Run starts cmd and waits for it.
func (v *VM) Run(ctx context.Context, cmd *Cmd) (*ExecResult, error) {
	pr, err := v.Start(ctx, cmd)
	if err != nil {
		return &ExecResult{ExitCode: -1}, err
	}
	return pr.Wait()
}

// Exec runs a shell command line (/bin/sh -c) and returns its output. A
// command that fails is not an error: look at ExitCode.
func (v *VM) Exec(cmd string) (*ExecResult, error) {
	return v.ExecContext(context.Background(), cmd)
}

// ExecContext is Exec with a context; when it is done the command is killed.
func (v *VM) ExecContext(ctx context.Context, cmd string) (*ExecResult, error) {
	return v.Run(ctx, &Cmd{Command: cmd})
}

// ExecArgv runs argv without a shell.
func (v *VM) ExecArgv(argv []string) (*ExecResult, error) {
	return v.ExecArgvContext(context.Background(), argv)
}

// ExecArgvContext is ExecArgv with a context.
func (v *VM) ExecArgvContext(ctx context.Context, argv []string) (*ExecResult, error) {
	return v.Run(ctx, &Cmd{Argv: argv})
}

// ExecStream runs a shell command line, copying its output to stdout and
// stderr (either may be nil) as it comes.
func (v *VM) ExecStream(cmd string, stdout, stderr io.Writer) (*ExecResult, error) {
	return v.ExecStreamContext(context.Background(), cmd, stdout, stderr)
}

// ExecStreamContext is ExecStream with a context.
func (v *VM) ExecStreamContext(ctx context.Context, cmd string, stdout, stderr io.Writer) (*ExecResult, error) {
	if stdout == nil && stderr == nil {
		stdout = io.Discard
	}
	return v.Run(ctx, &Cmd{Command: cmd, Stdout: stdout, Stderr: stderr})
}

// ExecPipe runs a shell command line with stdin copied to it, and its
// output copied to stdout and stderr (either may be nil).
func (v *VM) ExecPipe(cmd string, stdin io.Reader, stdout, stderr io.Writer) (*ExecResult, error) {
	return v.ExecPipeContext(context.Background(), cmd, stdin, stdout, stderr)
}

// ExecPipeContext is ExecPipe with a context.
func (v *VM) ExecPipeContext(ctx context.Context, cmd string, stdin io.Reader, stdout, stderr io.Writer) (*ExecResult, error) {
	if stdin == nil {
		stdin = strings.NewReader("")
	}
	return v.Run(ctx, &Cmd{Command: cmd, Stdin: stdin, Stdout: stdout, Stderr: stderr})
}

// --- files -------------------------------------------------------------------

// FileInfo describes a guest file in a listing.
type FileInfo struct {
	Name    string
	Size    int64
	Mode    os.FileMode // permission bits
	IsDir   bool
	ModTime time.Time
}

// WriteFile writes content to path in the guest (mode 0644).
func (v *VM) WriteFile(path string, content []byte) error {
	return v.WriteFileContext(context.Background(), path, content, 0o644)
}

// WriteFileContext writes content to path with the given permission bits.
func (v *VM) WriteFileContext(ctx context.Context, path string, content []byte, mode os.FileMode) error {
	_, err := v.WriteFileFrom(ctx, path, bytes.NewReader(content), mode)
	return err
}

// WriteFileFrom streams r into path in the guest, in chunks: the file's
// size does not bound memory. It returns the number of bytes written and
// checks the server's SHA-256 of them.
func (v *VM) WriteFileFrom(ctx context.Context, path string, r io.Reader, mode os.FileMode) (int64, error) {
	if v == nil {
		return 0, ErrNoSandbox
	}
	perm := uint32(mode.Perm())
	if mode&os.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if mode&os.ModeSetgid != 0 {
		perm |= 0o2000
	}
	if mode&os.ModeSticky != 0 {
		perm |= 0o1000
	}
	var h struct {
		Handle string `json:"handle"`
	}
	if err := v.c.call(ctx, "write_file_open", map[string]any{"id": v.id, "path": path, "mode": perm}, nil, &h); err != nil {
		return 0, err
	}
	sum := sha256.New()
	var n int64
	err := v.c.sendChunks(ctx, io.TeeReader(r, sum), func(b []byte, _ bool) (string, any) {
		n += int64(len(b))
		return "write_file_chunk", map[string]any{"handle": h.Handle, "data": b}
	})
	if err != nil {
		v.c.notify("write_file_close", map[string]any{"handle": h.Handle, "abort": true})
		return 0, err
	}
	var res struct {
		Size   int64  `json:"size"`
		SHA256 string `json:"sha256"`
	}
	if err := v.c.call(ctx, "write_file_close", map[string]any{"handle": h.Handle}, nil, &res); err != nil {
		return 0, err
	}
	if res.Size != n || res.SHA256 != hex.EncodeToString(sum.Sum(nil)) {
		return res.Size, fmt.Errorf("%w: wrote %d bytes, the server took %d (sha256 %s)", ErrProtocol, n, res.Size, res.SHA256)
	}
	return n, nil
}

// ReadFile returns the content of the guest file at path.
func (v *VM) ReadFile(path string) ([]byte, error) {
	return v.ReadFileContext(context.Background(), path)
}

// ReadFileContext is ReadFile with a context.
func (v *VM) ReadFileContext(ctx context.Context, path string) ([]byte, error) {
	var b bytes.Buffer
	if _, err := v.ReadFileTo(ctx, path, &b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// ReadFileTo streams the guest file at path into w and checks it against
// the server's SHA-256. On error w may have received part of the file.
func (v *VM) ReadFileTo(ctx context.Context, path string, w io.Writer) (int64, error) {
	if v == nil {
		return 0, ErrNoSandbox
	}
	sum := sha256.New()
	var n int64
	var werr error
	onNote := func(m string, raw json.RawMessage) {
		if m != "read_file_chunk" || werr != nil {
			return
		}
		var c struct {
			Data []byte `json:"data"`
		}
		if werr = json.Unmarshal(raw, &c); werr != nil {
			return
		}
		sum.Write(c.Data)
		k, err := w.Write(c.Data)
		n += int64(k)
		werr = err
	}
	var res struct {
		Size   int64  `json:"size"`
		SHA256 string `json:"sha256"`
	}
	if err := v.c.call(ctx, "read_file", map[string]any{"id": v.id, "path": path}, onNote, &res); err != nil {
		return n, err
	}
	if werr != nil {
		return n, werr
	}
	if res.Size != n || res.SHA256 != hex.EncodeToString(sum.Sum(nil)) {
		return n, fmt.Errorf("%w: read %d bytes of %d, sha256 mismatch", ErrProtocol, n, res.Size)
	}
	return n, nil
}

// ListFiles lists a guest directory.
func (v *VM) ListFiles(path string) ([]FileInfo, error) {
	return v.ListFilesContext(context.Background(), path)
}

// ListFilesContext is ListFiles with a context.
func (v *VM) ListFilesContext(ctx context.Context, path string) ([]FileInfo, error) {
	if v == nil {
		return nil, ErrNoSandbox
	}
	var res struct {
		Files []struct {
			Name  string `json:"name"`
			Size  int64  `json:"size"`
			Mode  uint32 `json:"mode"`
			IsDir bool   `json:"is_dir"`
			MTime int64  `json:"mtime"`
		} `json:"files"`
	}
	if err := v.c.call(ctx, "list_files", map[string]any{"id": v.id, "path": path}, nil, &res); err != nil {
		return nil, err
	}
	out := make([]FileInfo, 0, len(res.Files))
	for _, f := range res.Files {
		out = append(out, FileInfo{Name: f.Name, Size: f.Size, Mode: os.FileMode(f.Mode & 0o777), IsDir: f.IsDir, ModTime: time.Unix(f.MTime, 0)})
	}
	return out, nil
}

// --- network -------------------------------------------------------------------

// AllowListAdd adds host patterns to the running sandbox's allow-list and
// returns the new list.
func (v *VM) AllowListAdd(ctx context.Context, hosts ...string) ([]string, error) {
	return v.allowList(ctx, "allow_list_add", hosts)
}

// AllowListDelete removes host patterns and returns the new list.
func (v *VM) AllowListDelete(ctx context.Context, hosts ...string) ([]string, error) {
	return v.allowList(ctx, "allow_list_delete", hosts)
}

func (v *VM) allowList(ctx context.Context, method string, hosts []string) ([]string, error) {
	if v == nil {
		return nil, ErrNoSandbox
	}
	var res struct {
		AllowHosts []string `json:"allow_hosts"`
	}
	if err := v.c.call(ctx, method, map[string]any{"id": v.id, "hosts": hosts}, nil, &res); err != nil {
		return nil, err
	}
	return res.AllowHosts, nil
}

// PortForward forwards hostAddr ("127.0.0.1:0" when empty: any free port)
// to guestPort for the sandbox's lifetime, and returns the address bound.
func (v *VM) PortForward(ctx context.Context, guestPort int, hostAddr string) (string, error) {
	if v == nil {
		return "", ErrNoSandbox
	}
	var res struct {
		HostAddr string `json:"host_addr"`
	}
	p := map[string]any{"id": v.id, "guest_port": guestPort}
	if hostAddr != "" {
		p["host_addr"] = hostAddr
	}
	if err := v.c.call(ctx, "port_forward", p, nil, &res); err != nil {
		return "", err
	}
	return res.HostAddr, nil
}

// Close stops the sandbox and removes everything it left on the host.
func (v *VM) Close() error {
	if v == nil {
		return ErrNoSandbox
	}
	err := v.c.call(context.Background(), "close", map[string]string{"id": v.id}, nil, nil)
	v.c.mu.Lock()
	if v.c.current != nil && v.c.current.id == v.id {
		v.c.current = nil
	}
	v.c.mu.Unlock()
	return err
}
