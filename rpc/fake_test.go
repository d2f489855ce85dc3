package rpc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"matchlock.dev/matchlock/sandbox"
)

// fakeSandbox is an in-process Sandbox for the fast tier: a handful of
// "programs" (cat, echo, env, exit N, sleep, pwd) and an in-memory file
// tree. It lets protocol, limit and cancellation tests run without VMs.
type fakeSandbox struct {
	id    string
	opts  sandbox.Options
	mu    sync.Mutex
	files map[string][]byte
	done  chan struct{}
	once  sync.Once
	// running counts live processes (for "was it killed" checks).
	running atomic.Int32
}

var fakeIDs atomic.Int32

func newFake(ctx context.Context, o sandbox.Options) (Sandbox, error) {
	if o.Image == "missing:latest" {
		return nil, fmt.Errorf("image %s not found", o.Image)
	}
	if o.Image == "slow:latest" {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return &fakeSandbox{id: fmt.Sprintf("vm-fake%d", fakeIDs.Add(1)), opts: o,
		files: map[string][]byte{}, done: make(chan struct{})}, nil
}

func (f *fakeSandbox) ID() string { return f.id }
func (f *fakeSandbox) ImageConfig() sandbox.ImageConfig {
	return sandbox.ImageConfig{Env: []string{"PATH=/bin", "FROM_IMAGE=1"}, WorkingDir: "/"}
}
func (f *fakeSandbox) Done() <-chan struct{} { return f.done }
func (f *fakeSandbox) Close() error {
	f.once.Do(func() { close(f.done) })
	return nil
}

// crash simulates the VM exiting on its own.
func (f *fakeSandbox) crash() { f.Close() }

func (f *fakeSandbox) Exec(ctx context.Context, o sandbox.ExecOptions) (Process, error) {
	select {
	case <-f.done:
		return nil, sandbox.ErrClosed
	default:
	}
	argv := o.Argv
	if len(argv) == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
		argv = strings.Fields(argv[2])
	}
	switch argv[0] {
	case "cat", "echo", "env", "exit", "sleep", "pwd", "spew":
	default:
		return nil, &sandbox.GuestError{Code: "not_found", Message: argv[0] + ": not found"}
	}
	p := &fakeProc{sigs: make(chan syscall.Signal, 8), exited: make(chan struct{}), sb: f}
	p.outR, p.outW = io.Pipe()
	p.errR, p.errW = io.Pipe()
	p.inR, p.inW = io.Pipe()
	f.running.Add(1)
	go p.run(argv, o)
	return p, nil
}

func (f *fakeSandbox) WriteFile(ctx context.Context, path string, r io.Reader, mode os.FileMode) (int64, error) {
	if strings.HasPrefix(path, "/ro/") {
		io.Copy(io.Discard, r)
		return 0, &sandbox.GuestError{Code: "permission", Message: "open " + path + ": permission denied"}
	}
	var b bytes.Buffer
	n, err := io.Copy(&b, r)
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	f.files[path] = b.Bytes()
	f.mu.Unlock()
	return n, nil
}

func (f *fakeSandbox) ReadFile(ctx context.Context, path string, w io.Writer) (int64, error) {
	f.mu.Lock()
	b, ok := f.files[path]
	f.mu.Unlock()
	if !ok {
		return 0, &sandbox.GuestError{Code: "not_found", Message: "open " + path + ": no such file or directory"}
	}
	n, err := w.Write(b)
	return int64(n), err
}

func (f *fakeSandbox) ListFiles(ctx context.Context, dir string) ([]sandbox.FileInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []sandbox.FileInfo
	for p, b := range f.files {
		if strings.TrimSuffix(dir, "/")+"/"+p[strings.LastIndex(p, "/")+1:] == p {
			out = append(out, sandbox.FileInfo{Name: p[strings.LastIndex(p, "/")+1:], Size: int64(len(b)), Mode: 0o644})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

type fakeProc struct {
	sb                 *fakeSandbox
	outR, errR, inR    *io.PipeReader
	outW, errW, inW    *io.PipeWriter
	sigs               chan syscall.Signal
	exited             chan struct{}
	status             sandbox.ExitStatus
	closeOnce, endOnce sync.Once
	size               atomic.Value
}

func (p *fakeProc) run(argv []string, o sandbox.ExecOptions) {
	defer p.sb.running.Add(-1)
	code := 0
	switch argv[0] {
	case "cat":
		io.Copy(p.outW, p.inR)
	case "echo":
		fmt.Fprintln(p.outW, strings.Join(argv[1:], " "))
	case "env":
		for _, kv := range o.Env {
			fmt.Fprintln(p.outW, kv)
		}
		if o.TTY {
			fmt.Fprintf(p.outW, "TTY=%dx%d\n", o.Rows, o.Cols)
		}
	case "pwd":
		fmt.Fprintf(p.outW, "%s %s\n", o.Dir, o.User)
	case "exit":
		code, _ = strconv.Atoi(argv[1])
		fmt.Fprintln(p.errW, "bye")
	case "spew": // N bytes of 'x'
		n, _ := strconv.Atoi(argv[1])
		p.outW.Write(bytes.Repeat([]byte("x"), n))
	case "sleep":
	loop:
		for {
			select {
			case sig := <-p.sigs:
				switch sig {
				case syscall.SIGKILL, syscall.SIGTERM:
					code = 128 + int(sig)
					p.status.Signal = int(sig)
					break loop
				case syscall.SIGWINCH:
					if v, ok := p.size.Load().([2]uint16); ok {
						fmt.Fprintf(p.outW, "size %d %d\n", v[0], v[1])
					}
				}
			case <-p.sb.done:
				break loop
			}
		}
	}
	p.status.Code = code
	p.outW.Close()
	p.errW.Close()
	close(p.exited)
}

func (p *fakeProc) Stdout() io.Reader     { return p.outR }
func (p *fakeProc) Stderr() io.Reader     { return p.errR }
func (p *fakeProc) Stdin() io.WriteCloser { return p.inW }
func (p *fakeProc) Signal(sig syscall.Signal) error {
	select {
	case <-p.exited:
		return io.ErrClosedPipe
	case p.sigs <- sig:
		return nil
	}
}
func (p *fakeProc) Resize(rows, cols uint16) error {
	p.size.Store([2]uint16{rows, cols})
	return p.Signal(syscall.SIGWINCH)
}
func (p *fakeProc) Wait(ctx context.Context) (sandbox.ExitStatus, error) {
	select {
	case <-p.exited:
		return p.status, nil
	case <-ctx.Done():
		return sandbox.ExitStatus{}, ctx.Err()
	case <-p.sb.done:
		return sandbox.ExitStatus{}, sandbox.ErrClosed
	}
}
func (p *fakeProc) Close() error {
	p.closeOnce.Do(func() {
		p.outR.CloseWithError(io.ErrClosedPipe)
		p.errR.CloseWithError(io.ErrClosedPipe)
		p.inW.CloseWithError(io.ErrClosedPipe)
		p.inR.CloseWithError(io.ErrClosedPipe)
	})
	return nil
}

var _ Sandbox = (*fakeSandbox)(nil)

type (
	contextT = context.Context
	optionsT = sandbox.Options
)

// noImages satisfies Config.Images for fakes, which never ask it.
type noImages struct{}

func (noImages) Rootfs(context.Context, string) (string, sandbox.ImageConfig, error) {
	return "", sandbox.ImageConfig{}, fmt.Errorf("noImages")
}
